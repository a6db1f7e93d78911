// CUDA kernels of kvq::quantize and kvq::dequantize (no torch headers: see launchers.h).
//
// Same view and the same float32 math as the CPU kernel (csrc/cpu/quantize.cpp,
// csrc/cpu/quantize_math.h), bit for bit: a tensor is [outer, n, inner] around the grouped axis;
// inner == 1 means each group is a contiguous run of group_size elements (per-token), inner > 1
// that each group is a column of a [group_size, inner] tile (per-channel).
//
// Bit-exactness rules: every rounding step is an explicit _rn intrinsic (no FMA contraction, true
// IEEE division, no fast-math), scale and zero are rounded to the scale dtype before they are
// used, and codes are round-half-even via rintf. Packing is the LSB-first stream of bitpack.h:
// 8 codes form a 64-bit word whose low `bits` bytes are stored in order; per-channel, byte k of a
// column's word goes to packed row k of its 8-row chunk.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 256;            // a multiple of 32: warps are never partial
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover anything beyond

int64_t num_blocks(int64_t threads) {
  const int64_t b = (threads + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

// ---- element conversions ---------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw bit patterns of 16-bit elements, for vectorized loads and stores.
template <typename T>
__device__ __forceinline__ float from_bits16(uint32_t b);
template <>
__device__ __forceinline__ float from_bits16<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <>
__device__ __forceinline__ float from_bits16<__nv_bfloat16>(uint32_t b) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}
__device__ __forceinline__ uint32_t to_bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Loads 8 consecutive elements as float; `vec` says p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vec, float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const uint4 a = reinterpret_cast<const uint4*>(p)[0];
      const uint4 b = reinterpret_cast<const uint4*>(p)[1];
      const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = __uint_as_float(w[j]);
    } else {
      const uint4 a = *reinterpret_cast<const uint4*>(p);
      const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = from_bits16<T>(w[j / 2] >> (16 * (j % 2)));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_float(p[j]);
  }
}

// Stores 8 floats converted to T at p; `vec` says p is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store8(T* p, bool vec, const float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<uint4*>(p)[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]),
                                                  __float_as_uint(v[2]), __float_as_uint(v[3]));
      reinterpret_cast<uint4*>(p)[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]),
                                                  __float_as_uint(v[6]), __float_as_uint(v[7]));
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = to_bits16(from_float<T>(v[2 * i])) | (to_bits16(from_float<T>(v[2 * i + 1])) << 16);
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = from_float<T>(v[j]);
  }
}

// Byte k of `word` is stream byte k (little endian), so a run of `bits` packed bytes is the low
// `bits` bytes of the word. `vec` says dst is 8-byte aligned; with offsets that are multiples of
// `bits`, the 2-, 4- and 8-byte accesses below are then naturally aligned.
__device__ __forceinline__ void store_bytes(uint8_t* dst, uint64_t word, int bits, bool vec) {
  if (vec) {
    switch (bits) {
      case 8:
        *reinterpret_cast<uint2*>(dst) =
            make_uint2(static_cast<uint32_t>(word), static_cast<uint32_t>(word >> 32));
        return;
      case 4:
        *reinterpret_cast<uint32_t*>(dst) = static_cast<uint32_t>(word);
        return;
      case 2:
        *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(word);
        return;
      default:
        break;
    }
  }
  for (int k = 0; k < bits; ++k) dst[k] = static_cast<uint8_t>(word >> (8 * k));
}

__device__ __forceinline__ uint64_t load_bytes(const uint8_t* src, int bits, bool vec) {
  if (vec) {
    switch (bits) {
      case 8: {
        const uint2 u = *reinterpret_cast<const uint2*>(src);
        return static_cast<uint64_t>(u.x) | (static_cast<uint64_t>(u.y) << 32);
      }
      case 4:
        return *reinterpret_cast<const uint32_t*>(src);
      case 2:
        return *reinterpret_cast<const uint16_t*>(src);
      default:
        break;
    }
  }
  uint64_t word = 0;
  for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(src[k]) << (8 * k);
  return word;
}

// ---- the math (mirror of csrc/cpu/quantize_math.h) ------------------------------------------

struct Params {
  float scale;  // stored scale, already rounded to the scale dtype
  float zero;   // stored zero point (the group minimum), rounded likewise
  float inv;    // 1 / scale, or 0 for a constant group so every code is 0
};

__device__ __forceinline__ bool is_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

