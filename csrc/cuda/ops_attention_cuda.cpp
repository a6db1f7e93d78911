// CUDA backend of kvq::quant_attention: the shared argument checks (attention_args.h), device
// guard, outputs and scratch from the caching allocator, and the torch-free launcher of
// attention.cu. Registered in ops_cuda.cpp's TORCH_LIBRARY_IMPL(kvq, CUDA) block.
//
// No host synchronization: the checks of attention_args.h are shape checks, and everything the
// CPU kernel derives from the widths on the host (block byte offsets, which blocks are used,
// each batch row's causal end) is derived on the device by the launcher, so a decode step can be
// captured in a CUDA graph. The one thing that cannot be done without reading the widths on the
// host is their data-dependent validation (widths in [0, 8], the pools large enough, keys and
// values agreeing on which blocks are used). It runs - with the CPU kernel's messages - only when
// the environment variable TORCHKVQ_CUDA_CHECKS=1 is set (a synchronous debug mode). Otherwise
// the kernels clamp widths into [0, 8] and skip any block that does not fit its pool or is used by
// only one of keys/values, so bad data gives wrong numbers but never an out-of-bounds read.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_args.h"
#include "launchers.h"

namespace kvq::cuda {
namespace {

DType attention_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      TORCH_CHECK(false, "kvq::quant_attention (CUDA): unsupported dtype ", t);
  }
}

