// CUDA kernel of kvq::outlier_split (no torch headers: see launchers.h).
//
// Bit-identical to the CPU kernel (csrc/cpu/outliers.cpp): every vector (a row of the last axis)
// is ordered by (value, index) with NaN above everything and -0.0 equal to +0.0 (values compared
// as float32, as the CPU does after converting), and
//   * index lists the n_low smallest from the smallest up, then the n_high largest from the
//     largest down; value holds x at those indices, exactly;
//   * dense is x with each low outlier replaced by x[lo] (lo: the (n_low+1)-th smallest) and each
//     high outlier by x[hi] (hi: the (n_high+1)-th largest).
//
// One warp per vector. The order is total, so each element has a unique 64-bit key
// (order-preserving bits of the value << 32 | index), and selection is n rounds of "smallest key
// above the previous one" (a lane-local scan plus a warp min). A low outlier is then exactly an
// element whose key is below key(lo), a high one above key(hi), so dense needs no index list.
// n = n_low + n_high is small (a handful), so the O(n * K / 32) work per vector is fine; keys
// are kept in registers when K <= 256 (head dims), re-derived from memory otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps, one vector each
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr unsigned kFull = 0xffffffffu;
constexpr uint64_t kNone = ~uint64_t{0};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Order-preserving unsigned image of a float32 for the (value, index) order of the CPU kernel:
// -0.0 is folded onto +0.0 (they compare equal, so the index decides), every NaN maps above +Inf.
__device__ __forceinline__ uint32_t order_bits(float v) {
  if (v != v) return 0xffffffffu;
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ uint64_t key_of(const T* xr, int i) {
  return (static_cast<uint64_t>(order_bits(to_float(xr[i]))) << 32) | static_cast<uint32_t>(i);
}

__device__ __forceinline__ uint64_t warp_min(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = w < v ? w : v;
  }
  return v;
}

__device__ __forceinline__ uint64_t warp_max(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// CACHE > 0: K <= 32 * CACHE and lane keeps the keys of elements lane + 32 * s in registers.
// Every key is > 0 (order_bits never returns 0 for a float) and < kNone.
template <typename T, int CACHE>
__global__ void __launch_bounds__(kThreads)
    outlier_split_kernel(const T* __restrict__ x, T* __restrict__ dense,
                         int16_t* __restrict__ index, T* __restrict__ value, int64_t rows, int K,
                         int n_low, int n_high) {
  const int lane = threadIdx.x & 31;
  const int n = n_low + n_high;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       row < rows; row += num_warps) {
    const T* xr = x + row * K;
    uint64_t cache[CACHE > 0 ? CACHE : 1];
    if constexpr (CACHE > 0) {
#pragma unroll
      for (int s = 0; s < CACHE; ++s) {
        const int i = lane + 32 * s;
        cache[s] = i < K ? key_of(xr, i) : kNone;
      }
    }
    // Smallest key strictly above `prev` (above: true) or largest strictly below it (false).
    const auto select = [&](uint64_t prev, bool above) {
      uint64_t best = above ? kNone : 0;
      if constexpr (CACHE > 0) {
#pragma unroll
        for (int s = 0; s < CACHE; ++s) {
          const uint64_t k = cache[s];
          if (k == kNone) continue;
          if (above ? (k > prev && k < best) : (k < prev && k > best)) best = k;
        }
      } else {
        for (int i = lane; i < K; i += 32) {
          const uint64_t k = key_of(xr, i);
          if (above ? (k > prev && k < best) : (k < prev && k > best)) best = k;
        }
      }
      return above ? warp_min(best) : warp_max(best);
    };

    int16_t* ir = index + row * n;
    T* vr = value + row * n;
    uint64_t prev = 0, key_lo = 0, key_hi = 0;
    for (int s = 0; s <= n_low; ++s) {  // the n_low smallest, then lo
      prev = select(prev, true);
      const int i = static_cast<int>(prev & 0xffffffffu);
      if (s < n_low) {
        if (lane == 0) {
          ir[s] = static_cast<int16_t>(i);
          vr[s] = xr[i];
        }
      } else {
        key_lo = prev;
      }
    }
    prev = kNone;
    for (int s = 0; s <= n_high; ++s) {  // the n_high largest, then hi
      prev = select(prev, false);
      const int i = static_cast<int>(prev & 0xffffffffu);
      if (s < n_high) {
        if (lane == 0) {
          ir[n_low + s] = static_cast<int16_t>(i);
          vr[n_low + s] = xr[i];
        }
      } else {
        key_hi = prev;
      }
    }
    const T lo_value = xr[static_cast<int>(key_lo & 0xffffffffu)];
    const T hi_value = xr[static_cast<int>(key_hi & 0xffffffffu)];
    T* dr = dense + row * K;
    for (int i = lane; i < K; i += 32) {
      const uint64_t k = key_of(xr, i);
      dr[i] = k < key_lo ? lo_value : (k > key_hi ? hi_value : xr[i]);
    }
  }
}

template <typename T>
void split_typed(const void* x, void* dense, int16_t* index, void* value, int64_t rows, int K,
                 int n_low, int n_high, cudaStream_t stream) {
  const int64_t warps_per_block = kThreads / 32;
  int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  const T* xt = static_cast<const T*>(x);
  T* dt = static_cast<T*>(dense);
  T* vt = static_cast<T*>(value);
  if (K <= 32 * 8) {
    outlier_split_kernel<T, 8><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xt, dt, index, vt, rows, K, n_low, n_high);
  } else {
    outlier_split_kernel<T, 0><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        xt, dt, index, vt, rows, K, n_low, n_high);
  }
}

}  // namespace

cudaError_t launch_outlier_split(const void* x, DType dtype, void* dense, int16_t* index,
                                 void* value, int64_t rows, int64_t K, int64_t n_low,
                                 int64_t n_high, cudaStream_t stream) {
  if (rows < 0 || K < 1 || K > 32767 || n_low < 0 || n_high < 0 || n_low + n_high >= K) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int k = static_cast<int>(K), lo = static_cast<int>(n_low), hi = static_cast<int>(n_high);
  switch (dtype) {
    case DType::kF32:
      split_typed<float>(x, dense, index, value, rows, k, lo, hi, stream);
      return cudaSuccess;
    case DType::kF16:
      split_typed<__half>(x, dense, index, value, rows, k, lo, hi, stream);
      return cudaSuccess;
    case DType::kBF16:
      split_typed<__nv_bfloat16>(x, dense, index, value, rows, k, lo, hi, stream);
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvq::cuda
