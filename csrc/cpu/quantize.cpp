// CPU kernels of kvq::quantize and kvq::dequantize.
//
// A tensor is viewed as [outer, n, inner] around the grouped axis (see quantize_args.h).
// inner == 1: each group is a contiguous run of group_size elements (per-token quantization).
// inner > 1: each group is a column of a [group_size, inner] tile (per-channel quantization,
// e.g. KIVI keys grouped along tokens); the tile is processed row by row so the inner loops run
// across contiguous columns and vectorize.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/bitpack.h"
#include "cpu/quantize_math.h"
#include "cpu/simd.h"
#include "dispatch.h"
#include "quantize_args.h"

namespace kvq::cpu {
namespace {

// ---- float32 hot loops (compiled per SIMD target) ------------------------------------------

// Min and max of a run; `finite` is false when any element is NaN or +-Inf (x * 0 is NaN then).
KVQ_SIMD void minmax_run(const float* x, int64_t n, float* mn, float* mx, bool* finite) {
  float lo = x[0], hi = x[0], poison = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    poison += x[i] * 0.f;
  }
  *mn = lo;
  *mx = hi;
  *finite = poison == 0.f;
}

KVQ_SIMD void minmax_cols(const float* tile, int64_t rows, int64_t width, float* mn, float* mx,
                          float* poison) {
  for (int64_t w = 0; w < width; ++w) {
    mn[w] = mx[w] = tile[w];
    poison[w] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = tile + r * width;
    for (int64_t w = 0; w < width; ++w) {
      mn[w] = row[w] < mn[w] ? row[w] : mn[w];
      mx[w] = row[w] > mx[w] ? row[w] : mx[w];
      poison[w] += row[w] * 0.f;
    }
  }
}

KVQ_SIMD void encode_run(const float* x, int64_t n, GroupParams p, float qmax, int bits,
                         uint8_t* tmp, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) tmp[i] = encode(x[i], p.zero, p.inv, qmax);
  pack_run(tmp, n, bits, out);
}

KVQ_SIMD void encode_tile(const float* tile, int64_t rows, int64_t width, const float* zero,
                          const float* inv, float qmax, int bits, uint8_t* tmp, uint8_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = tile + r * width;
    uint8_t* codes = tmp + r * width;
    for (int64_t w = 0; w < width; ++w) codes[w] = encode(row[w], zero[w], inv[w], qmax);
  }
  pack_rows(tmp, rows, width, bits, out);
}

KVQ_SIMD void decode_run(const uint8_t* packed, int64_t n, int bits, float scale, float zero,
                         uint8_t* tmp, float* out) {
  unpack_run(packed, n, bits, tmp);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(tmp[i]) * scale + zero;
}

KVQ_SIMD void decode_tile(const uint8_t* packed, int64_t rows, int64_t width, int bits,
                          const float* scale, const float* zero, uint8_t* tmp, float* out) {
  unpack_rows(packed, rows, width, bits, tmp);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t w = 0; w < width; ++w)
      out[r * width + w] = static_cast<float>(tmp[r * width + w]) * scale[w] + zero[w];
}

// ---- dtype plumbing --------------------------------------------------------------------------

// Returns a float32 view of src: src itself for float inputs, else a converted copy in buf.
template <typename T>
const float* as_float(const T* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf.data();
  }
}