template <typename S>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<float>(float v) { return v; }
template <>
__device__ __forceinline__ float round_to<__half>(float v) {
  return __half2float(__float2half_rn(v));
}

// `finite` is false when any element of the group is NaN or +-Inf; such a group, or one whose
// rounded scale/zero is not finite, is stored as NaN with inv 0 (all its codes are then 0).
template <typename S>
__device__ __forceinline__ Params group_params(float mn, float mx, bool finite, float qmax) {
  const float scale = round_to<S>(__fdiv_rn(__fsub_rn(mx, mn), qmax));
  const float zero = round_to<S>(mn);
  if (!finite || !is_finite(scale) || !is_finite(zero)) {
    const float nan = __uint_as_float(0x7fc00000u);
    return {nan, nan, 0.f};
  }
  return {scale, zero, scale > 0.f ? __fdiv_rn(1.f, scale) : 0.f};
}

__device__ __forceinline__ uint32_t encode(float x, float zero, float inv, float qmax) {
  float v = __fmul_rn(__fsub_rn(x, zero), inv);
  v = v < 0.f ? 0.f : (v > qmax ? qmax : v);
  // NaN (x - NaN zero, or 0 * Inf) encodes as 0, like the CPU kernel; rintf rounds half to even.
  return v == v ? static_cast<uint32_t>(rintf(v)) : 0u;
}

__device__ __forceinline__ float decode(uint32_t code, float scale, float zero) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), scale), zero);
}

__device__ __forceinline__ void update_minmax(float v, float& mn, float& mx, bool& finite) {
  mn = v < mn ? v : mn;
  mx = v > mx ? v : mx;
  finite = finite && is_finite(v);
}

template <typename S>
__device__ __forceinline__ void store_params(const Params& p, S* scale, S* zero) {
  *scale = from_float<S>(p.scale);
  *zero = from_float<S>(p.zero);
}

// ---- kernels ---------------------------------------------------------------------------------

// Per-token quantize (inner == 1). A team of 2^lanes_log2 lanes (<= 32, <= chunks per group)
// quantizes one group: each lane takes every team-th chunk of 8 elements, the team reduces
// min/max with xor shuffles, then each lane encodes and packs its chunks into `bits` bytes.
// The loop runs per warp so every lane reaches every shuffle.
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    quantize_run_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                        S* __restrict__ scale, S* __restrict__ zero, int64_t num_groups,
                        int64_t group_size, int bits, int lanes_log2, bool vec_x,
                        bool vec_codes) {
  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & 31;
  const int member = lane & (lanes - 1);
  const int64_t teams_per_warp = 32 >> lanes_log2;
  const int64_t chunks = group_size / 8;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       warp * teams_per_warp < num_groups; warp += num_warps) {
    const int64_t g = warp * teams_per_warp + (lane >> lanes_log2);
    const bool valid = g < num_groups;
    const T* xg = x + (valid ? g : 0) * group_size;

    float mn = __uint_as_float(0x7f800000u), mx = -mn;  // +Inf, -Inf
    bool finite = true;
    if (valid) {
      for (int64_t c = member; c < chunks; c += lanes) {
        float v[8];
        load8(xg + c * 8, vec_x, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) update_minmax(v[j], mn, mx, finite);
      }
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {  // stays inside the aligned team
      const float other_mn = __shfl_xor_sync(0xffffffffu, mn, offset);
      const float other_mx = __shfl_xor_sync(0xffffffffu, mx, offset);
      const int other_finite = __shfl_xor_sync(0xffffffffu, static_cast<int>(finite), offset);
      mn = other_mn < mn ? other_mn : mn;
      mx = other_mx > mx ? other_mx : mx;
      finite = finite && other_finite != 0;
    }
    if (!valid) continue;

    const Params p = group_params<S>(mn, mx, finite, qmax);
    if (member == 0) store_params(p, scale + g, zero + g);
    uint8_t* cg = codes + g * chunks * bits;
    for (int64_t c = member; c < chunks; c += lanes) {
      float v[8];
      load8(xg + c * 8, vec_x, v);
      uint64_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j)
        word |= static_cast<uint64_t>(encode(v[j], p.zero, p.inv, qmax)) << (j * bits);
      store_bytes(cg + c * bits, word, bits, vec_codes);
    }
  }
}

