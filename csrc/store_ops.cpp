// kvq::write_tokens: write new tokens into a store's preallocated full-precision slots.
//
// The store's tensors keep their addresses and shapes while new tokens arrive, so a decode step
// (write, then attend) is a static-shape graph under torch.compile. Registered as
// CompositeExplicitAutograd: the same ATen code is the kernel on every device.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <utility>

#include "quantize_args.h"

namespace kvq {
namespace {

void write_tokens(at::Tensor& k_fp, at::Tensor& v_fp, at::Tensor& fp_pos, const at::Tensor& key,
                  const at::Tensor& value, const at::Tensor& slots, const at::Tensor& positions) {
  constexpr const char* op = "kvq::write_tokens";
  TORCH_CHECK(k_fp.dim() == 4 && v_fp.sizes() == k_fp.sizes(), op,
              ": k_fp and v_fp must be [batch, kv_heads, slots, head_dim] of one shape, got ",
              shape_str(k_fp.sizes()), " and ", shape_str(v_fp.sizes()));
  TORCH_CHECK(is_float_input(k_fp.scalar_type()) && v_fp.scalar_type() == k_fp.scalar_type(), op,
              ": k_fp and v_fp must be float32, float16 or bfloat16 of one dtype, got ",
              k_fp.scalar_type(), " and ", v_fp.scalar_type());
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"v_fp", &v_fp}, {"fp_pos", &fp_pos}, {"key", &key}, {"value", &value}, {"slots", &slots},
      {"positions", &positions}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == k_fp.device(), op, ": ", name, " is on ", t->device(),
                " but k_fp is on ", k_fp.device(), "; move every input to one device");
  }
  TORCH_CHECK(k_fp.is_contiguous() && v_fp.is_contiguous() && fp_pos.is_contiguous(), op,
              ": the store's tensors must be contiguous");
  const int64_t B = k_fp.size(0), H = k_fp.size(1), F = k_fp.size(2), D = k_fp.size(3);
  TORCH_CHECK(key.dim() == 4 && key.size(0) == B && key.size(1) == H && key.size(3) == D &&
                  value.sizes() == key.sizes(),
              op, ": key and value must be [", B, ", ", H, ", n, ", D, "] of one shape, got ",
              shape_str(key.sizes()), " and ", shape_str(value.sizes()));
  const int64_t n = key.size(2);
  TORCH_CHECK(is_float_input(key.scalar_type()) && is_float_input(value.scalar_type()), op,
              ": key and value must be float32, float16 or bfloat16");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == n, op,
              ": slots must be int64 [", n, "], got ", slots.scalar_type(), " ",
              shape_str(slots.sizes()));
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 &&
                  positions.size(0) == B && positions.size(1) == n,
              op, ": positions must be int64 [", B, ", ", n, "], got ", positions.scalar_type(),
              " ", shape_str(positions.sizes()));
  TORCH_CHECK(fp_pos.scalar_type() == at::kLong && fp_pos.dim() == 2 && fp_pos.size(0) == B &&
                  fp_pos.size(1) == F,
              op, ": fp_pos must be int64 [", B, ", ", F, "], got ", fp_pos.scalar_type(), " ",
              shape_str(fp_pos.sizes()));
  // A slot out of range would be a device-side assert on CUDA; on the CPU it is checked here
  // (reading a device tensor would synchronize every decode step).
  if (slots.device().is_cpu() && n > 0) {
    const int64_t lo = slots.min().item<int64_t>(), hi = slots.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < F, op, ": slots must be in [0, ", F, ") (the slots k_fp holds), got ",
                lo, "..", hi);
  }
  k_fp.index_copy_(2, slots, key.to(k_fp.scalar_type()));
  v_fp.index_copy_(2, slots, value.to(v_fp.scalar_type()));
  fp_pos.index_copy_(1, slots, positions);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CompositeExplicitAutograd, m) { m.impl("write_tokens", &write_tokens); }

}  // namespace kvq