template <typename T>
void store_float(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename S>
void store_params(const GroupParams& p, S* scale, S* zero) {
  *scale = static_cast<S>(p.scale);
  *zero = static_cast<S>(p.zero);
}

template <typename T, typename S>
void quantize_typed(const at::Tensor& x, const GroupedView& v, int bits, int64_t group,
                    at::Tensor& codes, at::Tensor& scale, at::Tensor& zero) {
  const T* xp = x.const_data_ptr<T>();
  uint8_t* cp = codes.mutable_data_ptr<uint8_t>();
  S* sp = scale.mutable_data_ptr<S>();
  S* zp = zero.mutable_data_ptr<S>();
  const bool half = std::is_same_v<S, c10::Half>;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int64_t groups = v.n / group;
  const int64_t tile = group * v.inner;             // elements per group tile
  const int64_t packed_tile = group * bits / 8 * v.inner;  // bytes per packed tile
  const int64_t grain = std::max<int64_t>(1, 32768 / tile);

  at::parallel_for(0, v.outer * groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<uint8_t> tmp(tile);
    std::vector<float> mn(v.inner), mx(v.inner), poison(v.inner), zeros(v.inner), inv(v.inner);
    for (int64_t t = begin; t < end; ++t) {
      const float* xf = as_float(xp + t * tile, tile, buf);
      uint8_t* out = cp + t * packed_tile;
      if (v.inner == 1) {
        bool finite;
        minmax_run(xf, group, &mn[0], &mx[0], &finite);
        GroupParams p = group_params(mn[0], mx[0], bits, half);
        if (!finite) p = group_params(NAN, NAN, bits, half);
        encode_run(xf, group, p, qmax, bits, tmp.data(), out);
        store_params(p, sp + t, zp + t);
        continue;
      }
      minmax_cols(xf, group, v.inner, mn.data(), mx.data(), poison.data());
      for (int64_t w = 0; w < v.inner; ++w) {
        GroupParams p = poison[w] == 0.f ? group_params(mn[w], mx[w], bits, half)
                                         : group_params(NAN, NAN, bits, half);
        zeros[w] = p.zero;
        inv[w] = p.inv;
        store_params(p, sp + t * v.inner + w, zp + t * v.inner + w);
      }
      encode_tile(xf, group, v.inner, zeros.data(), inv.data(), qmax, bits, tmp.data(), out);
    }
  });
}

template <typename T, typename S>
void dequantize_typed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                      const GroupedView& v, int bits, int64_t group, at::Tensor& out) {
  const uint8_t* cp = codes.const_data_ptr<uint8_t>();
  const S* sp = scale.const_data_ptr<S>();
  const S* zp = zero.const_data_ptr<S>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t groups = v.n / group;
  const int64_t tile = group * v.inner;
  const int64_t packed_tile = group * bits / 8 * v.inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / tile);

  at::parallel_for(0, v.outer * groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> tmp(tile);
    std::vector<float> buf(tile), s(v.inner), z(v.inner);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t w = 0; w < v.inner; ++w) {
        s[w] = static_cast<float>(sp[t * v.inner + w]);
        z[w] = static_cast<float>(zp[t * v.inner + w]);
      }
      float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(op + t * tile) : buf.data();
      if (v.inner == 1) {
        decode_run(cp + t * packed_tile, group, bits, s[0], z[0], tmp.data(), dst);
      } else {
        decode_tile(cp + t * packed_tile, group, v.inner, bits, s.data(), z.data(), tmp.data(), dst);
      }
      if constexpr (!std::is_same_v<T, float>) store_float(dst, tile, op + t * tile);
    }
  });
}

// ---- the ops -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t bits,
                                                        int64_t group_size, int64_t axis,
                                                        std::optional<at::ScalarType> scale_dtype) {
  const GroupedView v = check_quantize_args(x_in, bits, group_size, axis, scale_dtype);
  const at::Tensor x = x_in.contiguous();
  const at::ScalarType sdt = scale_dtype.value_or(at::kHalf);
  at::Tensor codes = at::empty(with_axis(x.sizes(), v.axis, v.n * bits / 8), x.options().dtype(at::kByte));
  at::Tensor scale = at::empty(with_axis(x.sizes(), v.axis, v.n / group_size), x.options().dtype(sdt));
  at::Tensor zero = at::empty_like(scale);
  KVQ_DISPATCH_FLOATS(x.scalar_type(), "kvq::quantize", [&] {
    if (sdt == at::kHalf) {
      quantize_typed<scalar_t, c10::Half>(x, v, bits, group_size, codes, scale, zero);
    } else {
      quantize_typed<scalar_t, float>(x, v, bits, group_size, codes, scale, zero);
    }
  });
  return {codes, scale, zero};
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scale_in,
                      const at::Tensor& zero_in, int64_t bits, int64_t group_size, int64_t axis,
                      at::ScalarType dtype) {
  const GroupedView v =
      check_dequantize_args("kvq::dequantize", codes_in, scale_in, zero_in, bits, group_size, axis, dtype);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.contiguous();
  at::Tensor out = at::empty(with_axis(codes.sizes(), v.axis, v.n), codes.options().dtype(dtype));
  KVQ_DISPATCH_FLOATS(dtype, "kvq::dequantize", [&] {
    if (scale.scalar_type() == at::kHalf) {
      dequantize_typed<scalar_t, c10::Half>(codes, scale, zero, v, bits, group_size, out);
    } else {
      dequantize_typed<scalar_t, float>(codes, scale, zero, v, bits, group_size, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) {
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
}

}  // namespace kvq::cpu
