// Torch-free entry points of the CUDA kernels (csrc/cuda/*.cu), called by csrc/cuda/ops_cuda.cpp.
// Only plain C++ types and cudaStream_t cross this boundary, so the .cu files compile with nvcc
// alone in about a second, without torch headers.
//
// Every launcher takes contiguous tensors seen as [outer, n, inner] around the grouped axis (see
// quantize_args.h) and enqueues its kernels on `stream`. It returns cudaErrorInvalidValue for
// arguments it cannot handle (the tensor glue validates first, so this signals a bug) and
// otherwise cudaSuccess; launch errors are left for the caller's cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvq::cuda {

// Element types of the inputs/outputs and of scale/zero (scale/zero: kF16 or kF32 only).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// kvq::quantize. x: [outer, n, inner] of x_dtype, n % group_size == 0, group_size % 8 == 0.
// codes: [outer, n * bits / 8, inner] uint8. scale, zero: [outer, n / group_size, inner] of
// scale_dtype (kF16 or kF32). 1 <= bits <= 8.
cudaError_t launch_quantize(const void* x, DType x_dtype, uint8_t* codes, void* scale, void* zero,
                            DType scale_dtype, int64_t outer, int64_t n, int64_t inner,
                            int64_t group_size, int bits, cudaStream_t stream);

// kvq::dequantize: the inverse, out[outer, n, inner] of out_dtype from codes/scale/zero shaped as
// above.
cudaError_t launch_dequantize(const uint8_t* codes, const void* scale, const void* zero,
                              DType scale_dtype, void* out, DType out_dtype, int64_t outer,
                              int64_t n, int64_t inner, int64_t group_size, int bits,
                              cudaStream_t stream);

// kvq::outlier_split. x, dense: [rows, K] of dtype; index: [rows, n_low + n_high] int16;
// value: [rows, n_low + n_high] of dtype. 1 <= K <= 32767, n_low, n_high >= 0,
// n_low + n_high < K. Bit-identical to the CPU kernel.
cudaError_t launch_outlier_split(const void* x, DType dtype, void* dense, int16_t* index,
                                 void* value, int64_t rows, int64_t K, int64_t n_low,
                                 int64_t n_high, cudaStream_t stream);

// kvq::dequant_matmul (see csrc/matmul_args.h for the shapes): B_hat [batch, N, K] is packed in
// `codes` with groups along K (row_groups false, axis -1: codes [batch, N, K*bits/8], scale
// [batch, N, K/group_size]) or along N (row_groups true, axis -2: codes [batch, N*bits/8, K],
// scale [batch, N/group_size, K]). a: [batch, M, transpose_b ? K : N], out: [batch, M,
// transpose_b ? N : K], both of a_dtype; outliers (optional, n_out > 0): index int16 and value
// of a_dtype, [batch, N, n_out]. Every tensor contiguous.
struct DequantMatmulArgs {
  const void* a;
  DType a_dtype;
  const uint8_t* codes;
  const void* scale;
  const void* zero;
  DType scale_dtype;
  const int16_t* outlier_index;  // nullptr when n_out == 0
  const void* outlier_value;
  int64_t n_out;
  void* out;
  int64_t batch, M, N, K, group_size;
  int bits;
  bool row_groups;
  bool transpose_b;
};

// Bytes of float32 scratch launch_dequant_matmul needs (0 when it needs none). Depends only on
// the shapes and the current device, never on data.
int64_t dequant_matmul_workspace_bytes(const DequantMatmulArgs& args);

// `workspace` must hold dequant_matmul_workspace_bytes(args) bytes (may be nullptr if 0).
cudaError_t launch_dequant_matmul(const DequantMatmulArgs& args, void* workspace,
                                  cudaStream_t stream);

// kvq::remat_kv (checks: csrc/remat_args.h). codes [N, T, d * bits / 8] uint8 packed per token;
// scale, zero [N, T, d / group_size] of scale_dtype; weight [n_out, d], bias [n_out] (or
// nullptr), cos/sin [N or 1, T, head_dim] (or nullptr, rope_dim 0), out [N, T, n_out]: all of
// w_dtype, every tensor contiguous.
struct RematKvArgs {
  const uint8_t* codes;
  const void* scale;
  const void* zero;
  DType scale_dtype;
  const void* weight;
  const void* bias;
  const void* cos;
  const void* sin;
  DType w_dtype;
  void* out;
  int64_t N, T, d, n_out, group_size, head_dim, rope_dim;
  int bits;
  bool cos_batched;  // cos/sin have N rows (else one row for the whole batch)
};

