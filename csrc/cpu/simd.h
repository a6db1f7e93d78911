// Runtime-dispatched vectorization without requiring AVX2/AVX-512 at run time: GCC/Clang
// compile a function marked KVQ_SIMD once per target and pick the best at load time (ifunc).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(TORCHKVQ_NO_CLONES)
#define KVQ_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KVQ_SIMD
#endif
