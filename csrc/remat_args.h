// Argument validation of kvq::remat_kv (same rules, order and messages as
// src/torchkvq/_checks.py: check_remat_kv), shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "quantize_args.h"

namespace kvq {

struct RematShape {
  int64_t N, T, d, n_out, head_dim;  // head_dim 0 without RoPE
};

inline RematShape check_remat_kv_args(const at::Tensor& codes, const at::Tensor& scale,
                                      const at::Tensor& zero, int64_t bits, int64_t group_size,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& cos,
                                      const std::optional<at::Tensor>& sin, int64_t rope_dim) {
  constexpr const char* op = "kvq::remat_kv";
  TORCH_CHECK(codes.dim() == 3, op,
              ": codes must be [batch, tokens, packed channels] (rank 3), got rank ", codes.dim());
  TORCH_CHECK(is_float_input(weight.scalar_type()), op,
              ": weight must be float32, float16 or bfloat16, got ", weight.scalar_type());
  check_same_device(op, "scale", scale, "codes", codes);
  check_same_device(op, "zero", zero, "codes", codes);
  check_same_device(op, "weight", weight, "codes", codes);
  if (bias.has_value()) check_same_device(op, "bias", *bias, "codes", codes);
  if (cos.has_value()) check_same_device(op, "cos", *cos, "codes", codes);
  if (sin.has_value()) check_same_device(op, "sin", *sin, "codes", codes);
  const GroupedView v =
      check_dequantize_args(op, codes, scale, zero, bits, group_size, 2, weight.scalar_type());
  const int64_t N = codes.size(0), T = codes.size(1), d = v.n;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d, op, ": weight must be [out_features, ", d,
              "] (nn.Linear layout; in_features = the packed operand's ", d, " channels), got ",
              shape_str(weight.sizes()));
  const int64_t n_out = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias must have weight's dtype ",
                weight.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out, op, ": bias must have shape [", n_out,
                "] (one per output channel), got ", shape_str(bias->sizes()));
  }
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": cos and sin must be given together");
  if (!cos.has_value()) {
    TORCH_CHECK(rope_dim == 0, op, ": rope_dim must be 0 without cos and sin, got ", rope_dim);
    return {N, T, d, n_out, 0};
  }
  TORCH_CHECK(cos->scalar_type() == weight.scalar_type(), op, ": cos must have weight's dtype ",
              weight.scalar_type(), ", got ", cos->scalar_type());
  TORCH_CHECK(sin->scalar_type() == weight.scalar_type(), op, ": sin must have weight's dtype ",
              weight.scalar_type(), ", got ", sin->scalar_type());
  TORCH_CHECK(cos->dim() == 3 && (cos->size(0) == 1 || cos->size(0) == N) && cos->size(1) == T &&
                  cos->size(2) >= 2 && cos->size(2) % 2 == 0,
              op, ": cos must be [", N, " or 1, ", T,
              ", head_dim] with an even head_dim (the rotary table at each token's position), got ",
              shape_str(cos->sizes()));
  TORCH_CHECK(sin->sizes() == cos->sizes(), op, ": sin must have shape ", shape_str(cos->sizes()),
              " (the shape of cos), got ", shape_str(sin->sizes()));
  const int64_t hd = cos->size(2);
  TORCH_CHECK(rope_dim > 0 && rope_dim % hd == 0 && rope_dim <= n_out, op,
              ": rope_dim must be a positive multiple of head_dim ", hd, " and at most ", n_out,
              " output channels, got ", rope_dim);
  return {N, T, d, n_out, hd};
}

}  // namespace kvq
