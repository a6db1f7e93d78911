// CUDA kernels of kvq::quant_attention (no torch headers: see launchers.h).
//
// Flash-style attention over a compressed store, the same algorithm as the CPU kernel
// (csrc/cpu/attention.cpp) laid out for the GPU:
//
// * prep_kernel (grid B): derives on the device what the CPU reads on the host - each block's
//   byte offset in the pools (a prefix sum of the widths), the compact list of used blocks and
//   each batch row's causal end position - so the op never synchronizes with the host and can
//   be captured in a CUDA graph. Widths are clamped to [0, 8] and a block that does not fit its
//   pool, or whose key/value widths disagree on being used, is treated as unused: bad data can
//   never make a kernel read out of bounds. (The CPU's exact validation needs the widths on the
//   host; ops_attention_cuda.cpp runs it only with TORCHKVQ_CUDA_CHECKS=1.)
// * attention_kernel (grid B * Hkv * splits * row_tiles, 4 warps): one CTA per (batch, kv head,
//   token range, tile of RT query rows). For decode the RT rows are the g query heads of the kv
//   head's group, so each dequantized tile is shared by the whole group. The token range - the
//   used blocks then the fp-slot chunks, split evenly on the device - is dealt to the warps tile
//   by tile (a quantized block of G tokens, or a chunk of fp slots). A warp walks its tiles in
//   steps of 8 tokens through a private cp.async ring of `stages` buffers: packed codes (16-byte
//   copies when aligned), value scales/zeros, the block's key scales/zeros at its first step,
//   exclusion flags or fp positions, outliers. Per step the warp
//     1. dequantizes the keys in registers (lane = CPL contiguous channels, all 8 tokens; codes
//        are transposed out of the per-channel byte rows with byte permutes) and forms RT x 8
//        partial dot products, reduce-scattered across the warp (xor butterflies that halve the
//        live values each round);
//     2. adds the key outliers as score corrections (q[c] * value: the score is linear in the
//        key), soft-caps the scores if asked, masks (excluded / empty / causal / out of the
//        sliding window; quantized token i sits at position q_offset + i), updates the online
//        softmax of each row;
//     3. dequantizes the values (lane = channels, codes at arbitrary bit offsets read with funnel
//        shifts) and accumulates P.V in float32 registers; value outliers go to a per-warp
//        shared accumulator, one lane per row in (token, index) order (deterministic).
//   The warps' states are merged in shared memory; with one split the CTA writes out/lse, else
//   partial (max, sum, acc) rows.
// Sizes: RT (1/2/4/8 rows) x CPL (2/4/8 channels per lane unit) x NU (1/2/4 units per lane) are
// compile-time, picked from the group size and head_dim (<= 1024); dtypes, widths, group sizes
// and outlier counts are runtime (uniform branches).
// * merge_kernel: log-sum-exp merge of the splits (one warp per query row).
// * With return_stats, attention_kernel runs again in stats mode (scores only, no values) with
//   the final lse: p = exp(s - lse), max over the group's rows via atomicMax on the float bits
//   (p >= 0) into a zeroed stats tensor.
//
// Scores are kept in the log2 domain (queries pre-scaled by scale * log2(e)), accumulation is
// float32 throughout; results differ from the CPU kernel only by float32 rounding order.
//
// Performance model (decode, not yet measured on a GPU): each byte of codes/scales is read from
// global memory once per CTA, with up to (stages - 1) steps per warp in flight (4-bit, D = 128:
// ~1.1 KB per step, ~3 KB per warp, ~25 KB per SM at 2 CTAs/SM - about what HBM3 needs per SM).
// The instruction count per 8 tokens (~0.8-1k per warp for D = 128, g = 4) is of the same order
// as the time those bytes take at full bandwidth, so at 2-4 bits the kernel is likely issue-bound
// rather than bandwidth-bound, while still reading 4-8x fewer bytes than fp16 attention. Splits
// give long caches with few (batch, kv head) pairs >= 2 CTAs per SM. Fixed costs: the prep kernel
// (and the merge kernel when split) are extra launches per call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem.cuh"
#include "launchers.h"

namespace kvq::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxWarps = 4;
constexpr int kPrepThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSoftSmem = 96 * 1024;  // preferred dynamic smem per CTA (leaves room for 2+ CTAs/SM)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// max(a, b), NaN when either is NaN (fmaxf drops a NaN): a row with a NaN score - a NaN in its
// query or in a key it sees - must come out NaN, not as a row that sees nothing (as the CPU).
__device__ __forceinline__ float nan_max(float a, float b) { return a > b || a != a ? a : b; }

// out = A / l and lse = M + log l of a finished row: l is a sum of probabilities, so it is > 0
// (seen), 0 (nothing seen: out 0, lse -inf) or NaN (a NaN or +inf score: out and lse NaN).
__device__ __forceinline__ float row_out(float A, float l) {
  return l > 0.f ? A / l : l == 0.f ? 0.f : quiet_nan();
}
__device__ __forceinline__ float row_lse(float M, float l) {
  return l > 0.f ? M * kLn2 + logf(l) : l == 0.f ? neg_inf() : quiet_nan();
}

// ---- cp.async (sm_80+; a synchronous copy elsewhere, where wait is then a no-op) -----------

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
#else
  *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(src));
#else
  *static_cast<uint2*>(dst) = *static_cast<const uint2*>(src);
