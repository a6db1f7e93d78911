// CUDA kernel of kvq::dequant_matmul (no torch headers: see launchers.h).
//
// out = a @ Bop with Bop = B_hat^T (transpose_b) or B_hat, B_hat [N, K] per batch element packed
// in `codes`. Written as out[m, col] = sum_r a[m, r] * Bop[r, col]: r runs over K (transpose_b)
// or N, col over N or K.
//
// A CTA owns a [BM, 64] output tile and walks the reduction axis in chunks of 16: it stages the
// a-chunk and the dequantized [16, 64] Bop-chunk in shared memory (float32), adds the sparse
// outliers that fall in the chunk, and every thread accumulates a TM x 4 sub-tile in float32
// registers. The dequantized operand never leaves shared memory. The dequantized values and the
// outlier additions are the CPU kernel's, bit for bit (code * scale, then + zero, then + each
// outlier in order, all rounded separately); only the summation order of the products differs.
//
// When the output tiles are too few to fill the GPU (a decode-sized M with a short output row),
// the reduction axis is split: each split writes float32 partials to the workspace and a second
// kernel sums them in split order (deterministic), then rounds to a's dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elem.cuh"
#include "launchers.h"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads
constexpr int kBC = 64;        // output columns per CTA
constexpr int kBR = 16;        // reduction chunk
constexpr int kPad = 4;        // smem row padding (floats): fewer bank conflicts, rows stay 16-B aligned
constexpr int64_t kMaxSplits = 64;

struct Params {
  DequantMatmulArgs a;
  int64_t Kred;       // reduction length: K (transpose_b) or N
  int64_t C;          // output columns: N (transpose_b) or K
  int64_t col_tiles;  // ceil(C / 64)
  int64_t m_tiles;    // ceil(M / BM)
  int64_t splits;     // reduction splits
  int64_t per_split;  // reduction length per split, a multiple of kBR
  float* partial;     // [splits, batch, M, C] when splits > 1
};

// B_hat[bt, n, k], dequantized exactly as the CPU kernel does (csrc/cpu/tiles.cpp).
__device__ __forceinline__ float dequant_at(const DequantMatmulArgs& a, int64_t bt, int64_t n,
                                            int64_t k) {
  const int bits = a.bits;
  const int64_t row = bt * a.N + n;
  uint32_t v;
  int64_t sidx;
  if (!a.row_groups) {  // groups along K: row `row` is K * bits / 8 bytes, codes LSB-first
    const uint8_t* base = a.codes + row * (a.K * bits / 8);
    const int64_t bit = k * bits;
    const int sh = static_cast<int>(bit & 7);
    const uint8_t* p = base + (bit >> 3);
    v = static_cast<uint32_t>(p[0]) >> sh;
    if (sh + bits > 8) v |= static_cast<uint32_t>(p[1]) << (8 - sh);
    // 32-bit divisions: k < K and n < N are far below 2^31.
    sidx = row * (a.K / a.group_size) +
           static_cast<uint32_t>(k) / static_cast<uint32_t>(a.group_size);
  } else {  // groups along N: 8-row chunks of `bits` packed rows; byte i of column k's word in row i
    const int j = static_cast<int>(row & 7);
    const int bit = j * bits;
    const int sh = bit & 7;
    const uint8_t* p = a.codes + (row >> 3) * bits * a.K + (bit >> 3) * a.K + k;
    v = static_cast<uint32_t>(p[0]) >> sh;
    if (sh + bits > 8) v |= static_cast<uint32_t>(p[a.K]) << (8 - sh);
    // N % group_size == 0, so the group of `row` is bt * (N / group_size) + n / group_size.
    sidx = (bt * (a.N / a.group_size) +
            static_cast<uint32_t>(n) / static_cast<uint32_t>(a.group_size)) * a.K + k;
  }
  const float code = static_cast<float>(v & ((1u << bits) - 1u));
  return __fadd_rn(__fmul_rn(code, load_elem(a.scale, sidx, a.scale_dtype)),
                   load_elem(a.zero, sidx, a.scale_dtype));
}

