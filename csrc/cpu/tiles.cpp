#include "cpu/tiles.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/bitpack.h"
#include "cpu/simd.h"

#ifdef KVQ_RUNTIME_ISA
#include <immintrin.h>
#endif

namespace kvq::cpu {

using vec::f8;
using vec::i8;
using vec::u8;

KVQ_SIMD float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  // Lets the compiler reassociate this one reduction (no -ffast-math anywhere).
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

KVQ_SIMD void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

KVQ_SIMD void scale_inplace(float alpha, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

KVQ_SIMD void dequant_row_groups(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                                 const float* scale, const float* zero, uint8_t* tmp, float* out) {
  unpack_rows(packed, rows, width, bits, tmp);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; ++c)
      out[r * width + c] = static_cast<float>(tmp[r * width + c]) * scale[c] + zero[c];
}

KVQ_SIMD void dequant_col_groups(const uint8_t* packed, int64_t rows, int64_t width,
                                 int64_t group, int bits, const float* scale, const float* zero,
                                 uint8_t* tmp, float* out) {
  const int64_t groups = width / group;
  for (int64_t r = 0; r < rows; ++r) {
    unpack_run(packed + r * width * bits / 8, width, bits, tmp);
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[r * groups + g], z = zero[r * groups + g];
      for (int64_t c = g * group; c < (g + 1) * group; ++c)
        out[r * width + c] = static_cast<float>(tmp[c]) * s + z;
    }
  }
}

// ---- attention over codes
//
// Contraction into FMA is allowed from here on (the extension is built with -ffp-contract=off
// so that quantization rounds exactly as its reference): these kernels feed softmax attention,
// whose tests bound the error instead of asking for bits, and a fused multiply-add is both
// faster and closer to the exact result.
#if defined(__clang__)
#pragma clang fp contract(fast)
#else
#pragma GCC optimize("fp-contract=fast")
#endif

namespace {

KVQ_INLINE void bytes_to_float(const uint8_t* src, int64_t n, float* out) {
  for (int64_t e = 0; e < n; ++e) out[e] = static_cast<float>(src[e]);
}

// The codes as floats, for the widths the kernels below do not read in place (3-bit keys, 5-8
// bits): keys in dequant_row_groups' layout (`rows` a multiple of 8), values in
// dequant_col_groups'. `tmp` holds rows*width bytes.
KVQ_INLINE void unpack_rows_f32(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                                uint8_t* tmp, float* out) {
  if (bits == 8) return bytes_to_float(packed, rows * width, out);  // one byte per code, in order
  unpack_rows(packed, rows, width, bits, tmp);
  bytes_to_float(tmp, rows * width, out);
}

KVQ_INLINE void unpack_runs_f32(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                                uint8_t* tmp, float* out) {
  if (bits == 8) return bytes_to_float(packed, rows * width, out);
  // Rows are whole bytes (width is a multiple of 8), so the tile is one run.
  unpack_run(packed, rows * width, bits, tmp);
  bytes_to_float(tmp, rows * width, out);
}

}  // namespace

namespace {

// The branch-free conversion of the FP16 library (Maratos Dukhan), 8 lanes at a time.
KVQ_INLINE f8 half8_to_float(vec::h8 h) {
  const u8 w = __builtin_convertvector(h, u8) << 16;
  const u8 sign = w & 0x80000000u;
  const u8 two_w = w + w;
  const f8 normalized = reinterpret_cast<f8>((two_w >> 4) + 0x70000000u) * 0x1.0p-112f;
  const f8 denormalized = reinterpret_cast<f8>((two_w >> 17) | 0x3F000000u) - 0.5f;
  const u8 is_denormal = reinterpret_cast<u8>(two_w < 0x08000000u);
  const u8 bits = (is_denormal & reinterpret_cast<u8>(denormalized)) |
                  (~is_denormal & reinterpret_cast<u8>(normalized));
  return reinterpret_cast<f8>(sign | bits);
}

#ifdef KVQ_RUNTIME_ISA
// F16C converts 8 halves in one instruction. The clones of simd.h cannot use it (they share one
// source and the baseline clone must run everywhere), so this version is picked at run time.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst,
                                                          int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
// cpu_init first: this may run before libgcc's own constructor has filled in the CPU model.
const bool kHasF16C = (__builtin_cpu_init(), __builtin_cpu_supports("f16c"));
#endif

}  // namespace

