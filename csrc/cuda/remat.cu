// CUDA kernel of kvq::remat_kv (no torch headers: see launchers.h).
//
// out[n, t, :] = X_hat[n, t, :] @ W^T + bias, RoPE on the first rope_dim outputs, with X packed
// per token (groups of group_size channels along d). A CTA owns a [32 tokens, 64 outputs] tile
// and walks d in chunks of 16: it dequantizes the [32, 16] X_hat chunk straight from the codes
// into shared memory (float32: code * scale, then + zero, as the CPU kernel) next to the [16, 64]
// weight chunk, and every thread accumulates a 2 x 4 sub-tile in float32 registers. X_hat never
// leaves shared memory.
//
// The rotary pairs (i, i + head_dim/2) of a head may fall in different CTAs, so the GEMM kernel
// writes float32 results (+ bias): into `out` itself when out is float32, else into the
// caller's float32 workspace; a second elementwise kernel rotates each pair once and casts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem.cuh"
#include "launchers.h"

namespace kvq::cuda {
namespace {

constexpr int kTM = 32;   // tokens per CTA
constexpr int kTN = 64;   // outputs per CTA
constexpr int kTK = 16;   // reduction chunk
constexpr int kThreads = 256;

// Code j of a token's LSB-first bit stream (docs/format.md); a code spans at most two bytes.
__device__ __forceinline__ uint32_t code_at(const uint8_t* row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  uint32_t v = row[bit >> 3];
  if ((bit & 7) + bits > 8) v |= static_cast<uint32_t>(row[(bit >> 3) + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1);
}

__global__ void remat_gemm_kernel(RematKvArgs a, float* acc) {
  __shared__ float xs[kTM][kTK + 1];
  __shared__ float ws[kTK][kTN + 1];
  const int64_t n = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * kTM,
                o0 = static_cast<int64_t>(blockIdx.y) * kTN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row_bytes = a.d * a.bits / 8, groups = a.d / a.group_size;
  float sum[2][4] = {{0.f}};
  for (int64_t c0 = 0; c0 < a.d; c0 += kTK) {
    for (int e = threadIdx.x; e < kTM * kTK; e += kThreads) {
      const int r = e / kTK, c = e % kTK;
      const int64_t t = t0 + r, ch = c0 + c;
      float v = 0.f;
      if (t < a.T && ch < a.d) {
        const int64_t row = n * a.T + t, g = row * groups + ch / a.group_size;
        const float q = static_cast<float>(code_at(a.codes + row * row_bytes, ch, a.bits));
        v = q * load_elem(a.scale, g, a.scale_dtype) + load_elem(a.zero, g, a.scale_dtype);
      }
      xs[r][c] = v;
    }
    for (int e = threadIdx.x; e < kTK * kTN; e += kThreads) {
      const int c = e / kTN, o = e % kTN;
      const int64_t ch = c0 + c, oo = o0 + o;
      ws[c][o] = (ch < a.d && oo < a.n_out) ? load_elem(a.weight, oo * a.d + ch, a.w_dtype) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < kTK; ++c) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[i][j] += xs[ty * 2 + i][c] * ws[c][tx * 4 + j];
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i) {
    const int64_t t = t0 + ty * 2 + i;
    if (t >= a.T) continue;
    for (int j = 0; j < 4; ++j) {
      const int64_t o = o0 + tx * 4 + j;
      if (o >= a.n_out) continue;
      float v = sum[i][j];
      if (a.bias != nullptr) v += load_elem(a.bias, o, a.w_dtype);
      acc[(n * a.T + t) * a.n_out + o] = v;
    }
  }
}

// One thread per output element of the non-rotated part, or per rotary pair of the key part.
__global__ void remat_rope_cast_kernel(RematKvArgs a, const float* acc, int64_t pairs,
                                       int64_t plain_per_row) {
  const int64_t rows = a.N * a.T;
  const int64_t per_row = pairs + plain_per_row;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * per_row) return;
  const int64_t row = idx / per_row, k = idx % per_row;
  const float* y = acc + row * a.n_out;
  if (k < pairs) {
    const int64_t hd = a.head_dim, half = hd / 2, h = k / half, i = k % half;
    const int64_t n = row / a.T, t = row % a.T;
    const int64_t crow = ((a.cos_batched ? n : 0) * a.T + t) * hd;
    const float x1 = y[h * hd + i], x2 = y[h * hd + i + half];
    const float c1 = load_elem(a.cos, crow + i, a.w_dtype), s1 = load_elem(a.sin, crow + i, a.w_dtype);
    const float c2 = load_elem(a.cos, crow + i + half, a.w_dtype),
                s2 = load_elem(a.sin, crow + i + half, a.w_dtype);
    // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): the reference's expression.
    store_elem(a.out, row * a.n_out + h * hd + i, a.w_dtype, __fsub_rn(__fmul_rn(x1, c1), __fmul_rn(x2, s1)));
    store_elem(a.out, row * a.n_out + h * hd + i + half, a.w_dtype,
               __fadd_rn(__fmul_rn(x2, c2), __fmul_rn(x1, s2)));
  } else {
    const int64_t o = a.rope_dim + (k - pairs);
    store_elem(a.out, row * a.n_out + o, a.w_dtype, y[o]);
  }
}

}  // namespace

int64_t remat_kv_workspace_bytes(const RematKvArgs& a) {
  // float32 results go straight into a float32 output; other dtypes need float32 scratch.
  return a.w_dtype == DType::kF32 ? 0 : a.N * a.T * a.n_out * static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_remat_kv(const RematKvArgs& a, void* workspace, cudaStream_t stream) {
  if (a.bits < 1 || a.bits > 8 || a.group_size <= 0 || a.d % a.group_size != 0 || a.N <= 0 ||
      a.T <= 0 || a.n_out <= 0 || (a.rope_dim > 0 && (a.head_dim < 2 || a.head_dim % 2 != 0 ||
                                                        a.rope_dim % a.head_dim != 0)))
    return cudaErrorInvalidValue;
  const bool direct = a.w_dtype == DType::kF32;
  if (!direct && workspace == nullptr) return cudaErrorInvalidValue;
  float* acc = direct ? static_cast<float*>(a.out) : static_cast<float*>(workspace);
  const dim3 grid(static_cast<unsigned>((a.T + kTM - 1) / kTM),
                  static_cast<unsigned>((a.n_out + kTN - 1) / kTN), static_cast<unsigned>(a.N));
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidValue;
  remat_gemm_kernel<<<grid, kThreads, 0, stream>>>(a, acc);
  // In place when acc is the output: each thread reads then writes only its own pair/element.
  const int64_t pairs = a.rope_dim / 2;
  const int64_t plain = direct ? 0 : a.n_out - a.rope_dim;
  const int64_t total = a.N * a.T * (pairs + plain);
  if (total > 0) {
    const int threads = 256;
    remat_rope_cast_kernel<<<static_cast<unsigned>((total + threads - 1) / threads), threads, 0,
                             stream>>>(a, acc, pairs, plain);
  }
  return cudaSuccess;
}

}  // namespace kvq::cuda
