// CPU kernel of kvq::remat_kv (XQuant): out = X_hat @ W^T + bias, RoPE on the key part, with X
// packed per token. X_hat is dequantized kTileRows tokens at a time into a small per-thread
// buffer (never whole); each tile goes through one float32 GEMM against the float32 weight and
// the result gets bias and RoPE before it is cast to the output dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/tiles.h"
#include "dispatch.h"
#include "remat_args.h"

namespace kvq::cpu {
namespace {

// 32 tokens x 576 channels of float32 is 72 KiB: the tile stays in L2 next to the weight.
constexpr int64_t kTileRows = 32;

template <typename T, typename S>
void run_remat(const RematShape& s, int bits, int64_t G, const uint8_t* codes, const S* scale,
               const S* zero, const at::Tensor& w_t, const float* bias, const float* cos,
               const float* sin, bool cos_batched, int64_t rope_dim, T* out) {
  const int64_t d = s.d, n_out = s.n_out, groups = d / G, hd = s.head_dim;
  const int64_t tiles = (s.T + kTileRows - 1) / kTileRows;
  const int64_t row_bytes = d * bits / 8;
  at::parallel_for(0, s.N * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(kTileRows * d), y(kTileRows * n_out), sz(2 * kTileRows * groups);
    std::vector<uint8_t> tmp(d);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / tiles, t0 = (w % tiles) * kTileRows;
      const int64_t rows = std::min(kTileRows, s.T - t0), row0 = n * s.T + t0;
      for (int64_t e = 0; e < rows * groups; ++e) {
        sz[e] = static_cast<float>(scale[row0 * groups + e]);
        sz[rows * groups + e] = static_cast<float>(zero[row0 * groups + e]);
      }
      dequant_col_groups(codes + row0 * row_bytes, rows, d, G, bits, sz.data(),
                         sz.data() + rows * groups, tmp.data(), x.data());
      at::Tensor xt = at::from_blob(x.data(), {rows, d}, f32);
      at::Tensor yt = at::from_blob(y.data(), {rows, n_out}, f32);
      at::mm_out(yt, xt, w_t);  // single-threaded here: we are inside the parallel region
      for (int64_t r = 0; r < rows; ++r) {
        float* yr = y.data() + r * n_out;
        if (bias != nullptr)
          for (int64_t o = 0; o < n_out; ++o) yr[o] += bias[o];
        if (rope_dim > 0) {
          const int64_t t = t0 + r, crow = ((cos_batched ? n : 0) * s.T + t) * hd;
          const float *c = cos + crow, *sn = sin + crow;
          const int64_t half = hd / 2;
          for (int64_t h = 0; h < rope_dim; h += hd) {
            float* k = yr + h;
            for (int64_t i = 0; i < half; ++i) {
              // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): as the reference.
              const float a = k[i], b = k[i + half];
              k[i] = a * c[i] - b * sn[i];
              k[i + half] = b * c[i + half] + a * sn[i + half];
            }
          }
        }
        T* orow = out + (row0 + r) * n_out;
        for (int64_t o = 0; o < n_out; ++o) orow[o] = static_cast<T>(yr[o]);
      }
    }
  });
}

at::Tensor remat_kv(const at::Tensor& codes_in, const at::Tensor& scale_in,
                    const at::Tensor& zero_in, int64_t bits, int64_t group_size,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                    int64_t rope_dim) {
  const RematShape s = check_remat_kv_args(codes_in, scale_in, zero_in, bits, group_size, weight,
                                           bias, cos, sin, rope_dim);
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(),
                   zero = zero_in.contiguous();
  // float32 weight seen as [d, n_out]; a view (no copy) when the weight already is float32.
  const at::Tensor w_t = weight.to(at::kFloat).t();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor c32 = cos.has_value() ? cos->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor s32 = sin.has_value() ? sin->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.T, s.n_out}, weight.options());
  KVQ_DISPATCH_FLOATS(weight.scalar_type(), "kvq::remat_kv", [&] {
    const auto go = [&](auto scale_tag) {
      using S = decltype(scale_tag);
      run_remat<scalar_t, S>(s, static_cast<int>(bits), group_size,
                             codes.const_data_ptr<uint8_t>(), scale.const_data_ptr<S>(),
                             zero.const_data_ptr<S>(), w_t,
                             b32.defined() ? b32.const_data_ptr<float>() : nullptr,
                             c32.defined() ? c32.const_data_ptr<float>() : nullptr,
                             s32.defined() ? s32.const_data_ptr<float>() : nullptr,
                             c32.defined() && c32.size(0) == s.N && s.N > 1, rope_dim,
                             out.mutable_data_ptr<scalar_t>());
    };
    if (scale.scalar_type() == at::kHalf) go(c10::Half{}); else go(float{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) { m.impl("remat_kv", &remat_kv); }

}  // namespace kvq::cpu
