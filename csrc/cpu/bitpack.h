// Bit packing of b-bit codes (1 <= b <= 8) along one axis. Codes form an LSB-first bit stream:
// element j of a run occupies bits [j*b, (j+1)*b), and stream bit k is bit (k % 8) of byte k/8.
// Eight elements therefore fill exactly b bytes, which is why group sizes are multiples of 8.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvq::cpu {

// Pack `n` (a multiple of 8) contiguous codes into n*b/8 bytes. 2-, 4- and 8-bit codes take
// shift-and-or paths the compiler vectorizes.
inline void pack_run(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  switch (bits) {
    case 8:
      std::memcpy(out, codes, n);
      return;
    case 4:
      for (int64_t i = 0; i < n / 2; ++i) out[i] = codes[2 * i] | (codes[2 * i + 1] << 4);
      return;
    case 2:
      for (int64_t i = 0; i < n / 4; ++i)
        out[i] = codes[4 * i] | (codes[4 * i + 1] << 2) | (codes[4 * i + 2] << 4) |
                 (codes[4 * i + 3] << 6);
      return;
    default:
      for (int64_t c = 0; c < n / 8; ++c) {
        uint64_t word = 0;
        for (int j = 0; j < 8; ++j) word |= static_cast<uint64_t>(codes[8 * c + j]) << (j * bits);
        for (int k = 0; k < bits; ++k) out[c * bits + k] = static_cast<uint8_t>(word >> (8 * k));
      }
  }
}

// Inverse of pack_run.
inline void unpack_run(const uint8_t* packed, int64_t n, int bits, uint8_t* codes) {
  switch (bits) {
    case 8:
      std::memcpy(codes, packed, n);
      return;
    case 4:
      for (int64_t i = 0; i < n / 2; ++i) {
        codes[2 * i] = packed[i] & 0xF;
        codes[2 * i + 1] = packed[i] >> 4;
      }
      return;
    case 2:
      for (int64_t i = 0; i < n / 4; ++i) {
        codes[4 * i] = packed[i] & 3;
        codes[4 * i + 1] = (packed[i] >> 2) & 3;
        codes[4 * i + 2] = (packed[i] >> 4) & 3;
        codes[4 * i + 3] = packed[i] >> 6;
      }
      return;
    default: {
      const uint64_t mask = (1u << bits) - 1;
      for (int64_t c = 0; c < n / 8; ++c) {
        uint64_t word = 0;
        for (int k = 0; k < bits; ++k) word |= static_cast<uint64_t>(packed[c * bits + k]) << (8 * k);
        for (int j = 0; j < 8; ++j) codes[8 * c + j] = static_cast<uint8_t>((word >> (j * bits)) & mask);
      }
    }
  }
}

// Column-wise variants for per-channel groups: rows of `width` codes, packed along the rows.
// Row j of an 8-row chunk lands in bits [j*b, (j+1)*b) of each column's stream, so packed row
// k of the chunk holds byte k of every column's 64-bit word.
inline void pack_rows(const uint8_t* codes, int64_t rows, int64_t width, int bits, uint8_t* out) {
  for (int64_t c = 0; c < rows / 8; ++c) {
    const uint8_t* in = codes + c * 8 * width;
    uint8_t* dst = out + c * bits * width;
    std::memset(dst, 0, bits * width);
    for (int j = 0; j < 8; ++j) {
      // Row j's code covers stream bits [j*b, j*b + b): byte `first`, and the next if it spans.
      const int first = (j * bits) / 8, shift = (j * bits) % 8;
      const uint8_t* row = in + j * width;
      uint8_t* lo = dst + first * width;
      for (int64_t w = 0; w < width; ++w) lo[w] |= static_cast<uint8_t>(row[w] << shift);
      if (shift + bits > 8) {
        uint8_t* hi = lo + width;
        for (int64_t w = 0; w < width; ++w) hi[w] |= static_cast<uint8_t>(row[w] >> (8 - shift));
      }
    }
  }
}

inline void unpack_rows(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                        uint8_t* codes) {
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t c = 0; c < rows / 8; ++c) {
    const uint8_t* src = packed + c * bits * width;
    uint8_t* out = codes + c * 8 * width;
    for (int j = 0; j < 8; ++j) {
      const int first = (j * bits) / 8, shift = (j * bits) % 8;
      const bool spans = shift + bits > 8;
      for (int64_t w = 0; w < width; ++w) {
        uint32_t v = src[first * width + w] >> shift;
        if (spans) v |= static_cast<uint32_t>(src[(first + 1) * width + w]) << (8 - shift);
        out[j * width + w] = static_cast<uint8_t>(v & mask);
      }
    }
  }
}

}  // namespace kvq::cpu