// Per-channel quantize (inner > 1): one thread per group column i = t * inner + w (group tile t,
// column w), so neighbouring threads touch neighbouring columns and every access is coalesced.
// scale/zero are [outer * groups, inner], i.e. indexed by i itself.
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    quantize_cols_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                         S* __restrict__ scale, S* __restrict__ zero, int64_t num_cols,
                         int64_t inner, int64_t group_size, int bits) {
  const int64_t chunks = group_size / 8;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_cols;
       i += stride) {
    const int64_t t = i / inner;
    const int64_t w = i - t * inner;
    const T* xc = x + t * group_size * inner + w;  // element r of the column: xc[r * inner]

    float mn = to_float(xc[0]), mx = mn;
    bool finite = true;
    for (int64_t r = 0; r < group_size; ++r) update_minmax(to_float(xc[r * inner]), mn, mx, finite);

    const Params p = group_params<S>(mn, mx, finite, qmax);
    store_params(p, scale + i, zero + i);
    uint8_t* cc = codes + t * chunks * bits * inner + w;  // packed row k: cc[k * inner]
    for (int64_t c = 0; c < chunks; ++c) {
      uint64_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float v = to_float(xc[(c * 8 + j) * inner]);
        word |= static_cast<uint64_t>(encode(v, p.zero, p.inv, qmax)) << (j * bits);
      }
      for (int k = 0; k < bits; ++k)
        cc[(c * bits + k) * inner] = static_cast<uint8_t>(word >> (8 * k));
    }
  }
}

// Per-token dequantize (inner == 1): one thread per chunk q of 8 codes (bytes [q*bits,
// (q+1)*bits)), writing out[8q, 8q + 8).
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    dequantize_run_kernel(const uint8_t* __restrict__ codes, const S* __restrict__ scale,
                          const S* __restrict__ zero, T* __restrict__ out, int64_t num_chunks,
                          int64_t chunks_per_group, int bits, bool vec_codes, bool vec_out) {
  const uint32_t mask = (1u << bits) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < num_chunks;
       q += stride) {
    const int64_t g = q / chunks_per_group;
    const float s = to_float(scale[g]);
    const float z = to_float(zero[g]);
    const uint64_t word = load_bytes(codes + q * bits, bits, vec_codes);
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = decode(static_cast<uint32_t>(word >> (j * bits)) & mask, s, z);
    store8(out + q * 8, vec_out, v);
  }
}

// Per-channel dequantize (inner > 1): one thread per (chunk q, column w), i = q * inner + w.
// Chunk q covers packed rows [q*bits, (q+1)*bits) and output rows [8q, 8q + 8); its group tile is
// q / chunks_per_group.
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    dequantize_cols_kernel(const uint8_t* __restrict__ codes, const S* __restrict__ scale,
                           const S* __restrict__ zero, T* __restrict__ out, int64_t total,
                           int64_t inner, int64_t chunks_per_group, int bits) {
  const uint32_t mask = (1u << bits) - 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t q = i / inner;
    const int64_t w = i - q * inner;
    const int64_t p = (q / chunks_per_group) * inner + w;  // scale/zero index
    const float s = to_float(scale[p]);
    const float z = to_float(zero[p]);
    const uint8_t* src = codes + q * bits * inner + w;
    uint64_t word = 0;
    for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(src[k * inner]) << (8 * k);
    T* dst = out + q * 8 * inner + w;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      dst[j * inner] = from_float<T>(decode(static_cast<uint32_t>(word >> (j * bits)) & mask, s, z));
  }
}

// ---- launchers -------------------------------------------------------------------------------

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

bool valid_shape(int64_t outer, int64_t n, int64_t inner, int64_t group_size, int bits) {
  return bits >= 1 && bits <= 8 && group_size > 0 && group_size % 8 == 0 && outer > 0 && n > 0 &&
         inner > 0 && n % group_size == 0;
}

template <typename T, typename S>
void quantize_typed(const T* x, uint8_t* codes, S* scale, S* zero, int64_t outer, int64_t n,
                    int64_t inner, int64_t group_size, int bits, cudaStream_t stream) {
  const int64_t num_groups = outer * (n / group_size);
  if (inner == 1) {
    const int64_t chunks = group_size / 8;
    int lanes_log2 = 0;  // largest power of two <= min(32, chunks)
    while (lanes_log2 < 5 && (int64_t{2} << lanes_log2) <= chunks) ++lanes_log2;
    const int64_t teams_per_warp = 32 >> lanes_log2;
    const int64_t threads = (num_groups + teams_per_warp - 1) / teams_per_warp * 32;
    quantize_run_kernel<T, S><<<num_blocks(threads), kThreads, 0, stream>>>(
        x, codes, scale, zero, num_groups, group_size, bits, lanes_log2, aligned(x, 16),
        aligned(codes, 8));
  } else {
    const int64_t num_cols = num_groups * inner;
    quantize_cols_kernel<T, S><<<num_blocks(num_cols), kThreads, 0, stream>>>(
        x, codes, scale, zero, num_cols, inner, group_size, bits);
  }
}