// Bytes of float32 scratch launch_remat_kv needs (0 for a float32 output).
int64_t remat_kv_workspace_bytes(const RematKvArgs& args);

cudaError_t launch_remat_kv(const RematKvArgs& args, void* workspace, cudaStream_t stream);

// kvq::quant_attention (layout: src/torchkvq/ops.py quant_attention, checks:
// csrc/attention_args.h). Every tensor contiguous; optional ones are nullptr when absent.
struct QuantAttentionArgs {
  const void* query;  // [B, Hq, L, D] of q_dtype
  DType q_dtype;
  const uint8_t* k_codes;  // [B, Hkv, k_pool]
  const uint8_t* v_codes;  // [B, Hkv, v_pool]
  int64_t k_pool, v_pool;
  const void* k_scale;  // [B, Hkv, NB, D] of s_dtype (kF16 or kF32)
  const void* k_zero;
  const void* v_scale;  // [B, Hkv, NB * G, D / VG]
  const void* v_zero;
  DType s_dtype;
  const int32_t* k_bits;  // [NB], device memory: never read on the host
  const int32_t* v_bits;
  const void* k_fp;  // [B, Hkv, F, D] of f_dtype
  const void* v_fp;
  DType f_dtype;
  const int64_t* fp_pos;     // [B, F]
  const uint8_t* q_exclude;  // [B, NB * G] bool, or nullptr
  const int16_t* k_outlier_index;  // [B, Hkv, NB * G, n_k_out], or nullptr
  const void* k_outlier_value;     // same shape, f_dtype
  const int16_t* v_outlier_index;
  const void* v_outlier_value;
  int64_t n_k_out, n_v_out;
  void* out;     // [B, Hq, L, D] of q_dtype
  float* lse;    // [B, Hq, L]
  float* stats;  // [B, Hkv, NB * G + F] when return_stats, else nullptr
  int64_t B, Hq, L, D, Hkv, NB, group_size, v_group_size, F;
  float scale;
  bool causal;
  bool return_stats;
  int64_t q_offset;  // position of quantized token 0
  int64_t window;    // positions a query sees back from its own, itself included; 0: all
  float softcap;     // scores become softcap * tanh(score / softcap); 0: no capping
};

// How launch_quant_attention runs a problem: derived from the shapes and the current device
// only (never from data), so a call can be captured in a CUDA graph.
struct QuantAttentionPlan {
  int64_t workspace_bytes;  // device scratch the caller allocates (block table, partials)
  int64_t splits;           // token ranges per (batch, kv head), merged by log-sum-exp
  int64_t row_tiles;        // CTAs along the query rows of one kv head's group
  int rows_per_cta;         // query rows (of g * L) one CTA scores against each tile
  int warps;                // warps per CTA
  int stages;               // cp.async pipeline depth per warp
  int fp_step;              // full-precision slots per pipeline step
  int smem_bytes;           // dynamic shared memory per CTA
};

// Fills *plan; cudaErrorInvalidValue when the shape is not supported (head_dim above 1024 or
// too large for the device's shared memory).
cudaError_t plan_quant_attention(const QuantAttentionArgs& args, QuantAttentionPlan* plan);

// Enqueues the whole op on `stream` without any host synchronization: a prep kernel derives the
// block byte offsets, the list of used blocks and each batch row's causal end position on the
// device; the attention kernel; a log-sum-exp merge when plan.splits > 1; and with return_stats
// a second scoring pass that needs the final lse. Widths outside [0, 8] and blocks that do not
// fit the pool are treated as unused (never read out of bounds); the exact validation needs
// the widths on the host (see ops_attention_cuda.cpp, TORCHKVQ_CUDA_CHECKS).
cudaError_t launch_quant_attention(const QuantAttentionArgs& args, const QuantAttentionPlan& plan,
                                   void* workspace, cudaStream_t stream);

}  // namespace kvq::cuda