#endif
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src));
#else
  *static_cast<uint32_t*>(dst) = *static_cast<const uint32_t*>(src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Copies `bytes` from global `src` to shared `dst`, the warp's lanes splitting the work: 16-byte
// cp.async when both addresses and the size allow it, else 8- or 4-byte ones, else plain bytes.
// Not inlined: a dozen call sites per kernel would otherwise multiply its four loops (compile
// time) for no gain - the call is cheap next to the copy it issues.
__device__ __noinline__ void warp_copy(unsigned char* dst, const void* src_v, int64_t bytes,
                                          int lane) {
  const unsigned char* src = static_cast<const unsigned char*>(src_v);
  if (bytes <= 0) return;
  const uintptr_t al = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                       static_cast<uintptr_t>(bytes);
  if ((al & 15) == 0) {
    for (int64_t i = lane * 16; i < bytes; i += 32 * 16) cp_async16(dst + i, src + i);
  } else if ((al & 7) == 0) {
    for (int64_t i = lane * 8; i < bytes; i += 32 * 8) cp_async8(dst + i, src + i);
  } else if ((al & 3) == 0) {
    for (int64_t i = lane * 4; i < bytes; i += 32 * 4) cp_async4(dst + i, src + i);
  } else {
    for (int64_t i = lane; i < bytes; i += 32) dst[i] = src[i];
  }
}

// ---- code extraction -------------------------------------------------------------------------

// Exact float of a small unsigned integer (< 2^23) without the int->float unit.
__device__ __forceinline__ float code_to_float(uint32_t c) {
  return __uint_as_float(0x4B000000u | c) - 8388608.0f;
}

// Bits [sh, sh + 32) of the 64-bit value hi:lo, for 0 <= sh < 64.
__device__ __forceinline__ uint32_t bits_at(uint32_t lo, uint32_t hi, int sh) {
  return sh < 32 ? __funnelshift_r(lo, hi, sh) : (hi >> (sh - 32));
}

// CPL bytes at p (aligned to CPL) as two words: channel e is byte e & 3 of w0 (e < 4) or w1.
template <int CPL>
__device__ __forceinline__ void load_cpl_bytes(const unsigned char* p, uint32_t& w0,
                                               uint32_t& w1) {
  if constexpr (CPL == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w0 = v.x;
    w1 = v.y;
  } else if constexpr (CPL == 4) {
    w0 = *reinterpret_cast<const uint32_t*>(p);
    w1 = 0;
  } else {
    w0 = *reinterpret_cast<const uint16_t*>(p);
    w1 = 0;
  }
}

// Rows k < 8 of a key chunk hold byte k of every channel's 64-bit code word. Transposes the CPL
// channels' bytes into per-channel words lo (rows 0-3) / hi (rows 4-7) with byte permutes.
template <int CPL>
__device__ __forceinline__ void channel_words(const uint32_t (&r0)[8], const uint32_t (&r1)[8],
                                              bool need_hi, uint32_t (&lo)[CPL],
                                              uint32_t (&hi)[CPL]) {
#pragma unroll
  for (int e = 0; e < CPL; ++e) {
    const uint32_t* r = e < 4 ? r0 : r1;
    const unsigned sel = static_cast<unsigned>((e & 3) | (((e & 3) + 4) << 4));
    const uint32_t t01 = __byte_perm(r[0], r[1], sel);
    const uint32_t t23 = __byte_perm(r[2], r[3], sel);
    lo[e] = __byte_perm(t01, t23, 0x5410);
    hi[e] = 0;
    if (need_hi) {
      const uint32_t t45 = __byte_perm(r[4], r[5], sel);
      const uint32_t t67 = __byte_perm(r[6], r[7], sel);
      hi[e] = __byte_perm(t45, t67, 0x5410);
    }
  }
}

// CPL consecutive elements of a full-precision row in shared memory, as float.
template <int CPL>
__device__ __forceinline__ void load_fp(const unsigned char* base, int64_t i, DType t,
                                        float (&v)[CPL]) {
  if (t == DType::kF32) {
    const float* p = reinterpret_cast<const float*>(base) + i;
#pragma unroll
    for (int e = 0; e < CPL; ++e) v[e] = p[e];
  } else {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(base + 2 * i);  // 4-byte aligned
#pragma unroll
    for (int e = 0; e < CPL; e += 2) {
      const uint32_t w = p[e / 2];
      const unsigned short lo = static_cast<unsigned short>(w & 0xffffu);
      const unsigned short hi = static_cast<unsigned short>(w >> 16);
      if (t == DType::kF16) {
        v[e] = __half2float(__ushort_as_half(lo));
        v[e + 1] = __half2float(__ushort_as_half(hi));
      } else {
        v[e] = __bfloat162float(__ushort_as_bfloat16(lo));
        v[e + 1] = __bfloat162float(__ushort_as_bfloat16(hi));
      }
    }
  }
}

// ---- warp reduce-scatter -----------------------------------------------------------------------

// Sums v[0..CNT) over the 32 lanes with xor butterflies that halve the live values at each step:
// afterwards a lane holds max(1, CNT/32) finished sums, of values [base, base + that), and when
// CNT < 32 lanes that differ only in the low (32/CNT - 1) bits hold the same ones.
template <int CNT, int O>
struct ReduceScatter {
  static __device__ __forceinline__ void run(float* v, int lane, int& base) {
    if constexpr (O > 0) {
      if constexpr (CNT > 1) {
        constexpr int HALF = CNT / 2;
        const bool up = (lane & O) != 0;
#pragma unroll
        for (int i = 0; i < HALF; ++i) {
          const float send = up ? v[i] : v[i + HALF];
          const float keep = up ? v[i + HALF] : v[i];
          v[i] = keep + __shfl_xor_sync(kFull, send, O);
        }
        if (up) base += HALF;
        ReduceScatter<HALF, O / 2>::run(v, lane, base);
      } else {
        v[0] += __shfl_xor_sync(kFull, v[0], O);
        ReduceScatter<1, O / 2>::run(v, lane, base);
      }
    }
  }
};

// ---- parameters ----------------------------------------------------------------------------------

struct Params {
  QuantAttentionArgs a;
  // derived shape
  int D, G, VG, VGn, L, g, R, FT;  // VGn = D / VG value groups per token; R = g * L rows
  int64_t Q, T;                    // quantized tokens, stats columns (Q + F)
  float qscale;                    // scale * log2(e)
  float cap2;                      // softcap * log2(e) (scores are in the log2 domain); 0: none
  // plan
  int64_t splits, row_tiles;
  int RT;
  int s_size, f_size;  // bytes of a scale / fp element
  // shared memory layout (bytes)
  int q_bytes, warp_bytes, misc_bytes, stage_bytes, acc_o_offset;
  int o_kc, o_vc, o_vs, o_vz, o_ks, o_kz, o_pos, o_koi, o_kov, o_voi, o_vov;
  // workspace
  int64_t* k_off;
  int64_t* v_off;
  int32_t* kw;     // effective widths (0: not used)
  int32_t* vw;
  int32_t* tiles;  // used blocks, ascending
  int32_t* n_used;
  int64_t* end;    // per batch row: one past the newest position held
  float* part_m;   // [B * Hkv * splits, R] (log2 domain)
  float* part_l;
  float* part_acc;  // [B * Hkv * splits, R, D]
};

// ---- prep: block table, used-block list, causal end positions ------------------------------

// Inclusive scan over the CTA; `total` gets the CTA's sum. wsum: 32 int64 of shared memory.
__device__ __forceinline__ int64_t block_scan(int64_t x, int64_t* wsum, int64_t& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) wsum[wid] = x;
  __syncthreads();
  if (wid == 0) {
    int64_t w = lane < nw ? wsum[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    if (lane < nw) wsum[lane] = w;
  }
  __syncthreads();
  if (wid > 0) x += wsum[wid - 1];
  total = wsum[nw - 1];
  __syncthreads();
  return x;
}

__device__ __forceinline__ int64_t block_max(int64_t x, int64_t* wsum) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t y = __shfl_xor_sync(kFull, x, o);
    x = y > x ? y : x;
  }
  if (lane == 0) wsum[wid] = x;
  __syncthreads();
  int64_t m = wsum[0];
  for (int w = 1; w < nw; ++w) m = wsum[w] > m ? wsum[w] : m;
  __syncthreads();
  return m;
}

