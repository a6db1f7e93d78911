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

// ---- attention over codes (csrc/cpu/attention.cpp); `width` is a multiple of 8 throughout.

// IEEE half (raw bits) to float, exactly.
void half_to_float(const uint16_t* src, float* dst, int64_t n);

// out[r, c] = a[r, c] * s[c] for r < rows, c < width.
void mul_columns(const float* a, int64_t rows, int64_t width, const float* s, float* out);

// The scores of one tile: out[r * n + j] = a[r, :] . b[j, :] (+ bias[r] if bias), a [rows,
// width], b [n, width], for every query row against every token.
void score_tile(const float* a, int64_t rows, const float* b, int64_t n, int64_t width,
                const float* bias, float* out);

// score_tile against a tile of key codes in dequant_row_groups' layout (`n` a multiple of 8), read
// straight from the packed bytes for 1, 2 and 4 bits and unpacked first for the other widths.
// `tmp` holds n*width bytes and `buf` max(rows, n)*width floats.
void score_codes(const float* a, int64_t rows, const uint8_t* packed, int64_t n, int64_t width,
                 int bits, const float* bias, uint8_t* tmp, float* buf, float* out);

// max(init, s[0], ..., s[n-1]); NaN when any of them is NaN (as torch.max), so that a row with a
// NaN score comes out NaN instead of being taken for a row that sees nothing.
float max_of(const float* s, int64_t n, float init);

// p[j] = exp(s[j] - m), 0 where s[j] = -inf; returns the sum of p. Needs m >= max(s), finite.
float exp_shifted(const float* s, int64_t n, float m, float* p);

// Value weights of a quantized tile with one (scale, zero) per token and group of `group`
// columns (scale[j * groups + g], groups = width / group), from probabilities p [rows, n]:
// w[(r * groups + g) * n + j] = p[r, j] * scale[j, g], and acc[r, c] += sum_j p[r, j] *
// zero[j, c / group]. `n` is a multiple of 8; `tmp` holds 2 * groups * n floats.
void value_weights(const float* p, int64_t rows, int64_t n, const float* scale, const float* zero,
                   int64_t width, int64_t group, float* tmp, float* w, float* acc);

// acc[r, c] += sum_j w[(r * groups + c / group) * n + j] * x[j, c] (groups = width / group):
// token j's weight for row r and the column group of c (value_weights), against codes (or
// values) x [n, width]; acc [rows, width]. `group` divides width and is a multiple of 8.
void accumulate_tile(const float* w, const float* x, int64_t rows, int64_t n, int64_t width,
                     int64_t group, float* acc);

// accumulate_tile against a tile of value codes in dequant_col_groups' layout, read in place for
// 1-4 bits and unpacked first for wider codes. `tmp` holds n*width bytes and `buf` n*width
// floats.
void accumulate_codes(const float* w, const uint8_t* packed, int64_t rows, int64_t n,
                      int64_t width, int64_t group, int bits, uint8_t* tmp, float* buf,
                      float* acc);

}  // namespace kvq::cpu
