// CPU kernel of kvq::outlier_split: per vector, the n_low smallest and n_high largest values by
// (value, index) order - NaN above everything, as torch.sort orders it - set aside exactly.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "dispatch.h"
#include "matmul_args.h"

namespace kvq::cpu {
namespace {

template <typename T>
void split_vectors(const T* x, int64_t rows, int64_t K, int64_t n_low, int64_t n_high, T* dense,
                   int16_t* index, T* value) {
  const int64_t n = n_low + n_high;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / K), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(K);
    std::vector<float> v(K);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * K;
      for (int64_t i = 0; i < K; ++i) v[i] = static_cast<float>(xr[i]);
      const auto less = [&](int64_t i, int64_t j) {
        const bool ni = std::isnan(v[i]), nj = std::isnan(v[j]);
        if (ni != nj) return nj;  // NaN sorts last
        if (!ni && v[i] != v[j]) return v[i] < v[j];
        return i < j;
      };
      std::iota(order.begin(), order.end(), 0);
      // The (n_low + 1)-th smallest is the lower bound of what stays dense.
      std::partial_sort(order.begin(), order.begin() + n_low + 1, order.end(), less);
      const int64_t lo = order[n_low];
      for (int64_t j = 0; j < n_low; ++j) index[r * n + j] = static_cast<int16_t>(order[j]);
      std::iota(order.begin(), order.end(), 0);
      const auto greater = [&](int64_t i, int64_t j) { return less(j, i); };
      std::partial_sort(order.begin(), order.begin() + n_high + 1, order.end(), greater);
      const int64_t hi = order[n_high];
      for (int64_t j = 0; j < n_high; ++j) index[r * n + n_low + j] = static_cast<int16_t>(order[j]);

      T* dr = dense + r * K;
      std::copy(xr, xr + K, dr);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = index[r * n + j];
        value[r * n + j] = xr[i];
        dr[i] = j < n_low ? xr[lo] : xr[hi];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> outlier_split(const at::Tensor& x_in,
                                                             int64_t n_low, int64_t n_high) {
  check_outlier_split_args(x_in, n_low, n_high);
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), rows = x.numel() / K, n = n_low + n_high;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor dense = at::empty_like(x);
  at::Tensor index = at::empty(out_shape, x.options().dtype(at::kShort));
  at::Tensor value = at::empty(out_shape, x.options());
  KVQ_DISPATCH_FLOATS(x.scalar_type(), "kvq::outlier_split", [&] {
    split_vectors<scalar_t>(x.const_data_ptr<scalar_t>(), rows, K, n_low, n_high,
                            dense.mutable_data_ptr<scalar_t>(), index.mutable_data_ptr<int16_t>(),
                            value.mutable_data_ptr<scalar_t>());
  });
  return {dense, index, value};
}

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CPU, m) { m.impl("outlier_split", &outlier_split); }

}  // namespace kvq::cpu