__device__ __forceinline__ int clamp_width(int32_t w) { return w < 0 ? 0 : (w > 8 ? 8 : w); }

__global__ void __launch_bounds__(kPrepThreads) prep_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* wsum = reinterpret_cast<int64_t*>(smem);
  const QuantAttentionArgs& a = p.a;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int64_t NB = a.NB, G = p.G, bpb = G * a.D / 8;  // pool bytes per bit of width
  int64_t carry_w = 0, carry_used = 0, best = 0;
  for (int64_t base = 0; base < NB; base += blockDim.x) {
    const int64_t t = base + tid;
    int kw = 0, vw = 0;
    if (t < NB) {
      kw = clamp_width(a.k_bits[t]);
      vw = clamp_width(a.v_bits[t]);
    }
    const int64_t packed = static_cast<int64_t>(kw) | (static_cast<int64_t>(vw) << 32);
    int64_t tot;
    const int64_t before = carry_w + block_scan(packed, wsum, tot) - packed;
    carry_w += tot;
    const int64_t k_start = (before & 0xffffffffLL) * bpb, v_start = (before >> 32) * bpb;
    const bool used = t < NB && kw > 0 && vw > 0 && k_start + kw * bpb <= a.k_pool &&
                      v_start + vw * bpb <= a.v_pool;
    int64_t utot;
    const int64_t slot = carry_used + block_scan(used ? 1 : 0, wsum, utot) - 1;
    carry_used += utot;
    if (b == 0 && t < NB) {
      p.k_off[t] = k_start;
      p.v_off[t] = v_start;
      p.kw[t] = used ? kw : 0;
      p.vw[t] = used ? vw : 0;
      if (used) p.tiles[slot] = static_cast<int32_t>(t);
    }
    if (used) {
      const int64_t first = a.q_offset + t * G;  // quantized token i sits at q_offset + i
      if (a.q_exclude == nullptr) {
        best = best > first + G ? best : first + G;
      } else {
        const uint8_t* ex = a.q_exclude + b * p.Q + t * G;
        for (int64_t j = G - 1; j >= 0; --j) {
          if (!ex[j]) {
            best = best > first + j + 1 ? best : first + j + 1;
            break;
          }
        }
      }
    }
  }
  for (int64_t f = tid; f < a.F; f += blockDim.x) {
    const int64_t e = a.fp_pos[b * a.F + f] + 1;
    best = e > best ? e : best;
  }
  best = block_max(best, wsum);
  if (tid == 0) {
    p.end[b] = best;
    if (b == 0) *p.n_used = static_cast<int32_t>(carry_used);
  }
}

// ---- the attention kernel ------------------------------------------------------------------

// A warp's position in its sequence of tiles: tile list index i (blocks, then fp chunks), step c.
struct Cursor {
  int64_t i;
  int c, steps;
  int64_t t;  // block id, or -1 - fp chunk index
  int kb, vb;
  int64_t koff, voff;
};

// RT query rows per CTA; each lane owns NU units of CPL contiguous channels:
// channels CPL * (lane + 32 * u) + [0, CPL).
template <int RT, int CPL, int NU>
__global__ void __launch_bounds__(kMaxWarps * 32)
    attention_kernel(const Params p, const bool stats_mode) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int V = RT * 8;            // scores per step
  constexpr int UU = (V + 31) / 32;    // scores per lane in the softmax bookkeeping
  constexpr int REP = V < 32 ? 32 / V - 1 : 0;  // lanes holding copies after the reduce-scatter
  const QuantAttentionArgs& a = p.a;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int D = p.D, G = p.G, L = p.L, FT = p.FT;

  int64_t cta = blockIdx.x;
  const int rt = static_cast<int>(cta % p.row_tiles);
  cta /= p.row_tiles;
  const int64_t split = cta % p.splits;
  const int64_t pair = cta / p.splits;  // b * Hkv + h
  const int64_t b = pair / a.Hkv, h = pair % a.Hkv;

  float* qsm = reinterpret_cast<float*>(smem);  // [RT][D], pre-scaled
  unsigned char* wbase = smem + p.q_bytes + warp * p.warp_bytes;
  float* kpar = reinterpret_cast<float*>(wbase);  // [2][D]: the current block's key scale, zero
  float* sc = kpar + 2 * D;                       // [V] scores of the step
  float* ps = sc + V;                             // [8][RT] probabilities of the step
  float* alpha_s = ps + V;                        // [RT] rescale factors of the step
  float* acc_o = reinterpret_cast<float*>(wbase + p.acc_o_offset);  // [RT][D] value outliers
  unsigned char* ring = wbase + p.misc_bytes;
  if (a.n_v_out > 0 && !stats_mode) {
    for (int i = lane; i < RT * D; i += 32) acc_o[i] = 0.f;
  }

  for (int i = threadIdx.x; i < RT * D; i += blockDim.x) {
    const int r = i / D, c = i - r * D;
    const int rg = rt * RT + r;
    float v = 0.f;
    if (rg < p.R) {
      const int gi = rg / L, l = rg - gi * L;
      v = load_elem(a.query, ((b * a.Hq + h * p.g + gi) * L + l) * D + c, a.q_dtype) * p.qscale;
    }
    qsm[i] = v;
  }

  const int64_t end = p.end[b];
  // Per bookkeeping slot: query position (causal) and, in stats mode, the row's final lse.
  int64_t qpos[UU];
  float lse2[UU];
  bool row_ok[UU];
