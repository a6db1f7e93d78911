// Argument validation shared by the CPU and CUDA kernels of kvq::quantize / kvq::dequantize.
// Messages name the op and the argument so a user can fix the call without reading C++.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>

namespace kvq {

// A tensor seen as [outer, n, inner] around the grouped axis: groups are `group_size`
// consecutive elements along n, so a group is contiguous when inner == 1 (per-token) and a
// [group_size, inner] tile whose columns are the groups when inner > 1 (per-channel).
struct GroupedView {
  int64_t axis;
  int64_t outer;
  int64_t n;
  int64_t inner;
};

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

inline bool is_float_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline int64_t normalize_axis(const char* op, const char* name, int64_t axis, int64_t rank) {
  TORCH_CHECK(rank >= 1, op, ": ", name, " must have at least one dimension");
  TORCH_CHECK(axis >= -rank && axis < rank, op, ": axis must be in [", -rank, ", ", rank - 1,
              "] for ", name, " of rank ", rank, ", got ", axis);
  return axis < 0 ? axis + rank : axis;
}

inline GroupedView grouped_view(c10::IntArrayRef sizes, int64_t axis) {
  GroupedView v{axis, 1, sizes[axis], 1};
  for (int64_t d = 0; d < axis; ++d) v.outer *= sizes[d];
  for (int64_t d = axis + 1; d < static_cast<int64_t>(sizes.size()); ++d) v.inner *= sizes[d];
  return v;
}

// "<op>: <name> is on <device> but <ref_name> is on <device>": which tensor is where.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move every input to one device");
}

inline void check_bits_and_group(const char* op, int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits >= 1 && bits <= 8, op, ": bits must be in [1, 8], got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, op,
              ": group_size must be a positive multiple of 8 (so each group fills whole bytes), "
              "got ", group_size);
}

inline GroupedView check_quantize_args(const at::Tensor& x, int64_t bits, int64_t group_size,
                                       int64_t axis, std::optional<at::ScalarType> scale_dtype) {
  constexpr const char* op = "kvq::quantize";
  check_bits_and_group(op, bits, group_size);
  TORCH_CHECK(is_float_input(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  if (scale_dtype.has_value()) {
    TORCH_CHECK(*scale_dtype == at::kHalf || *scale_dtype == at::kFloat, op,
                ": scale_dtype must be float16 or float32, got ", *scale_dtype);
  }
  const int64_t ax = normalize_axis(op, "x", axis, x.dim());
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", shape_str(x.sizes()));
  TORCH_CHECK(x.size(ax) % group_size == 0, op, ": group_size ", group_size, " must divide x.size(",
              ax, ") = ", x.size(ax), "; pad that axis or choose a group size that divides it");
  return grouped_view(x.sizes(), ax);
}

// `op` is the op whose arguments these are: kvq::dequantize, or an op with a packed operand
// (kvq::dequant_matmul, kvq::remat_kv), so that a message names the op that was called.
inline GroupedView check_dequantize_args(const char* op, const at::Tensor& codes,
                                         const at::Tensor& scale, const at::Tensor& zero,
                                         int64_t bits, int64_t group_size, int64_t axis,
                                         at::ScalarType dtype) {
  check_bits_and_group(op, bits, group_size);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kHalf || scale.scalar_type() == at::kFloat, op,
              ": scale must be float16 or float32, got ", scale.scalar_type());
  TORCH_CHECK(zero.scalar_type() == scale.scalar_type(), op,
              ": zero must have the dtype of scale (", scale.scalar_type(), "), got ",
              zero.scalar_type());
  TORCH_CHECK(is_float_input(dtype), op, ": dtype must be float32, float16 or bfloat16, got ",
              dtype);
  check_same_device(op, "scale", scale, "codes", codes);
  check_same_device(op, "zero", zero, "codes", codes);
  const int64_t ax = normalize_axis(op, "codes", axis, codes.dim());
  TORCH_CHECK(codes.numel() > 0, op, ": codes must not be empty, got shape ",
              shape_str(codes.sizes()));
  TORCH_CHECK((codes.size(ax) * 8) % (bits * group_size) == 0, op, ": codes.size(", ax, ") = ",
              codes.size(ax), " bytes is not a whole number of groups of ", group_size, " ", bits,
              "-bit codes");
  const int64_t n = codes.size(ax) * 8 / bits;
  std::vector<int64_t> expected(codes.sizes().begin(), codes.sizes().end());
  expected[ax] = n / group_size;
  TORCH_CHECK(scale.sizes().vec() == expected, op, ": scale must have shape ",
              shape_str(expected), " (codes' shape with ", n / group_size,
              " groups along axis ", ax, "), got ", shape_str(scale.sizes()));
  TORCH_CHECK(zero.sizes() == scale.sizes(), op, ": zero must have the shape of scale ",
              shape_str(scale.sizes()), ", got ", shape_str(zero.sizes()));
  std::vector<int64_t> full = codes.sizes().vec();
  full[ax] = n;
  return grouped_view(full, ax);
}

// Shape of the quantize outputs: codes pack the grouped axis, scale/zero hold one per group.
inline std::vector<int64_t> with_axis(c10::IntArrayRef sizes, int64_t axis, int64_t value) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out[axis] = value;
  return out;
}

}  // namespace kvq
