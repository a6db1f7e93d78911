// Float32 building blocks shared by the CPU kernels that read packed codes: dequantize one
// tile into a small (L1-sized) buffer, and the vector primitives the kernels run over it.
// Defined in tiles.cpp, compiled per SIMD target (simd.h).
#pragma once

#include <cstdint>

namespace kvq::cpu {

float dot(const float* a, const float* b, int64_t n);
void axpy(float alpha, const float* x, float* y, int64_t n);
void scale_inplace(float alpha, float* y, int64_t n);

// Groups along rows (per-channel keys): packed [rows*bits/8, width] -> out [rows, width],
// one (scale, zero) per column for the whole tile. `rows` is the group size.
void dequant_row_groups(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                        const float* scale, const float* zero, uint8_t* tmp, float* out);

// Groups along columns (per-token values): packed [rows, width*bits/8] -> out [rows, width],
// one (scale, zero) per row and group of `group` columns, at scale[row * (width/group) + g].
void dequant_col_groups(const uint8_t* packed, int64_t rows, int64_t width, int64_t group,
                        int bits, const float* scale, const float* zero, uint8_t* tmp, float* out);

}  // namespace kvq::cpu