#pragma unroll
  for (int uu = 0; uu < UU; ++uu) {
    const int r = (lane + 32 * uu) >> 3;
    const int rg = rt * RT + r;
    row_ok[uu] = r < RT && rg < p.R;
    qpos[uu] = row_ok[uu] ? end - L + rg % L : 0;
    lse2[uu] = neg_inf();
    if (stats_mode && row_ok[uu]) {
      const int gi = rg / L, l = rg - gi * L;
      lse2[uu] = a.lse[(b * a.Hq + h * p.g + gi) * L + l] * kLog2e;
    }
  }
  // Causal: blocks starting after the last query position of this row tile hold nothing visible.
  int64_t qmax = INT64_MAX;
  if (a.causal) {
    int maxl = 0;
    for (int r = 0; r < RT; ++r) {
      const int rg = rt * RT + r;
      if (rg < p.R && rg % L > maxl) maxl = rg % L;
    }
    qmax = end - L + maxl;
  }

  // This CTA's tile range: the used blocks then the fp chunks, split evenly.
  const int64_t n_used = *p.n_used;
  const int64_t total = n_used + (a.F + FT - 1) / FT;
  const int64_t per = (total + p.splits - 1) / p.splits;
  const int64_t i0 = split * per < total ? split * per : total;
  const int64_t i1 = i0 + per < total ? i0 + per : total;

  const auto load_tile = [&](Cursor& cu) {
    if (cu.i < n_used) {
      const int64_t t = p.tiles[cu.i];
      cu.t = t;
      cu.kb = p.kw[t];
      cu.vb = p.vw[t];
      cu.koff = p.k_off[t];
      cu.voff = p.v_off[t];
      cu.steps = (cu.kb == 0 || a.q_offset + t * G > qmax) ? 0 : G / 8;
    } else {
      cu.t = -1 - (cu.i - n_used);
      cu.kb = cu.vb = 0;
      cu.koff = cu.voff = 0;
      cu.steps = 1;
    }
  };
  const auto settle = [&](Cursor& cu) {  // moves to the first step of the next non-empty tile
    while (cu.i < i1) {
      load_tile(cu);
      if (cu.steps > 0) return;
      cu.i += W;
    }
  };
  const auto advance = [&](Cursor& cu) {
    if (++cu.c < cu.steps) return;
    cu.c = 0;
    cu.i += W;
    settle(cu);
  };

  const int n_k = static_cast<int>(a.n_k_out), n_v = static_cast<int>(a.n_v_out);
  const auto stage = [&](const Cursor& cu, unsigned char* st) {
    if (cu.t >= 0) {
      const int64_t t = cu.t, tok0 = t * G + cu.c * 8;
      warp_copy(st + p.o_kc, a.k_codes + pair * a.k_pool + cu.koff + int64_t{cu.c} * cu.kb * D,
                int64_t{cu.kb} * D, lane);
      if (cu.c == 0) {
        const int64_t o = (pair * a.NB + t) * D * p.s_size;
        warp_copy(st + p.o_ks, static_cast<const unsigned char*>(a.k_scale) + o,
                  int64_t{D} * p.s_size, lane);
        warp_copy(st + p.o_kz, static_cast<const unsigned char*>(a.k_zero) + o,
                  int64_t{D} * p.s_size, lane);
      }
      if (a.q_exclude != nullptr) warp_copy(st + p.o_pos, a.q_exclude + b * p.Q + tok0, 8, lane);
      if (n_k > 0) {
        const int64_t o = (pair * p.Q + tok0) * n_k;
        warp_copy(st + p.o_koi, a.k_outlier_index + o, int64_t{8} * n_k * 2, lane);
        warp_copy(st + p.o_kov, static_cast<const unsigned char*>(a.k_outlier_value) + o * p.f_size,
                  int64_t{8} * n_k * p.f_size, lane);
      }
      if (!stats_mode) {
        warp_copy(st + p.o_vc, a.v_codes + pair * a.v_pool + cu.voff + int64_t{cu.c} * cu.vb * D,
                  int64_t{cu.vb} * D, lane);
        const int64_t o = (pair * p.Q + tok0) * p.VGn * p.s_size;
        const int64_t n = int64_t{8} * p.VGn * p.s_size;
        warp_copy(st + p.o_vs, static_cast<const unsigned char*>(a.v_scale) + o, n, lane);
        warp_copy(st + p.o_vz, static_cast<const unsigned char*>(a.v_zero) + o, n, lane);
        if (n_v > 0) {
          const int64_t ov = (pair * p.Q + tok0) * n_v;
          warp_copy(st + p.o_voi, a.v_outlier_index + ov, int64_t{8} * n_v * 2, lane);
          warp_copy(st + p.o_vov,
                    static_cast<const unsigned char*>(a.v_outlier_value) + ov * p.f_size,
                    int64_t{8} * n_v * p.f_size, lane);
        }
      }
    } else {
      const int64_t f0 = (-1 - cu.t) * FT;
      const int64_t n = a.F - f0 < FT ? a.F - f0 : FT;
      const int64_t o = (pair * a.F + f0) * D * p.f_size;
      warp_copy(st + p.o_kc, static_cast<const unsigned char*>(a.k_fp) + o, n * D * p.f_size, lane);
      if (!stats_mode)
        warp_copy(st + p.o_vc, static_cast<const unsigned char*>(a.v_fp) + o, n * D * p.f_size,
                  lane);
      warp_copy(st + p.o_pos, a.fp_pos + b * a.F + f0, n * 8, lane);
    }
  };

  // Online-softmax state: per bookkeeping slot (replicated over its 8 lanes) and per lane channel.
  float m_run[UU], l_run[UU];
#pragma unroll
  for (int uu = 0; uu < UU; ++uu) m_run[uu] = neg_inf(), l_run[uu] = 0.f;
  float acc[NU][RT][CPL];
#pragma unroll
  for (int u = 0; u < NU; ++u)
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int e = 0; e < CPL; ++e) acc[u][r][e] = 0.f;

  const auto compute = [&](const Cursor& cu, const unsigned char* st) {
    const bool quant = cu.t >= 0;
    const int64_t tok0 = quant ? cu.t * G + cu.c * 8 : 0;
    const int64_t f0 = quant ? 0 : (-1 - cu.t) * FT;
    const int ntok = quant ? 8 : static_cast<int>(a.F - f0 < FT ? a.F - f0 : FT);
    const int kb = cu.kb, vb = cu.vb;

    // 1. The block's key scales/zeros, once per block (each lane only its own channels).
    if (quant && cu.c == 0) {
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int c0 = CPL * (lane + 32 * u);
        if (c0 < D) {
#pragma unroll
          for (int e = 0; e < CPL; ++e) {
            kpar[c0 + e] = load_elem(st + p.o_ks, c0 + e, a.s_dtype);
            kpar[D + c0 + e] = load_elem(st + p.o_kz, c0 + e, a.s_dtype);
          }
        }
      }
    }

    // 2. Partial scores over the lane's channels, RT rows x 8 tokens. Keys are dequantized in
    //    registers: the kb packed rows hold byte k of each channel's word of 8 codes.
    float part[V];