template <typename T, typename S>
void dequantize_typed(const uint8_t* codes, const S* scale, const S* zero, T* out, int64_t outer,
                      int64_t n, int64_t inner, int64_t group_size, int bits,
                      cudaStream_t stream) {
  const int64_t num_chunks = outer * (n / 8);
  const int64_t chunks_per_group = group_size / 8;
  if (inner == 1) {
    dequantize_run_kernel<T, S><<<num_blocks(num_chunks), kThreads, 0, stream>>>(
        codes, scale, zero, out, num_chunks, chunks_per_group, bits, aligned(codes, 8),
        aligned(out, 16));
  } else {
    const int64_t total = num_chunks * inner;
    dequantize_cols_kernel<T, S><<<num_blocks(total), kThreads, 0, stream>>>(
        codes, scale, zero, out, total, inner, chunks_per_group, bits);
  }
}

template <typename T>
cudaError_t quantize_with_scale(const void* x, uint8_t* codes, void* scale, void* zero,
                                DType scale_dtype, int64_t outer, int64_t n, int64_t inner,
                                int64_t group_size, int bits, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  switch (scale_dtype) {
    case DType::kF16:
      quantize_typed(xt, codes, static_cast<__half*>(scale), static_cast<__half*>(zero), outer, n,
                     inner, group_size, bits, stream);
      return cudaSuccess;
    case DType::kF32:
      quantize_typed(xt, codes, static_cast<float*>(scale), static_cast<float*>(zero), outer, n,
                     inner, group_size, bits, stream);
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dequantize_with_scale(const uint8_t* codes, const void* scale, const void* zero,
                                  DType scale_dtype, void* out, int64_t outer, int64_t n,
                                  int64_t inner, int64_t group_size, int bits,
                                  cudaStream_t stream) {
  T* ot = static_cast<T*>(out);
  switch (scale_dtype) {
    case DType::kF16:
      dequantize_typed(codes, static_cast<const __half*>(scale), static_cast<const __half*>(zero),
                       ot, outer, n, inner, group_size, bits, stream);
      return cudaSuccess;
    case DType::kF32:
      dequantize_typed(codes, static_cast<const float*>(scale), static_cast<const float*>(zero),
                       ot, outer, n, inner, group_size, bits, stream);
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_quantize(const void* x, DType x_dtype, uint8_t* codes, void* scale, void* zero,
                            DType scale_dtype, int64_t outer, int64_t n, int64_t inner,
                            int64_t group_size, int bits, cudaStream_t stream) {
  if (!valid_shape(outer, n, inner, group_size, bits)) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case DType::kF32:
      return quantize_with_scale<float>(x, codes, scale, zero, scale_dtype, outer, n, inner,
                                        group_size, bits, stream);
    case DType::kF16:
      return quantize_with_scale<__half>(x, codes, scale, zero, scale_dtype, outer, n, inner,
                                         group_size, bits, stream);
    case DType::kBF16:
      return quantize_with_scale<__nv_bfloat16>(x, codes, scale, zero, scale_dtype, outer, n,
                                                inner, group_size, bits, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize(const uint8_t* codes, const void* scale, const void* zero,
                              DType scale_dtype, void* out, DType out_dtype, int64_t outer,
                              int64_t n, int64_t inner, int64_t group_size, int bits,
                              cudaStream_t stream) {
  if (!valid_shape(outer, n, inner, group_size, bits)) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kF32:
      return dequantize_with_scale<float>(codes, scale, zero, scale_dtype, out, outer, n, inner,
                                          group_size, bits, stream);
    case DType::kF16:
      return dequantize_with_scale<__half>(codes, scale, zero, scale_dtype, out, outer, n, inner,
                                           group_size, bits, stream);
    case DType::kBF16:
      return dequantize_with_scale<__nv_bfloat16>(codes, scale, zero, scale_dtype, out, outer, n,
                                                  inner, group_size, bits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvq::cuda