// TM rows of the output per thread: BM = 16 * TM rows per CTA.
template <int TM>
__global__ void __launch_bounds__(kThreads) dequant_matmul_kernel(const Params p) {
  constexpr int BM = 16 * TM;
  __shared__ __align__(16) float As[kBR][BM + kPad];
  __shared__ __align__(16) float Bs[kBR][kBC + kPad];
  const DequantMatmulArgs& a = p.a;
  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;

  int64_t cta = blockIdx.x;
  const int64_t ct = cta % p.col_tiles;
  cta /= p.col_tiles;
  const int64_t mt = cta % p.m_tiles;
  cta /= p.m_tiles;
  const int64_t split = cta % p.splits;
  const int64_t bt = cta / p.splits;
  const int64_t c0 = ct * kBC, m0 = mt * BM;
  const int64_t r_begin = split * p.per_split;
  const int64_t r_end = r_begin + p.per_split < p.Kred ? r_begin + p.per_split : p.Kred;

  float acc[TM][4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  const int64_t a_rows = a.M;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBR) {
    // a-chunk [BM, kBR] -> As[r][m]; consecutive threads read consecutive r (coalesced).
    for (int i = tid; i < BM * kBR; i += kThreads) {
      const int m = i / kBR, rr = i % kBR;
      float v = 0.f;
      if (m0 + m < a_rows && r0 + rr < r_end)
        v = load_elem(a.a, ((bt * a.M) + m0 + m) * p.Kred + r0 + rr, a.a_dtype);
      As[rr][m] = v;
    }
    // Bop-chunk [kBR, kBC]; consecutive threads walk k, the contiguous axis of the codes.
    for (int i = tid; i < kBR * kBC; i += kThreads) {
      int rr, col;
      if (a.transpose_b) {
        col = i / kBR;
        rr = i % kBR;
      } else {
        rr = i / kBC;
        col = i % kBC;
      }
      const int64_t r = r0 + rr, cc = c0 + col;
      float v = 0.f;
      if (r < r_end && cc < p.C) v = a.transpose_b ? dequant_at(a, bt, cc, r) : dequant_at(a, bt, r, cc);
      Bs[rr][col] = v;
    }
    if (a.n_out > 0) {
      __syncthreads();
      // One thread per B_hat row of the chunk adds that row's outliers in order (deterministic,
      // duplicates add up like scatter_add, as in the CPU kernel). Out-of-range indices are skipped.
      const int nrows = a.transpose_b ? kBC : kBR;
      if (tid < nrows) {
        const int64_t n = (a.transpose_b ? c0 : r0) + tid;
        const int64_t k_lo = a.transpose_b ? r0 : c0;
        const int64_t k_hi = a.transpose_b ? (r0 + kBR < r_end ? r0 + kBR : r_end)
                                           : (c0 + kBC < p.C ? c0 + kBC : p.C);
        if (n < (a.transpose_b ? p.C : r_end)) {
          const int64_t row = bt * a.N + n;
          for (int64_t o = 0; o < a.n_out; ++o) {
            const int64_t k = a.outlier_index[row * a.n_out + o];
            if (k < k_lo || k >= k_hi) continue;
            const float ov = load_elem(a.outlier_value, row * a.n_out + o, a.a_dtype);
            float& dst = a.transpose_b ? Bs[k - k_lo][tid] : Bs[tid][k - k_lo];
            dst = __fadd_rn(dst, ov);
          }
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kBR; ++rr) {
      float av[TM];
      if constexpr (TM == 4) {
        const float4 t = *reinterpret_cast<const float4*>(&As[rr][ty * 4]);
        av[0] = t.x, av[1] = t.y, av[2] = t.z, av[3] = t.w;
      } else {
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = As[rr][ty * TM + i];
      }
      const float4 bv = *reinterpret_cast<const float4*>(&Bs[rr][tx * 4]);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        acc[i][0] = fmaf(av[i], bv.x, acc[i][0]);
        acc[i][1] = fmaf(av[i], bv.y, acc[i][1]);
        acc[i][2] = fmaf(av[i], bv.z, acc[i][2]);
        acc[i][3] = fmaf(av[i], bv.w, acc[i][3]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty * TM + i;
    if (m >= a.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = c0 + tx * 4 + j;
      if (col >= p.C) continue;
      const int64_t o = (bt * a.M + m) * p.C + col;
      if (p.splits == 1) {
        store_elem(a.out, o, a.a_dtype, acc[i][j]);
      } else {
        p.partial[split * (a.batch * a.M * p.C) + o] = acc[i][j];
      }
    }
  }
}

// Sums the splits' partials in split order and rounds to the output dtype.
__global__ void __launch_bounds__(kThreads)
    reduce_splits_kernel(const float* __restrict__ partial, void* out, DType dtype, int64_t total,
                         int64_t splits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += partial[k * total + i];
    store_elem(out, i, dtype, s);
  }
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return n > 0 ? n : 1;
}

bool valid_args(const DequantMatmulArgs& a) {
  return a.bits >= 1 && a.bits <= 8 && a.group_size > 0 && a.group_size % 8 == 0 &&
         a.batch >= 0 && a.M >= 0 && a.N > 0 && a.K > 0 && a.N < (int64_t{1} << 31) &&
         a.K < (int64_t{1} << 31) &&
         (a.row_groups ? a.N % a.group_size == 0 : a.K % a.group_size == 0) && a.n_out >= 0 &&
         (a.n_out == 0 || (a.outlier_index != nullptr && a.outlier_value != nullptr));
}

Params make_params(const DequantMatmulArgs& a) {
  Params p{};
  p.a = a;
  p.Kred = a.transpose_b ? a.K : a.N;
  p.C = a.transpose_b ? a.N : a.K;
  const int BM = a.M <= 16 ? 16 : 64;
  p.col_tiles = (p.C + kBC - 1) / kBC;
  p.m_tiles = (a.M + BM - 1) / BM;
  const int64_t ctas = a.batch * p.m_tiles * p.col_tiles;
  const int64_t target = 2 * static_cast<int64_t>(sm_count());
  int64_t splits = 1;
  if (ctas > 0 && ctas < target) {
    splits = (target + ctas - 1) / ctas;
    const int64_t most = (p.Kred + 8 * kBR - 1) / (8 * kBR);  // at least 128 reduction steps each
    splits = splits < most ? splits : most;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
    splits = splits < 1 ? 1 : splits;
  }
  int64_t per = (p.Kred + splits - 1) / splits;
  per = (per + kBR - 1) / kBR * kBR;
  p.splits = (p.Kred + per - 1) / per;  // no empty split
  if (p.splits < 1) p.splits = 1;
  p.per_split = per;
  return p;
}

}  // namespace

int64_t dequant_matmul_workspace_bytes(const DequantMatmulArgs& args) {
  if (!valid_args(args)) return 0;
  const Params p = make_params(args);
  return p.splits > 1 ? p.splits * args.batch * args.M * p.C * static_cast<int64_t>(sizeof(float))
                      : 0;
}

cudaError_t launch_dequant_matmul(const DequantMatmulArgs& args, void* workspace,
                                  cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  Params p = make_params(args);
  const int64_t total = args.batch * args.M * p.C;
  if (total == 0) return cudaSuccess;
  if (p.splits > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    p.partial = static_cast<float*>(workspace);
  }
  const int64_t grid = args.batch * p.splits * p.m_tiles * p.col_tiles;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (args.M <= 16) {
    dequant_matmul_kernel<1><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  } else {
    dequant_matmul_kernel<4><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
  }
  if (p.splits > 1) {
    int64_t blocks = (total + kThreads - 1) / kThreads;
    blocks = blocks > 65536 ? 65536 : blocks;
    reduce_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.partial, args.out, args.a_dtype, total, p.splits);
  }
  return cudaSuccess;
}

}  // namespace kvq::cuda