#pragma unroll
    for (int i = 0; i < V; ++i) part[i] = 0.f;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int c0 = CPL * (lane + 32 * u);
      if (c0 >= D) continue;
      float q[RT][CPL];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int e = 0; e < CPL; ++e) q[r][e] = qsm[r * D + c0 + e];
      float s[CPL], z[CPL];
      uint32_t lo[CPL], hi[CPL];
      if (quant) {
#pragma unroll
        for (int e = 0; e < CPL; ++e) s[e] = kpar[c0 + e], z[e] = kpar[D + c0 + e];
        uint32_t r0[8], r1[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          r0[k] = r1[k] = 0;
          if (k < kb) load_cpl_bytes<CPL>(st + p.o_kc + k * D + c0, r0[k], r1[k]);
        }
        channel_words<CPL>(r0, r1, kb > 4, lo, hi);
      }
      const uint32_t mask = (1u << kb) - 1u;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j >= ntok) break;
        float kv[CPL];
        if (quant) {
#pragma unroll
          for (int e = 0; e < CPL; ++e)
            kv[e] = fmaf(code_to_float(bits_at(lo[e], hi[e], j * kb) & mask), s[e], z[e]);
        } else {
          load_fp<CPL>(st + p.o_kc, int64_t{j} * D + c0, a.f_dtype, kv);
        }
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int e = 0; e < CPL; ++e) part[r * 8 + j] = fmaf(q[r][e], kv[e], part[r * 8 + j]);
      }
    }

    // 3. Finish the dot products across the warp; scores to shared memory.
    int base = 0;
    ReduceScatter<V, 16>::run(part, lane, base);
    if ((lane & REP) == 0) {
#pragma unroll
      for (int i = 0; i < (V >= 32 ? V / 32 : 1); ++i) sc[base + i] = part[i];
    }
    __syncwarp();

    // 4. Key outliers (as score corrections q[oi] * value, linear in the key), masking, and the
    //    online softmax: slot idx = lane + 32 * uu is (row idx / 8, token idx % 8); the 8 lanes
    //    of a row compute its max and sum with shuffles.
    unsigned bal[UU];
    float pmax[UU];
#pragma unroll
    for (int uu = 0; uu < UU; ++uu) {
      const int idx = lane + 32 * uu;
      const int r = idx >> 3, j = idx & 7;
      bool vis = row_ok[uu] && j < ntok;
      int64_t pos;
      if (quant) {
        pos = a.q_offset + tok0 + j;
        if (a.q_exclude != nullptr && vis) vis = st[p.o_pos + j] == 0;
      } else {
        pos = vis ? reinterpret_cast<const int64_t*>(st + p.o_pos)[j] : -1;
        vis = vis && pos >= 0;
      }
      if (a.causal) vis = vis && pos <= qpos[uu];
      if (a.window > 0) vis = vis && pos > qpos[uu] - a.window;
      float s = row_ok[uu] ? sc[idx] : neg_inf();
      if (quant && n_k > 0 && row_ok[uu]) {
        const int16_t* oi = reinterpret_cast<const int16_t*>(st + p.o_koi) + j * n_k;
        const unsigned char* ov = st + p.o_kov + int64_t{j} * n_k * p.f_size;
        for (int o = 0; o < n_k; ++o) {
          const int c = oi[o];
          if (static_cast<unsigned>(c) < static_cast<unsigned>(D))
            s = fmaf(qsm[r * D + c], load_elem(ov, o, a.f_dtype), s);
        }
      }
      if (p.cap2 > 0.f && vis) s = p.cap2 * tanhf(s / p.cap2);  // soft-capping, log2 domain
      vis = vis && s != neg_inf();  // a score of -inf adds nothing (and 0 * NaN must not happen)
      s = vis ? s : neg_inf();
      bal[uu] = __ballot_sync(kFull, vis);
      if (!stats_mode) {
        float mx = s;
        mx = nan_max(mx, __shfl_xor_sync(kFull, mx, 1));
        mx = nan_max(mx, __shfl_xor_sync(kFull, mx, 2));
        mx = nan_max(mx, __shfl_xor_sync(kFull, mx, 4));
        const float m_new = nan_max(m_run[uu], mx);  // NaN sticks: alpha, l and acc turn NaN
        const float pr = vis ? exp2f(s - m_new) : 0.f;
        float sum = pr;
        sum += __shfl_xor_sync(kFull, sum, 1);
        sum += __shfl_xor_sync(kFull, sum, 2);
        sum += __shfl_xor_sync(kFull, sum, 4);
        const float alpha = m_new == neg_inf() ? 1.f : exp2f(m_run[uu] - m_new);
        l_run[uu] = l_run[uu] * alpha + sum;
        m_run[uu] = m_new;
        if (r < RT) {  // padding rows (rg >= R) store p = 0, alpha = 1
          ps[j * RT + r] = pr;
          if (j == 0) alpha_s[r] = alpha;
        }
      } else {
        float pr = (vis && lse2[uu] != neg_inf()) ? exp2f(s - lse2[uu]) : 0.f;
        if (!(pr > 0.f)) pr = 0.f;  // NaN is ignored, as std::max ignores it on the CPU
        pr = fmaxf(pr, __shfl_xor_sync(kFull, pr, 8));
        pr = fmaxf(pr, __shfl_xor_sync(kFull, pr, 16));
        pmax[uu] = pr;
      }
    }
    if (stats_mode) {
      float pm = pmax[0];
#pragma unroll
      for (int uu = 1; uu < UU; ++uu) pm = fmaxf(pm, pmax[uu]);
      if (lane < ntok && pm > 0.f) {
        const int64_t col = quant ? tok0 + lane : p.Q + f0 + lane;
        atomicMax(reinterpret_cast<int*>(a.stats + pair * p.T + col), __float_as_int(pm));
      }
      return;
    }
    __syncwarp();

    // 5. P.V: rescale, then each visible token's values (dequantized in registers: codes at bit
    //    offset (j * D + c) * vb of the step's stream) times its probability for each row.
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const float al = alpha_s[r];
      if (al != 1.f) {
#pragma unroll
        for (int u = 0; u < NU; ++u) {
#pragma unroll
          for (int e = 0; e < CPL; ++e) acc[u][r][e] *= al;
          const int c0 = CPL * (lane + 32 * u);
          if (n_v > 0 && c0 < D) {
#pragma unroll
            for (int e = 0; e < CPL; ++e) acc_o[r * D + c0 + e] *= al;
          }
        }
      }
    }
    const uint32_t* vw32 = reinterpret_cast<const uint32_t*>(st + p.o_vc);
    const uint32_t vmask = (1u << vb) - 1u;
