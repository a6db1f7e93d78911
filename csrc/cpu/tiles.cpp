#include "cpu/tiles.h"

#include "cpu/bitpack.h"
#include "cpu/simd.h"

namespace kvq::cpu {

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

}  // namespace kvq::cpu
