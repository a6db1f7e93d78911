// CPU kernel of kvq::dequant_matmul: a @ B_hat or a @ B_hat^T with B packed. B_hat [N, K] (per
// batch) is dequantized a tile of rows at a time into an L1-sized buffer - never whole - and
// the tile is consumed at once: dot products for a @ B_hat^T, row updates for a @ B_hat.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/tiles.h"
#include "dispatch.h"
#include "matmul_args.h"

namespace kvq::cpu {
namespace {

template <typename TA, typename S>
struct DequantMatmul {
  MatmulShape s;
  int bits;
  int64_t G;
  bool row_groups;  // groups along N (axis -2) rather than along K (axis -1)
  bool transpose_b;
  const TA* a;
  const uint8_t* codes;
  const S *scale, *zero;
  const int16_t* oi;
  const TA* ov;
  TA* out;

  int64_t tile_rows() const { return row_groups ? G : std::min<int64_t>(s.N, 32); }

  // Dequantize rows [n0, n0 + rows) of batch element `bt` into tile [rows, K].
  void load(int64_t bt, int64_t n0, int64_t rows, std::vector<float>& tile,
            std::vector<float>& sz, std::vector<uint8_t>& tmp) const {
    const int64_t K = s.K;
    if (row_groups) {
      const int64_t grp = (bt * s.N + n0) / G;  // scale row of this group tile
      for (int64_t c = 0; c < K; ++c) {
        sz[c] = static_cast<float>(scale[grp * K + c]);
        sz[K + c] = static_cast<float>(zero[grp * K + c]);
      }
      dequant_row_groups(codes + (bt * s.N + n0) * K * bits / 8, rows, K, bits, sz.data(),
                         sz.data() + K, tmp.data(), tile.data());
    } else {
      const int64_t groups = K / G, first = (bt * s.N + n0) * groups;
      for (int64_t e = 0; e < rows * groups; ++e) {
        sz[e] = static_cast<float>(scale[first + e]);
        sz[rows * groups + e] = static_cast<float>(zero[first + e]);
      }
      dequant_col_groups(codes + (bt * s.N + n0) * K * bits / 8, rows, K, G, bits, sz.data(),
                         sz.data() + rows * groups, tmp.data(), tile.data());
    }
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t row = bt * s.N + n0 + j;
      for (int64_t o = 0; o < s.n_out; ++o)
        tile[j * K + oi[row * s.n_out + o]] += static_cast<float>(ov[row * s.n_out + o]);
    }
  }

  void run() const {
    const int64_t tr = tile_rows(), tiles = (s.N + tr - 1) / tr, K = s.K;
    const int64_t sz_len = 2 * std::max<int64_t>(K, tr * (K / G));
    // a @ B^T: tiles own disjoint output columns, so (batch, tile) pairs run in parallel.
    // a @ B: every tile adds into all output rows, so each batch element runs on one thread.
    const int64_t work = transpose_b ? s.batch * tiles : s.batch;
    at::parallel_for(0, work, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tile(tr * K), sz(sz_len), arow(std::max(s.N, K)), acc;
      std::vector<uint8_t> tmp(tr * K);
      for (int64_t w = begin; w < end; ++w) {
        if (transpose_b) {
          const int64_t bt = w / tiles, n0 = (w % tiles) * tr, rows = std::min(tr, s.N - n0);
          load(bt, n0, rows, tile, sz, tmp);
          for (int64_t m = 0; m < s.M; ++m) {
            const TA* am = a + (bt * s.M + m) * K;
            for (int64_t c = 0; c < K; ++c) arow[c] = static_cast<float>(am[c]);
            TA* om = out + (bt * s.M + m) * s.N + n0;
            for (int64_t j = 0; j < rows; ++j) om[j] = static_cast<TA>(dot(arow.data(), tile.data() + j * K, K));
          }
          continue;
        }
        const int64_t bt = w;
        acc.assign(s.M * K, 0.f);
        for (int64_t n0 = 0; n0 < s.N; n0 += tr) {
          const int64_t rows = std::min(tr, s.N - n0);
          load(bt, n0, rows, tile, sz, tmp);
          for (int64_t m = 0; m < s.M; ++m) {
            const TA* am = a + (bt * s.M + m) * s.N + n0;
            for (int64_t j = 0; j < rows; ++j)
              axpy(static_cast<float>(am[j]), tile.data() + j * K, acc.data() + m * K, K);
          }
        }
        TA* ob = out + bt * s.M * K;
        for (int64_t e = 0; e < s.M * K; ++e) ob[e] = static_cast<TA>(acc[e]);
      }
    });
  }
};

at::Tensor dequant_matmul(const at::Tensor& a_in, const at::Tensor& codes_in,
                          const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t bits,
                          int64_t group_size, int64_t axis, bool transpose_b,
                          const std::optional<at::Tensor>& outlier_index,
                          const std::optional<at::Tensor>& outlier_value) {
  const MatmulShape shp = check_dequant_matmul_args(a_in, codes_in, scale_in, zero_in, bits,
                                                    group_size, axis, transpose_b, outlier_index,
                                                    outlier_value);
  const at::Tensor a = a_in.contiguous(), codes = codes_in.contiguous(),
                   scale = scale_in.contiguous(), zero = zero_in.contiguous();
  const at::Tensor oi = outlier_index.has_value() ? outlier_index->contiguous() : at::Tensor();
  const at::Tensor ov = outlier_value.has_value() ? outlier_value->contiguous() : at::Tensor();
  std::vector<int64_t> out_shape = a.sizes().vec();
  out_shape.back() = transpose_b ? shp.N : shp.K;
  at::Tensor out = at::empty(out_shape, a.options());
  KVQ_DISPATCH_FLOATS(a.scalar_type(), "kvq::dequant_matmul", [&] {
    const auto go = [&](auto scale_tag) {
      using S = decltype(scale_tag);
      DequantMatmul<scalar_t, S> k{shp, static_cast<int>(bits), group_size,
                                   shp.view.axis == codes.dim() - 2, transpose_b,
                                   a.const_data_ptr<scalar_t>(), codes.const_data_ptr<uint8_t>(),
                                   scale.const_data_ptr<S>(), zero.const_data_ptr<S>(),
                                   oi.defined() ? oi.const_data_ptr<int16_t>() : nullptr,
                                   ov.defined() ? ov.const_data_ptr<scalar_t>() : nullptr,
                                   out.mutable_data_ptr<scalar_t>()};
      k.run();
    };
    if (scale.scalar_type() == at::kHalf) go(c10::Half{}); else go(float{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) { m.impl("dequant_matmul", &dequant_matmul); }

}  // namespace kvq::cpu