#pragma unroll 1
    for (int j = 0; j < ntok; ++j) {
      unsigned rm = 0;  // rows that see token j (the same in every lane)
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int idx = r * 8 + j;
        const unsigned word = (UU > 1 && idx >= 32) ? bal[UU > 1 ? 1 : 0] : bal[0];
        rm |= ((word >> (idx & 31)) & 1u) << r;
      }
      if (rm == 0) continue;
      float pj[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) pj[r] = ps[j * RT + r];
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int c0 = CPL * (lane + 32 * u);
        if (c0 >= D) continue;
        float vv[CPL];
        if (quant) {
          const int o = (j * D + c0) * vb;
          const int w = o >> 5, sh = o & 31;
          const uint32_t x0 = __funnelshift_r(vw32[w], vw32[w + 1], sh);
          const uint32_t x1 =
              (CPL * 8 > 32 && CPL * vb > 32) ? __funnelshift_r(vw32[w + 1], vw32[w + 2], sh) : 0u;
          const int gi = j * p.VGn + c0 / p.VG;
          const float sv = load_elem(st + p.o_vs, gi, a.s_dtype);
          const float zv = load_elem(st + p.o_vz, gi, a.s_dtype);
#pragma unroll
          for (int e = 0; e < CPL; ++e)
            vv[e] = fmaf(code_to_float(bits_at(x0, x1, e * vb) & vmask), sv, zv);
        } else {
          load_fp<CPL>(st + p.o_vc, int64_t{j} * D + c0, a.f_dtype, vv);
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          if ((rm >> r) & 1u) {
#pragma unroll
            for (int e = 0; e < CPL; ++e) acc[u][r][e] = fmaf(pj[r], vv[e], acc[u][r][e]);
          }
        }
      }
    }
    // Value outliers: acc[r][c] += p[r][j] * value for c = index, one lane per row in token and
    // index order (deterministic; rows never collide), into the warp's acc_o.
    if (quant && n_v > 0) {
      __syncwarp();
      if (lane < RT) {
        const int r = lane;
        const int16_t* oi = reinterpret_cast<const int16_t*>(st + p.o_voi);
        const unsigned char* ov = st + p.o_vov;
        for (int j = 0; j < 8; ++j) {
          const float pr = ps[j * RT + r];
          if (pr == 0.f) continue;  // invisible (or negligible: adds exactly 0 either way)
          for (int o = 0; o < n_v; ++o) {
            const int c = oi[j * n_v + o];
            if (static_cast<unsigned>(c) < static_cast<unsigned>(D))
              acc_o[r * D + c] = fmaf(pr, load_elem(ov, j * n_v + o, a.f_dtype), acc_o[r * D + c]);
          }
        }
      }
    }
  };

  __syncthreads();  // qsm ready

  // The pipeline: iteration `it` stages step `it` of this warp into slot it % NS and (after the
  // first NS - 1 iterations) computes step it - NS + 1 from slot (it + 1) % NS. Every iteration
  // commits exactly one (possibly empty) group, so wait_group<NS - 1> means "the computed step's
  // copies have landed"; the slot staged next was computed in the previous iteration.
  const int NS = (p.warp_bytes - p.misc_bytes) / p.stage_bytes;
  Cursor pf{i0 + warp, 0, 0, 0, 0, 0, 0, 0};
  settle(pf);
  Cursor cu = pf;
  int fill = 0, slot = 0;
  for (int it = 0;; ++it) {
    if (pf.i < i1) {
      stage(pf, ring + fill * p.stage_bytes);
      advance(pf);
    }
    cp_async_commit();
    fill = fill + 1 == NS ? 0 : fill + 1;
    if (it < NS - 1) continue;
    if (cu.i >= i1) break;
    switch (NS) {  // wait_group takes an immediate
      case 2:
        cp_async_wait<1>();
        break;
      case 3:
        cp_async_wait<2>();
        break;
      default:
        cp_async_wait<3>();
        break;
    }
    __syncwarp();
    compute(cu, ring + slot * p.stage_bytes);
    __syncwarp();  // every lane is done with the slot before it is refilled
    advance(cu);
    slot = slot + 1 == NS ? 0 : slot + 1;
  }
  cp_async_wait<0>();
  if (stats_mode) return;
  if (n_v > 0) {  // the value outliers' share (written by other lanes: the loop ended on a syncwarp)
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int c0 = CPL * (lane + 32 * u);
      if (c0 >= D) continue;
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int e = 0; e < CPL; ++e) acc[u][r][e] += acc_o[r * D + c0 + e];
    }
  }
  __syncthreads();

  // Merge the warps' states (the ring area is free now).
  float* ms = reinterpret_cast<float*>(smem + p.q_bytes);  // [W][RT]
  float* ls = ms + kMaxWarps * RT;                          // [W][RT]
  float* accs = ls + kMaxWarps * RT;                        // [W][RT][D]
#pragma unroll
  for (int uu = 0; uu < UU; ++uu) {
    const int idx = lane + 32 * uu, r = idx >> 3;
    if ((idx & 7) == 0 && r < RT) {
      ms[warp * RT + r] = m_run[uu];
      ls[warp * RT + r] = l_run[uu];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    float M = neg_inf();
    for (int w = 0; w < W; ++w) M = nan_max(M, ms[w * RT + r]);
    const float mine = ms[warp * RT + r];
    const float f = mine == neg_inf() ? 0.f : exp2f(mine - M);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int c0 = CPL * (lane + 32 * u);
      if (c0 >= D) continue;
#pragma unroll
      for (int e = 0; e < CPL; ++e) accs[(warp * RT + r) * D + c0 + e] = acc[u][r][e] * f;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < RT * D; i += blockDim.x) {
    const int r = i / D, c = i - r * D;
    const int rg = rt * RT + r;
    if (rg >= p.R) continue;
    float M = neg_inf();
    for (int w = 0; w < W; ++w) M = nan_max(M, ms[w * RT + r]);
    float l = 0.f, A = 0.f;
    for (int w = 0; w < W; ++w) {
      const float mw = ms[w * RT + r];
      if (mw != neg_inf()) l += ls[w * RT + r] * exp2f(mw - M);
      A += accs[(w * RT + r) * D + c];
    }
    if (p.splits == 1) {
      const int gi = rg / L, li = rg - gi * L;
      const int64_t row = (b * a.Hq + h * p.g + gi) * L + li;
      store_elem(a.out, row * D + c, a.q_dtype, row_out(A, l));
      if (c == 0) a.lse[row] = row_lse(M, l);
    } else {
      const int64_t row = (pair * p.splits + split) * p.R + rg;
      p.part_acc[row * D + c] = A;
      if (c == 0) {
        p.part_m[row] = M;
        p.part_l[row] = l;
      }
    }
  }
}

// Log-sum-exp merge of the splits: one warp per (batch, kv head, row).
__global__ void __launch_bounds__(256) merge_kernel(const Params p) {
  const QuantAttentionArgs& a = p.a;
  const int lane = threadIdx.x & 31;
  const int64_t rows = a.B * a.Hkv * p.R;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; w < rows;
       w += nwarps) {
    const int64_t pair = w / p.R;
    const int rg = static_cast<int>(w - pair * p.R);
    const int64_t first = pair * p.splits * p.R + rg;  // split s at first + s * R
    float M = neg_inf();
    for (int64_t s = 0; s < p.splits; ++s) M = nan_max(M, p.part_m[first + s * p.R]);
    float l = 0.f;
    for (int64_t s = 0; s < p.splits; ++s) {
      const float m = p.part_m[first + s * p.R];
      if (m != neg_inf()) l += p.part_l[first + s * p.R] * exp2f(m - M);
    }
    const int64_t b = pair / a.Hkv, h = pair % a.Hkv;
    const int gi = rg / p.L, li = rg - gi * p.L;
    const int64_t row = (b * a.Hq + h * p.g + gi) * p.L + li;
    for (int c = lane; c < p.D; c += 32) {
      float A = 0.f;
      for (int64_t s = 0; s < p.splits; ++s) {
        const float m = p.part_m[first + s * p.R];
        if (m != neg_inf()) A += p.part_acc[(first + s * p.R) * p.D + c] * exp2f(m - M);
      }
      store_elem(a.out, row * p.D + c, a.q_dtype, row_out(A, l));
    }
    if (lane == 0) a.lse[row] = row_lse(M, l);
  }
}

