// Argument validation of kvq::outlier_split and kvq::dequant_matmul (same rules and messages
// as src/torchkvq/_checks.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "quantize_args.h"

namespace kvq {

inline void check_outlier_split_args(const at::Tensor& x, int64_t n_low, int64_t n_high) {
  constexpr const char* op = "kvq::outlier_split";
  TORCH_CHECK(is_float_input(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", shape_str(x.sizes()));
  TORCH_CHECK(n_low >= 0 && n_high >= 0, op, ": n_low and n_high must be >= 0, got ", n_low,
              " and ", n_high);
  TORCH_CHECK(n_low + n_high < x.size(-1), op, ": n_low + n_high = ", n_low + n_high,
              " must be smaller than x.size(-1) = ", x.size(-1), " so that some values stay dense");
  TORCH_CHECK(x.size(-1) <= 32767, op, ": x.size(-1) must fit int16 indices, got ", x.size(-1));
}

struct MatmulShape {
  GroupedView view;  // of the dequantized operand [..., N, K] around the grouped axis
  int64_t batch, N, K, M, n_out;
};

inline MatmulShape check_dequant_matmul_args(const at::Tensor& a, const at::Tensor& codes,
                                             const at::Tensor& scale, const at::Tensor& zero,
                                             int64_t bits, int64_t group_size, int64_t axis,
                                             bool transpose_b,
                                             const std::optional<at::Tensor>& outlier_index,
                                             const std::optional<at::Tensor>& outlier_value) {
  constexpr const char* op = "kvq::dequant_matmul";
  TORCH_CHECK(is_float_input(a.scalar_type()), op,
              ": a must be float32, float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(codes.dim() >= 2, op, ": codes must have rank >= 2, got ", codes.dim());
  const int64_t rank = codes.dim();
  const int64_t ax = normalize_axis(op, "codes", axis, rank);
  TORCH_CHECK(ax >= rank - 2, op,
              ": axis must be one of the last two dimensions (-1: groups along columns, -2: "
              "groups along rows), got ", axis);
  // Every input against a, in the order of _checks.py, so a message names the misplaced one.
  check_same_device(op, "codes", codes, "a", a);
  check_same_device(op, "scale", scale, "a", a);
  check_same_device(op, "zero", zero, "a", a);
  if (outlier_index.has_value()) check_same_device(op, "outlier_index", *outlier_index, "a", a);
  if (outlier_value.has_value()) check_same_device(op, "outlier_value", *outlier_value, "a", a);
  const GroupedView v = check_dequantize_args(op, codes, scale, zero, bits, group_size, ax,
                                              a.scalar_type());
  std::vector<int64_t> b_shape = with_axis(codes.sizes(), ax, v.n);
  const int64_t N = b_shape[rank - 2], K = b_shape[rank - 1];
  TORCH_CHECK(a.dim() == rank && a.sizes().slice(0, rank - 2) == c10::IntArrayRef(b_shape).slice(0, rank - 2),
              op, ": a must have the leading dimensions of the packed operand ",
              shape_str(c10::IntArrayRef(b_shape).slice(0, rank - 2)), ", got shape ",
              shape_str(a.sizes()));
  const int64_t inner = transpose_b ? K : N;
  TORCH_CHECK(a.size(-1) == inner, op, ": a.size(-1) = ", a.size(-1),
              " must equal the packed operand's ", transpose_b ? "columns" : "rows", " (", inner,
              ") for transpose_b=", transpose_b ? "True" : "False");
  int64_t n_out = 0;
  TORCH_CHECK(outlier_index.has_value() == outlier_value.has_value(), op,
              ": outlier_index and outlier_value must be given together");
  if (outlier_index.has_value()) {
    TORCH_CHECK(outlier_index->scalar_type() == at::kShort, op,
                ": outlier_index must be int16, got ", outlier_index->scalar_type());
    TORCH_CHECK(outlier_value->scalar_type() == a.scalar_type(), op,
                ": outlier_value must have a's dtype ", a.scalar_type(), ", got ",
                outlier_value->scalar_type());
    std::vector<int64_t> rows(b_shape.begin(), b_shape.end() - 1);
    TORCH_CHECK(outlier_index->dim() == rank &&
                    outlier_index->sizes().slice(0, rank - 1) == c10::IntArrayRef(rows),
                op, ": outlier_index must have shape ", shape_str(rows), " + [n], got ",
                shape_str(outlier_index->sizes()));
    TORCH_CHECK(outlier_value->sizes() == outlier_index->sizes(), op,
                ": outlier_value must have the shape of outlier_index ",
                shape_str(outlier_index->sizes()), ", got ", shape_str(outlier_value->sizes()));
    n_out = outlier_index->size(-1);
  }
  int64_t batch = 1;
  for (int64_t d = 0; d < rank - 2; ++d) batch *= b_shape[d];
  return {v, batch, N, K, a.size(-2), n_out};
}

}  // namespace kvq
