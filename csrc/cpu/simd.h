// Runtime-dispatched vectorization without requiring AVX2/AVX-512 at run time: GCC/Clang
// compile a function marked KVQ_SIMD once per target and pick the best at load time (ifunc).
// The targets are the x86-64 levels v4 (AVX-512 F/BW/DQ/VL) and v3 (AVX2 with FMA and F16C)
// rather than the bare "avx512f" / "avx2", which leave out FMA: where a file allows contraction
// (tiles.cpp's attention kernels), a*b+c becomes one fused instruction only with FMA enabled.
//
// Kernels that need more than a loop the compiler vectorizes by itself (register-blocked tiles,
// variable shifts, exp) write them with the compilers' generic vector types below: 8 floats
// that become one AVX register in the AVX2/AVX-512 builds and two SSE registers in the baseline
// one, so the same source serves every target. Helpers that take or return them are
// always-inlined into the KVQ_SIMD callers, so no vector crosses a function boundary.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(TORCHKVQ_NO_CLONES)
#define KVQ_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// Instructions a clone cannot take (one source for every target) are picked at run time too.
// Off in the sanitizer builds, which thereby run the portable paths.
#define KVQ_RUNTIME_ISA 1
#else
#define KVQ_SIMD
#endif

#define KVQ_INLINE inline __attribute__((always_inline))

// Helpers taking or returning these vectors are always inlined (here and in the files that
// include this one), so the ABI of passing 32-byte vectors (-Wpsabi) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace kvq::cpu::vec {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef uint16_t h8 __attribute__((vector_size(16)));

KVQ_INLINE f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
KVQ_INLINE void store(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
// A broadcast (-0 becomes +0). GCC 12 lowers the other spellings ({x, x, ...}, x - f8{})
// to eight scalar inserts inside target_clones functions; this one to vbroadcastss.
KVQ_INLINE f8 splat(float x) { return f8{} + x; }
// *p in every lane, loaded straight into the vector (one vpbroadcastd from memory). splat()
// costs a scalar add (its +0) and a register broadcast on top of the load, which an inner loop
// that broadcasts once per two multiply-adds feels. Bit for bit, -0 included.
KVQ_INLINE f8 splat_from(const float* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return reinterpret_cast<f8>(i8{} + bits);
}

KVQ_INLINE float hsum(f8 v) {
  f4 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const f4 t = lo + hi;
  return (t[0] + t[2]) + (t[1] + t[3]);
}

}  // namespace kvq::cpu::vec