// ---- host side ---------------------------------------------------------------------------------

using KernelFn = void (*)(Params, bool);

int round16(int64_t x) { return static_cast<int>((x + 15) / 16 * 16); }

int device_attr(cudaDeviceAttr attr, int fallback) {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return fallback;
  if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess || v <= 0) return fallback;
  return v;
}

// Channels per lane unit and units per lane for a head dim; rows per CTA at most 32 / (CPL*NU)
// so that a lane's accumulators stay at <= 32 registers.
bool channel_split(int64_t D, int& cpl, int& nu) {
  if (D <= 0 || D % 8 != 0 || D > 1024) return false;
  if (D <= 64) cpl = 2, nu = 1;
  else if (D <= 128) cpl = 4, nu = 1;
  else if (D <= 256) cpl = 8, nu = 1;
  else if (D <= 512) cpl = 8, nu = 2;
  else cpl = 8, nu = 4;
  return true;
}

constexpr int kNumKernels = 14;

// The attention kernel for (RT, CPL, NU) and its index in [0, kNumKernels), or nullptr.
KernelFn pick_kernel(int rt, int cpl, int nu, int& index) {
  index = 0;
#define KVQ_ATTN(RT_, CPL_, NU_)                                                 \
  if (rt == RT_ && cpl == CPL_ && nu == NU_) return attention_kernel<RT_, CPL_, NU_>; \
  ++index;
  KVQ_ATTN(1, 2, 1) KVQ_ATTN(2, 2, 1) KVQ_ATTN(4, 2, 1) KVQ_ATTN(8, 2, 1)
  KVQ_ATTN(1, 4, 1) KVQ_ATTN(2, 4, 1) KVQ_ATTN(4, 4, 1) KVQ_ATTN(8, 4, 1)
  KVQ_ATTN(1, 8, 1) KVQ_ATTN(2, 8, 1) KVQ_ATTN(4, 8, 1)
  KVQ_ATTN(1, 8, 2) KVQ_ATTN(2, 8, 2)
  KVQ_ATTN(1, 8, 4)
#undef KVQ_ATTN
  return nullptr;
}

// Raises the kernel's dynamic shared memory limit when `bytes` needs more than 48 KiB and more
// than was granted before on this device (so steady-state launches make no extra API call).
cudaError_t allow_smem(KernelFn kernel, int index, int bytes) {
  constexpr int kMaxDevices = 64;
  static int granted[kMaxDevices][kNumKernels] = {};
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && granted[dev][index] >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) granted[dev][index] = bytes;
  return err;
}

bool valid_args(const QuantAttentionArgs& a) {
  return a.B >= 1 && a.Hq >= 1 && a.L >= 1 && a.D >= 1 && a.Hkv >= 1 && a.Hq % a.Hkv == 0 &&
         a.NB >= 0 && a.group_size > 0 && a.group_size % 8 == 0 && a.v_group_size > 0 &&
         a.v_group_size % 8 == 0 && a.D % a.v_group_size == 0 && a.F >= 0 && a.k_pool >= 0 &&
         a.v_pool >= 0 && a.n_k_out >= 0 && a.n_v_out >= 0 && a.n_k_out <= a.D &&
         a.n_v_out <= a.D && (a.s_dtype == DType::kF16 || a.s_dtype == DType::kF32) &&
         (!a.return_stats || a.stats != nullptr) &&
         (a.n_k_out == 0 || (a.k_outlier_index != nullptr && a.k_outlier_value != nullptr)) &&
         (a.n_v_out == 0 || (a.v_outlier_index != nullptr && a.v_outlier_value != nullptr)) &&
         a.NB * a.group_size < (int64_t{1} << 40);
}

struct Sizes {
  int cpl, nu, rt;
  int64_t R, row_tiles, fp_step, tiles_max;
  int s_size, f_size;
  int o_kc, o_vc, o_vs, o_vz, o_ks, o_kz, o_pos, o_koi, o_kov, o_voi, o_vov, stage_bytes;
  int q_bytes, misc_bytes, acc_o_offset;
};

bool sizes_of(const QuantAttentionArgs& a, Sizes& z) {
  if (!valid_args(a) || !channel_split(a.D, z.cpl, z.nu)) return false;
  const int cap = 32 / (z.cpl * z.nu) < 8 ? 32 / (z.cpl * z.nu) : 8;
  z.R = (a.Hq / a.Hkv) * a.L;
  if (z.R > (int64_t{1} << 30)) return false;
  z.rt = 1;
  while (z.rt < cap && z.rt < z.R) z.rt *= 2;
  z.row_tiles = (z.R + z.rt - 1) / z.rt;
  z.s_size = a.s_dtype == DType::kF32 ? 4 : 2;
  z.f_size = a.f_dtype == DType::kF32 ? 4 : 2;
  z.fp_step = 8 / z.f_size;  // fp slots per step: their keys fit where 8 tokens of 8-bit codes go
  z.tiles_max = a.NB + (a.F + z.fp_step - 1) / z.fp_step;
  const int64_t D = a.D, VGn = a.D / a.v_group_size;
  int off = 0;
  const auto take = [&](int64_t bytes) {
    const int o = off;
    off += round16(bytes);
    return o;
  };
  z.o_kc = take(8 * D);
  z.o_vc = take(8 * D + 16);  // + 16: the funnel-shift reads may run 8 bytes past the codes
  z.o_vs = take(8 * VGn * z.s_size);
  z.o_vz = take(8 * VGn * z.s_size);
  z.o_ks = take(D * z.s_size);
  z.o_kz = take(D * z.s_size);
  z.o_pos = take(64);
  z.o_koi = take(8 * a.n_k_out * 2);
  z.o_kov = take(8 * a.n_k_out * z.f_size);
  z.o_voi = take(8 * a.n_v_out * 2);
  z.o_vov = take(8 * a.n_v_out * z.f_size);
  z.stage_bytes = off;
  z.q_bytes = round16(int64_t{z.rt} * D * 4);
  // Per warp: key scale/zero [2][D], scores and probabilities [8 * RT] each, alpha [RT], and
  // the value-outlier accumulator [RT][D] when there are value outliers.
  z.acc_o_offset = round16(2 * D * 4) + round16(int64_t{z.rt} * 8 * 4) * 2 + round16(z.rt * 4);
  z.misc_bytes = z.acc_o_offset + (a.n_v_out > 0 ? round16(int64_t{z.rt} * D * 4) : 0);
  return true;
}

}  // namespace