KVQ_SIMD void half_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef KVQ_RUNTIME_ISA
  if (kHasF16C) return half_to_float_f16c(src, dst, n);
#endif
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    vec::h8 h;
    std::memcpy(&h, src + i, sizeof h);
    vec::store(dst + i, half8_to_float(h));
  }
  if (i < n) {
    uint16_t part[8] = {};
    float res[8];
    std::memcpy(part, src + i, (n - i) * sizeof(uint16_t));
    vec::h8 h;
    std::memcpy(&h, part, sizeof h);
    vec::store(res, half8_to_float(h));
    std::memcpy(dst + i, res, (n - i) * sizeof(float));
  }
}

KVQ_SIMD void mul_columns(const float* a, int64_t rows, int64_t width, const float* s,
                          float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < width; c += 8)
      vec::store(out + r * width + c, vec::load(a + r * width + c) * vec::load(s + c));
}

namespace {

// Lane sums of two vectors, pairwise (the layout of AVX's hadd, one shuffle per operand):
// [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7].
KVQ_INLINE f8 hadd(f8 a, f8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The lane sums of 8 vectors as one vector, out[i] = sum of v[i]: 21 shuffles and adds where
// 8 separate reductions take 48. Short head dims pay for a reduction every few multiply-adds.
KVQ_INLINE f8 hsum8(const f8 (&v)[8]) {
  const f8 lo = hadd(hadd(v[0], v[1]), hadd(v[2], v[3]));  // [s0..s3 of lanes 0-3 | of 4-7]
  const f8 hi = hadd(hadd(v[4], v[5]), hadd(v[6], v[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// R rows x J tokens of scores (R * J <= 8), the rows' vectors reused across the J tokens and
// vice versa.
template <int R, int J>
KVQ_INLINE void score_block(const float* a, const float* b, int64_t n, int64_t width,
                            const float* bias, float* out) {
  static_assert(R * J <= 8, "one hsum8 per block");
  f8 acc[8] = {};
  for (int64_t c = 0; c < width; c += 8) {
    f8 bv[J];
    for (int j = 0; j < J; ++j) bv[j] = vec::load(b + j * width + c);
    for (int r = 0; r < R; ++r) {
      const f8 av = vec::load(a + r * width + c);
      for (int j = 0; j < J; ++j) acc[r * J + j] += av * bv[j];
    }
  }
  const f8 sums = hsum8(acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j)
      out[r * n + j] = sums[r * J + j] + (bias != nullptr ? bias[r] : 0.f);
}

template <int R>
KVQ_INLINE void score_rows(const float* a, const float* b, int64_t n, int64_t width,
                           const float* bias, float* out) {
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) score_block<R, 2>(a, b + j * width, n, width, bias, out + j);
  if (j < n) score_block<R, 1>(a, b + j * width, n, width, bias, out + j);
}

}  // namespace

KVQ_SIMD void score_tile(const float* a, int64_t rows, const float* b, int64_t n, int64_t width,
                         const float* bias, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    score_rows<4>(a + r * width, b, n, width, bias ? bias + r : nullptr, out + r * n);
  const float* ar = a + r * width;
  const float* br = bias ? bias + r : nullptr;
  switch (rows - r) {
    case 3: return score_rows<3>(ar, b, n, width, br, out + r * n);
    case 2: return score_rows<2>(ar, b, n, width, br, out + r * n);
    case 1: return score_rows<1>(ar, b, n, width, br, out + r * n);
    default: return;
  }
}

namespace {

typedef uint64_t q4 __attribute__((vector_size(32)));

// The lanes of code_lanes: lane i holds byte kLaneByte[i] of 8 consecutive bytes.
constexpr int kLaneByte[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// 8 packed bytes in 8 lanes, each in the low byte of its lane (garbage above it), in the order
// kLaneByte: one broadcast and one shift of the 4 64-bit lanes. (GCC widens an 8-byte vector
// with __builtin_convertvector one byte at a time.)
KVQ_INLINE u8 code_lanes(const uint8_t* src) {
  uint64_t word;
  std::memcpy(&word, src, sizeof word);
  return reinterpret_cast<u8>((q4{} + word) >> q4{0, 8, 16, 24});
}

// The out[i] = sum of v[i] for N vectors, 8 at a time (hsum8; a last short batch padded with
// zeros).
template <int N>
KVQ_INLINE void hsum_n(const f8 (&v)[N], float* out) {
  for (int i = 0; i < N; i += 8) {
    f8 batch[8];
    for (int k = 0; k < 8; ++k) batch[k] = i + k < N ? v[i + k] : f8{};
    const f8 s = hsum8(batch);
    for (int k = 0; k < 8 && i + k < N; ++k) out[i + k] = s[k];
  }
}

// R query rows (`a`, its columns in code_lanes' order) against the tokens of a key tile in
// dequant_row_groups' layout, straight from the packed bytes. A byte of packed row k holds tokens
// k*PER + m (m < PER) of its column at bit m*BITS; masking it in place, without the shift, gives
// code << m*BITS, exact as a float, so a score's sum comes out exactly 2^(m*BITS) times too
// large and is scaled back once per score instead of shifting every code. 8 bytes brought into
// lanes once serve PER tokens and R rows.
template <int BITS, int R>
KVQ_INLINE void score_codes_rows(const float* a, const uint8_t* packed, int64_t n, int64_t width,
                                 const float* bias, float* out) {
  constexpr int PER = 8 / BITS, N = R * PER;
  for (int64_t c = 0; c < n / 8; ++c)
    for (int k = 0; k < BITS; ++k) {
      const uint8_t* src = packed + (c * BITS + k) * width;
      f8 acc[N] = {};
      for (int64_t w = 0; w < width; w += 8) {
        const u8 word = code_lanes(src + w);
        f8 av[R];
        for (int r = 0; r < R; ++r) av[r] = vec::load(a + r * width + w);
        for (int m = 0; m < PER; ++m) {
          const f8 kv = __builtin_convertvector(
              reinterpret_cast<i8>(word & (((1u << BITS) - 1) << (m * BITS))), f8);
          for (int r = 0; r < R; ++r) acc[r * PER + m] += av[r] * kv;
        }
      }
      float sums[N];
      hsum_n<N>(acc, sums);
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < PER; ++m)
          out[r * n + c * 8 + k * PER + m] =
              sums[r * PER + m] * (1.f / static_cast<float>(1 << (m * BITS))) +
              (bias != nullptr ? bias[r] : 0.f);
    }
}

// Rows in blocks of up to 12 / PER (at most 12 accumulators: with the rows' query vectors and
// the codes they fit the 16 AVX2 registers), then the rest.
template <int BITS>
KVQ_INLINE void score_codes_bits(const float* a, int64_t rows, const uint8_t* packed, int64_t n,
                                 int64_t width, const float* bias, float* out) {
  constexpr int RB = std::min(4, std::max(1, 12 / (8 / BITS)));
  int64_t r = 0;
  for (; r + RB <= rows; r += RB)
    score_codes_rows<BITS, RB>(a + r * width, packed, n, width, bias ? bias + r : nullptr,
                               out + r * n);
  const float* ar = a + r * width;
  const float* br = bias ? bias + r : nullptr;
  switch (rows - r) {
    case 3:
      if constexpr (RB > 3) score_codes_rows<BITS, 3>(ar, packed, n, width, br, out + r * n);
      return;
    case 2:
      if constexpr (RB > 2) score_codes_rows<BITS, 2>(ar, packed, n, width, br, out + r * n);
      return;
    case 1:
      if constexpr (RB > 1) score_codes_rows<BITS, 1>(ar, packed, n, width, br, out + r * n);
      return;
    default: return;
  }
}

}  // namespace

KVQ_SIMD void score_codes(const float* a, int64_t rows, const uint8_t* packed, int64_t n,
                          int64_t width, int bits, const float* bias, uint8_t* tmp, float* buf,
                          float* out) {
  if (bits != 1 && bits != 2 && bits != 4) {  // codes that straddle bytes: unpacked first
    unpack_rows_f32(packed, n, width, bits, tmp, buf);
    return score_tile(a, rows, buf, n, width, bias, out);
  }
  for (int64_t e = 0; e < rows * width; e += 8) {  // the queries' columns in code_lanes' order
    const f8 v = vec::load(a + e);
    vec::store(buf + e, __builtin_shufflevector(v, v, kLaneByte[0], kLaneByte[1], kLaneByte[2],
                                                kLaneByte[3], kLaneByte[4], kLaneByte[5],
                                                kLaneByte[6], kLaneByte[7]));
  }
  switch (bits) {
    case 1: return score_codes_bits<1>(buf, rows, packed, n, width, bias, out);
    case 2: return score_codes_bits<2>(buf, rows, packed, n, width, bias, out);
    default: return score_codes_bits<4>(buf, rows, packed, n, width, bias, out);
  }
}

namespace {

// exp(x) for x <= 0 (larger x is not needed here), relative error ~2 ulp: x = k ln2 + f with
// |f| <= ln2/2, exp(f) by the Cephes polynomial, 2^k through the exponent bits. Inputs below
// -87 give exp(-87) (> 0, normal) and are zeroed by the caller where they stand for -inf.
KVQ_INLINE f8 exp_nonpositive(f8 x) {
  x = x < -87.f ? vec::splat(-87.f) : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (no fast-math; a contracted FMA rounds
  // once instead of twice, which still leaves an integer).
  const f8 k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const f8 f = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  f8 y = vec::splat(1.9875691500e-4f);
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * (f * f) + f + 1.f;
  const i8 e = (__builtin_convertvector(k, i8) + 127) << 23;
  return y * reinterpret_cast<f8>(e);
}

KVQ_INLINE f8 exp_shifted8(f8 s, float m, f8& sum) {
  const i8 masked = s == -__builtin_inff();
  const f8 p = reinterpret_cast<f8>(~masked & reinterpret_cast<i8>(exp_nonpositive(s - m)));
  sum += p;
  return p;
}

}  // namespace

KVQ_SIMD float max_of(const float* s, int64_t n, float init) {
  f8 m = f8{} + init;
  i8 nan = {};  // lanes that met a NaN: the comparisons below would skip it
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const f8 v = vec::load(s + j);
    m = v > m ? v : m;
    nan |= v != v;
  }
  float r = init;
  bool any_nan = std::isnan(init);
  for (int i = 0; i < 8; ++i) r = std::max(r, m[i]), any_nan |= nan[i] != 0;
  for (; j < n; ++j) r = std::max(r, s[j]), any_nan |= std::isnan(s[j]);
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : r;
}

KVQ_SIMD float exp_shifted(const float* s, int64_t n, float m, float* p) {
  f8 sum = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) vec::store(p + j, exp_shifted8(vec::load(s + j), m, sum));
  if (j < n) {
    float part[8], res[8];
    for (int i = 0; i < 8; ++i) part[i] = j + i < n ? s[j + i] : -__builtin_inff();
    vec::store(res, exp_shifted8(vec::load(part), m, sum));
    std::memcpy(p + j, res, (n - j) * sizeof(float));
  }
  return vec::hsum(sum);
}

namespace {

// scale [n, GR] -> out [GR, n] (column g of the tile's per-token groups made contiguous), eight
// tokens at a time in registers. Writing the columns element by element and loading them back
// as vectors would stall on store forwarding at every load.
template <int GR>
KVQ_INLINE void group_columns(const float* src, int64_t n, float* out) {
  static_assert(GR == 2 || GR == 4, "two or four groups per token");
  for (int64_t j = 0; j < n; j += 8) {
    const float* s = src + j * GR;
    if constexpr (GR == 2) {
      const f8 a = vec::load(s), b = vec::load(s + 8);
      vec::store(out + j, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14));
      vec::store(out + n + j, __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
    } else {
      const f8 v0 = vec::load(s), v1 = vec::load(s + 8), v2 = vec::load(s + 16),
               v3 = vec::load(s + 24);
      // Tokens 0-3 then 4-7, groups (0, 1) and (2, 3): four tokens of two groups per vector.
      const f8 a = __builtin_shufflevector(v0, v1, 0, 4, 8, 12, 1, 5, 9, 13);
      const f8 b = __builtin_shufflevector(v0, v1, 2, 6, 10, 14, 3, 7, 11, 15);
      const f8 c = __builtin_shufflevector(v2, v3, 0, 4, 8, 12, 1, 5, 9, 13);
      const f8 d = __builtin_shufflevector(v2, v3, 2, 6, 10, 14, 3, 7, 11, 15);
      vec::store(out + j, __builtin_shufflevector(a, c, 0, 1, 2, 3, 8, 9, 10, 11));
      vec::store(out + n + j, __builtin_shufflevector(a, c, 4, 5, 6, 7, 12, 13, 14, 15));
      vec::store(out + 2 * n + j, __builtin_shufflevector(b, d, 0, 1, 2, 3, 8, 9, 10, 11));
      vec::store(out + 3 * n + j, __builtin_shufflevector(b, d, 4, 5, 6, 7, 12, 13, 14, 15));
    }
  }
}

// scale [n, groups] -> out [groups, n]: each group's scales as one run over the tile's tokens.
KVQ_INLINE void transpose_groups(const float* src, int64_t n, int64_t groups, float* out) {
  if (groups == 2) return group_columns<2>(src, n, out);
  if (groups == 4) return group_columns<4>(src, n, out);
  for (int64_t k = 0; k < groups; ++k)
    for (int64_t j = 0; j < n; ++j) out[k * n + j] = src[j * groups + k];
}

}  // namespace

KVQ_SIMD void value_weights(const float* p, int64_t rows, int64_t n, const float* scale,
                            const float* zero, int64_t width, int64_t group, float* tmp, float* w,
                            float* acc) {
  const int64_t groups = width / group;
  const float* st = scale;  // [groups, n]: with one group the layout it already has
  const float* zt = zero;
  if (groups > 1) {
    transpose_groups(scale, n, groups, tmp);
    transpose_groups(zero, n, groups, tmp + groups * n);
    st = tmp;
    zt = tmp + groups * n;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const float* sg = st + g * n;
    const float* zg = zt + g * n;
    for (int64_t r = 0; r < rows; ++r) {
      const float* pr = p + r * n;
      float* wr = w + (r * groups + g) * n;
      f8 z = {};
      for (int64_t j = 0; j < n; j += 8) {
        const f8 pj = vec::load(pr + j);
        vec::store(wr + j, pj * vec::load(sg + j));
        z += pj * vec::load(zg + j);
      }
      const f8 zs = vec::splat(vec::hsum(z));
      float* ar = acc + r * width + g * group;
      for (int64_t c = 0; c < group; c += 8) vec::store(ar + c, vec::load(ar + c) + zs);
    }
  }
}

namespace {

// Token j's C * 8 columns [c, c + 8C) of a tile as C vectors of floats: rows of `width` floats
// (values already in floats), or runs of BITS-bit codes, `run` bytes per token (dequant_col_groups'
// layout, read in place: code m of 8 at bit m*BITS of their BITS bytes).
struct FloatRows {
  const float* x;
  int64_t width;
  template <int C>
  KVQ_INLINE void operator()(int64_t j, int64_t c, f8 (&xv)[C]) const {
    for (int k = 0; k < C; ++k) xv[k] = vec::load(x + j * width + c + 8 * k);
  }
};

template <int BITS>
struct CodeRuns {
  const uint8_t* x;
  int64_t run;
  // One 32-bit word, broadcast once, serves 32 / BITS codes: 4 vectors at 1 bit, 2 at 2 bits.
  static constexpr int kPerWord = BITS <= 2 ? 4 / BITS : 1;
  template <int C>
  KVQ_INLINE void operator()(int64_t j, int64_t c, f8 (&xv)[C]) const {
    const u8 shifts = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
    const uint8_t* src = x + j * run + c * BITS / 8;
    for (int k = 0; k < C; k += kPerWord) {
      const int vectors = std::min(kPerWord, C - k);
      uint32_t word = 0;
      std::memcpy(&word, src + k * BITS, vectors * BITS);  // little-endian x86
      const u8 lanes = u8{} + word;
      for (int i = 0; i < vectors; ++i)
        xv[k + i] = __builtin_convertvector(
            reinterpret_cast<i8>((lanes >> (shifts + 8 * BITS * i)) & ((1u << BITS) - 1)), f8);
    }
  }
};

// R rows x C*8 columns [c0, c0 + 8C) of the accumulator stay in registers over the tile's n
// tokens; row r's weights are w[r * stride_r + j].
template <int R, int C, typename Src>
KVQ_INLINE void accumulate_block(const float* w, int64_t stride_r, const Src& x, int64_t c0,
                                 int64_t n, int64_t width, float* acc) {
  f8 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < C; ++k) a[r][k] = vec::load(acc + r * width + c0 + 8 * k);
  for (int64_t j = 0; j < n; ++j) {
    f8 xv[C];
    x(j, c0, xv);
    for (int r = 0; r < R; ++r) {
      const f8 wr = vec::splat_from(w + r * stride_r + j);
      for (int k = 0; k < C; ++k) a[r][k] += wr * xv[k];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < C; ++k) vec::store(acc + r * width + c0 + 8 * k, a[r][k]);
}

template <int R, typename Src>
KVQ_INLINE void accumulate_rows(const float* w, const Src& x, int64_t n, int64_t width,
                                int64_t group, float* acc) {
  const int64_t groups = width / group, stride_r = groups * n;
  // As many columns as the registers hold next to R rows: each token's weights are then
  // broadcast once per 32 columns instead of once per 16.
  if (R <= 3 && group % 32 == 0) {
    for (int64_t c = 0; c < width; c += 32)
      accumulate_block<R, 4>(w + (c / group) * n, stride_r, x, c, n, width, acc);
  } else if (group % 16 == 0) {
    for (int64_t c = 0; c < width; c += 16)
      accumulate_block<R, 2>(w + (c / group) * n, stride_r, x, c, n, width, acc);
  } else {
    for (int64_t c = 0; c < width; c += 8)
      accumulate_block<R, 1>(w + (c / group) * n, stride_r, x, c, n, width, acc);
  }
}

template <typename Src>
KVQ_INLINE void accumulate_src(const float* w, const Src& x, int64_t rows, int64_t n,
                               int64_t width, int64_t group, float* acc) {
  const int64_t stride = (width / group) * n;  // between two rows' weights
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) accumulate_rows<4>(w + r * stride, x, n, width, group, acc + r * width);
  const float* wr = w + r * stride;
  switch (rows - r) {
    case 3: return accumulate_rows<3>(wr, x, n, width, group, acc + r * width);
    case 2: return accumulate_rows<2>(wr, x, n, width, group, acc + r * width);
    case 1: return accumulate_rows<1>(wr, x, n, width, group, acc + r * width);
    default: return;
  }
}

}  // namespace

KVQ_SIMD void accumulate_tile(const float* w, const float* x, int64_t rows, int64_t n,
                              int64_t width, int64_t group, float* acc) {
  accumulate_src(w, FloatRows{x, width}, rows, n, width, group, acc);
}

KVQ_SIMD void accumulate_codes(const float* w, const uint8_t* packed, int64_t rows, int64_t n,
                               int64_t width, int64_t group, int bits, uint8_t* tmp, float* buf,
                               float* acc) {
  const int64_t run = width * bits / 8;
  switch (bits) {
    case 1: return accumulate_src(w, CodeRuns<1>{packed, run}, rows, n, width, group, acc);
    case 2: return accumulate_src(w, CodeRuns<2>{packed, run}, rows, n, width, group, acc);
    case 3: return accumulate_src(w, CodeRuns<3>{packed, run}, rows, n, width, group, acc);
    case 4: return accumulate_src(w, CodeRuns<4>{packed, run}, rows, n, width, group, acc);
    default:  // 5-8 bits: unpacked first
      unpack_runs_f32(packed, n, width, bits, tmp, buf);
      accumulate_src(w, FloatRows{buf, width}, rows, n, width, group, acc);
  }
}

}  // namespace kvq::cpu