bool debug_checks() {
  static const bool on = [] {
    const char* v = std::getenv("TORCHKVQ_CUDA_CHECKS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// The CPU kernel's data-dependent validation of the block widths (synchronizes: debug mode only).
void check_widths_on_host(const at::Tensor& k_bits, const at::Tensor& v_bits,
                          const at::Tensor& k_codes, const at::Tensor& v_codes,
                          int64_t bytes_per_bit) {
  const at::Tensor kb = k_bits.cpu(), vb = v_bits.cpu();
  block_offsets("k", kb, bytes_per_bit, k_codes.size(2));
  block_offsets("v", vb, bytes_per_bit, v_codes.size(2));
  const int32_t* k = kb.const_data_ptr<int32_t>();
  const int32_t* v = vb.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < kb.numel(); ++b) {
    TORCH_CHECK((k[b] == 0) == (v[b] == 0), "kvq::quant_attention: block ", b, " has k_bits ",
                k[b], " but v_bits ", v[b], "; a block is used by both or neither");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_attention(
    const at::Tensor& query_in, const at::Tensor& k_codes_in, const at::Tensor& k_scale_in,
    const at::Tensor& k_zero_in, const at::Tensor& k_bits_in, const at::Tensor& v_codes_in,
    const at::Tensor& v_scale_in, const at::Tensor& v_zero_in, const at::Tensor& v_bits_in,
    const at::Tensor& k_fp_in, const at::Tensor& v_fp_in, const at::Tensor& fp_pos_in,
    const std::optional<at::Tensor>& q_exclude_in, const std::optional<at::Tensor>& k_oi_in,
    const std::optional<at::Tensor>& k_ov_in, const std::optional<at::Tensor>& v_oi_in,
    const std::optional<at::Tensor>& v_ov_in, int64_t group_size, int64_t v_group_size,
    double scale, bool causal, bool return_stats, int64_t q_offset,
    std::optional<int64_t> window, std::optional<double> softcap) {
  const AttentionShape shp = check_quant_attention_args(
      query_in, k_codes_in, k_scale_in, k_zero_in, k_bits_in, v_codes_in, v_scale_in, v_zero_in,
      v_bits_in, k_fp_in, v_fp_in, fp_pos_in, q_exclude_in, k_oi_in, k_ov_in, v_oi_in, v_ov_in,
      group_size, v_group_size);
  check_attention_frame(q_offset, window, softcap, causal);
  TORCH_CHECK(query_in.is_cuda(), "kvq::quant_attention: query must be a CUDA tensor, got device ",
              query_in.device());
  const c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), k_codes = k_codes_in.contiguous(),
                   k_scale = k_scale_in.contiguous(), k_zero = k_zero_in.contiguous(),
                   k_bits = k_bits_in.contiguous(), v_codes = v_codes_in.contiguous(),
                   v_scale = v_scale_in.contiguous(), v_zero = v_zero_in.contiguous(),
                   v_bits = v_bits_in.contiguous(), k_fp = k_fp_in.contiguous(),
                   v_fp = v_fp_in.contiguous(), fp_pos = fp_pos_in.contiguous();
  const auto opt = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor q_exclude = opt(q_exclude_in), k_oi = opt(k_oi_in), k_ov = opt(k_ov_in),
                   v_oi = opt(v_oi_in), v_ov = opt(v_ov_in);
  if (debug_checks()) check_widths_on_host(k_bits, v_bits, k_codes, v_codes, group_size * shp.D / 8);

  const int64_t T = shp.Q + shp.F;
  at::Tensor out = at::empty({shp.B, shp.Hq, shp.L, shp.D}, query.options());
  at::Tensor lse = at::empty({shp.B, shp.Hq, shp.L}, query.options().dtype(at::kFloat));
  at::Tensor stats = return_stats
                         ? at::empty({shp.B, shp.Hkv, T}, query.options().dtype(at::kFloat))
                         : at::empty({0}, query.options().dtype(at::kFloat));

  QuantAttentionArgs a{};
  a.query = query.const_data_ptr();
  a.q_dtype = attention_dtype(query.scalar_type());
  a.k_codes = k_codes.const_data_ptr<uint8_t>();
  a.v_codes = v_codes.const_data_ptr<uint8_t>();
  a.k_pool = k_codes.size(2);
  a.v_pool = v_codes.size(2);
  a.k_scale = k_scale.const_data_ptr();
  a.k_zero = k_zero.const_data_ptr();
  a.v_scale = v_scale.const_data_ptr();
  a.v_zero = v_zero.const_data_ptr();
  a.s_dtype = attention_dtype(k_scale.scalar_type());
  a.k_bits = k_bits.const_data_ptr<int32_t>();
  a.v_bits = v_bits.const_data_ptr<int32_t>();
  a.k_fp = k_fp.const_data_ptr();
  a.v_fp = v_fp.const_data_ptr();
  a.f_dtype = attention_dtype(k_fp.scalar_type());
  a.fp_pos = fp_pos.const_data_ptr<int64_t>();
  a.q_exclude =
      q_exclude.defined() ? reinterpret_cast<const uint8_t*>(q_exclude.const_data_ptr<bool>())
                          : nullptr;
  a.n_k_out = k_oi.defined() ? k_oi.size(3) : 0;
  a.n_v_out = v_oi.defined() ? v_oi.size(3) : 0;
  a.k_outlier_index = a.n_k_out > 0 ? k_oi.const_data_ptr<int16_t>() : nullptr;
  a.k_outlier_value = a.n_k_out > 0 ? k_ov.const_data_ptr() : nullptr;
  a.v_outlier_index = a.n_v_out > 0 ? v_oi.const_data_ptr<int16_t>() : nullptr;
  a.v_outlier_value = a.n_v_out > 0 ? v_ov.const_data_ptr() : nullptr;
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr<float>();
  a.stats = return_stats ? stats.mutable_data_ptr<float>() : nullptr;
  a.B = shp.B;
  a.Hq = shp.Hq;
  a.L = shp.L;
  a.D = shp.D;
  a.Hkv = shp.Hkv;
  a.NB = shp.NB;
  a.group_size = group_size;
  a.v_group_size = v_group_size;
  a.F = shp.F;
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.return_stats = return_stats;
  a.q_offset = q_offset;
  a.window = window.value_or(0);
  a.softcap = static_cast<float>(softcap.value_or(0.0));

  QuantAttentionPlan plan{};
  TORCH_CHECK(plan_quant_attention(a, &plan) == cudaSuccess,
              "kvq::quant_attention: head_dim ", shp.D,
              " is not supported by the CUDA kernel (at most 1024, and its per-CTA buffers must "
              "fit the device's shared memory)");
  // Block table, end positions and split partials: from the caching allocator (graph-safe).
  at::Tensor workspace = at::empty({plan.workspace_bytes}, query.options().dtype(at::kByte));
  const cudaError_t err = launch_quant_attention(a, plan, workspace.mutable_data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, stats};
}

}  // namespace kvq::cuda