cudaError_t plan_quant_attention(const QuantAttentionArgs& a, QuantAttentionPlan* plan) {
  Sizes z;
  if (plan == nullptr || !sizes_of(a, z)) return cudaErrorInvalidValue;
  const int64_t optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);
  const int64_t merge_bytes = round16(2 * kMaxWarps * z.rt * 4) + int64_t{kMaxWarps} * z.rt * a.D * 4;
  int warps = 0, stages = 0;
  int64_t smem = 0;
  const auto total_for = [&](int w, int ns) {
    const int64_t ring = int64_t{w} * (z.misc_bytes + int64_t{ns} * z.stage_bytes);
    return z.q_bytes + (ring > merge_bytes ? ring : merge_bytes);
  };
  for (int ns : {4, 3}) {  // deep pipelines while they fit comfortably
    if (total_for(kMaxWarps, ns) <= kSoftSmem) {
      warps = kMaxWarps, stages = ns, smem = total_for(kMaxWarps, ns);
      break;
    }
  }
  if (warps == 0) {
    for (int w : {kMaxWarps, 2, 1}) {
      if (total_for(w, 2) <= optin) {
        warps = w, stages = 2, smem = total_for(w, 2);
        break;
      }
    }
  }
  if (warps == 0) return cudaErrorInvalidValue;

  const int64_t pairs = a.B * a.Hkv;
  const int64_t base = pairs * z.row_tiles;
  const int64_t target = 2 * static_cast<int64_t>(device_attr(cudaDevAttrMultiProcessorCount, 1));
  int64_t splits = 1;
  if (base < target) {
    splits = (target + base - 1) / base;
    const int64_t most = z.tiles_max / (2 * warps);  // at least ~2 tiles per warp
    splits = splits < most ? splits : most;
    splits = splits < 256 ? splits : 256;
    splits = splits < 1 ? 1 : splits;
  }
  if (pairs * splits * z.row_tiles > 0x7fffffffLL) return cudaErrorInvalidValue;

  const int64_t NB = a.NB;
  int64_t ws = 0;
  ws += round16(NB * 8) * 2;  // k_off, v_off
  ws += round16(NB * 4) * 3;  // kw, vw, tiles
  ws += 16;                   // n_used
  ws += round16(a.B * 8);     // end
  if (splits > 1) {
    const int64_t rows = pairs * splits * z.R;
    ws += round16(rows * 4) * 2 + rows * a.D * 4;
  }
  plan->workspace_bytes = ws;
  plan->splits = splits;
  plan->row_tiles = z.row_tiles;
  plan->rows_per_cta = z.rt;
  plan->warps = warps;
  plan->stages = stages;
  plan->fp_step = static_cast<int>(z.fp_step);
  plan->smem_bytes = static_cast<int>(smem);
  return cudaSuccess;
}

cudaError_t launch_quant_attention(const QuantAttentionArgs& a, const QuantAttentionPlan& plan,
                                   void* workspace, cudaStream_t stream) {
  Sizes z;
  if (!sizes_of(a, z) || z.rt != plan.rows_per_cta || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  int kernel_index = 0;
  KernelFn kernel = pick_kernel(z.rt, z.cpl, z.nu, kernel_index);
  if (kernel == nullptr) return cudaErrorInvalidValue;

  Params p{};
  p.a = a;
  p.D = static_cast<int>(a.D);
  p.G = static_cast<int>(a.group_size);
  p.VG = static_cast<int>(a.v_group_size);
  p.VGn = static_cast<int>(a.D / a.v_group_size);
  p.L = static_cast<int>(a.L);
  p.g = static_cast<int>(a.Hq / a.Hkv);
  p.R = static_cast<int>(z.R);
  p.FT = static_cast<int>(z.fp_step);
  p.Q = a.NB * a.group_size;
  p.T = p.Q + a.F;
  p.qscale = a.scale * kLog2e;
  p.cap2 = a.softcap * kLog2e;
  p.splits = plan.splits;
  p.row_tiles = plan.row_tiles;
  p.RT = z.rt;
  p.s_size = z.s_size;
  p.f_size = z.f_size;
  p.q_bytes = z.q_bytes;
  p.misc_bytes = z.misc_bytes;
  p.acc_o_offset = z.acc_o_offset;
  p.stage_bytes = z.stage_bytes;
  p.warp_bytes = z.misc_bytes + plan.stages * z.stage_bytes;
  p.o_kc = z.o_kc, p.o_vc = z.o_vc, p.o_vs = z.o_vs, p.o_vz = z.o_vz, p.o_ks = z.o_ks;
  p.o_kz = z.o_kz, p.o_pos = z.o_pos, p.o_koi = z.o_koi, p.o_kov = z.o_kov, p.o_voi = z.o_voi;
  p.o_vov = z.o_vov;

  unsigned char* w = static_cast<unsigned char*>(workspace);
  const int64_t NB = a.NB;
  p.k_off = reinterpret_cast<int64_t*>(w), w += round16(NB * 8);
  p.v_off = reinterpret_cast<int64_t*>(w), w += round16(NB * 8);
  p.kw = reinterpret_cast<int32_t*>(w), w += round16(NB * 4);
  p.vw = reinterpret_cast<int32_t*>(w), w += round16(NB * 4);
  p.tiles = reinterpret_cast<int32_t*>(w), w += round16(NB * 4);
  p.n_used = reinterpret_cast<int32_t*>(w), w += 16;
  p.end = reinterpret_cast<int64_t*>(w), w += round16(a.B * 8);
  if (plan.splits > 1) {
    const int64_t rows = a.B * a.Hkv * plan.splits * z.R;
    p.part_m = reinterpret_cast<float*>(w), w += round16(rows * 4);
    p.part_l = reinterpret_cast<float*>(w), w += round16(rows * 4);
    p.part_acc = reinterpret_cast<float*>(w);
  }

  prep_kernel<<<static_cast<unsigned>(a.B), kPrepThreads, 32 * sizeof(int64_t), stream>>>(p);
  {
    const cudaError_t err = allow_smem(kernel, kernel_index, plan.smem_bytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t grid = a.B * a.Hkv * plan.splits * plan.row_tiles;
  kernel<<<static_cast<unsigned>(grid), plan.warps * 32, plan.smem_bytes, stream>>>(p, false);
  if (plan.splits > 1) {
    const int64_t rows = a.B * a.Hkv * z.R;
    int64_t blocks = (rows + 7) / 8;
    blocks = blocks > 65536 ? 65536 : blocks;
    merge_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  }
  if (a.return_stats && p.T > 0) {
    const cudaError_t err = cudaMemsetAsync(a.stats, 0, a.B * a.Hkv * p.T * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid), plan.warps * 32, plan.smem_bytes, stream>>>(p, true);
  }
  return cudaSuccess;
}

}  // namespace kvq::cuda
