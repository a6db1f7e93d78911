// CUDA backend of kvq::quantize / kvq::dequantize / kvq::outlier_split / kvq::dequant_matmul:
// argument checks (shared with the CPU kernels), device guard, output allocation, and calls into
// the torch-free launchers of quantize.cu, outliers.cu and dequant_matmul.cu. kvq::quant_attention's
// glue is in ops_attention_cuda.cpp; every CUDA kernel is registered in the block at the end.
// Compiled by the host compiler with -DTORCHKVQ_CUDA (setup.py, CUDA builds only).
//
// Only c10/cuda headers here: ATen/cuda/CUDAContext.h would drag in cuBLAS/cuSPARSE headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "launchers.h"
#include "matmul_args.h"
#include "quantize_args.h"
#include "remat_args.h"

namespace kvq::cuda {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    default:
      TORCH_CHECK(false, "kvq (CUDA): unsupported dtype ", t);  // the arg checks rule this out
  }
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x_in, int64_t bits,
                                                        int64_t group_size, int64_t axis,
                                                        std::optional<at::ScalarType> scale_dtype) {
  const GroupedView v = check_quantize_args(x_in, bits, group_size, axis, scale_dtype);
  check_cuda("kvq::quantize", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::ScalarType sdt = scale_dtype.value_or(at::kHalf);
  at::Tensor codes =
      at::empty(with_axis(x.sizes(), v.axis, v.n * bits / 8), x.options().dtype(at::kByte));
  at::Tensor scale =
      at::empty(with_axis(x.sizes(), v.axis, v.n / group_size), x.options().dtype(sdt));
  at::Tensor zero = at::empty_like(scale);
  const cudaError_t err = launch_quantize(
      x.const_data_ptr(), to_dtype(x.scalar_type()), codes.mutable_data_ptr<uint8_t>(),
      scale.mutable_data_ptr(), zero.mutable_data_ptr(), to_dtype(sdt), v.outer, v.n, v.inner,
      group_size, static_cast<int>(bits), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scale_in,
                      const at::Tensor& zero_in, int64_t bits, int64_t group_size, int64_t axis,
                      at::ScalarType dtype) {
  // Checks devices agree first, so a CPU scale next to CUDA codes gets the "one device" message.
  const GroupedView v =
      check_dequantize_args("kvq::dequantize", codes_in, scale_in, zero_in, bits, group_size, axis, dtype);
  check_cuda("kvq::dequantize", "codes", codes_in);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.contiguous();
  at::Tensor out = at::empty(with_axis(codes.sizes(), v.axis, v.n), codes.options().dtype(dtype));
  const cudaError_t err = launch_dequantize(
      codes.const_data_ptr<uint8_t>(), scale.const_data_ptr(), zero.const_data_ptr(),
      to_dtype(scale.scalar_type()), out.mutable_data_ptr(), to_dtype(dtype), v.outer, v.n,
      v.inner, group_size, static_cast<int>(bits), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> outlier_split(const at::Tensor& x_in,
                                                             int64_t n_low, int64_t n_high) {
  check_outlier_split_args(x_in, n_low, n_high);
  check_cuda("kvq::outlier_split", "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), rows = x.numel() / K, n = n_low + n_high;
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = n;
  at::Tensor dense = at::empty(x.sizes(), x.options());
  at::Tensor index = at::empty(out_shape, x.options().dtype(at::kShort));
  at::Tensor value = at::empty(out_shape, x.options());
  const cudaError_t err = launch_outlier_split(
      x.const_data_ptr(), to_dtype(x.scalar_type()), dense.mutable_data_ptr(),
      index.mutable_data_ptr<int16_t>(), value.mutable_data_ptr(), rows, K, n_low, n_high,
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dense, index, value};
}

at::Tensor dequant_matmul(const at::Tensor& a_in, const at::Tensor& codes_in,
                          const at::Tensor& scale_in, const at::Tensor& zero_in, int64_t bits,
                          int64_t group_size, int64_t axis, bool transpose_b,
                          const std::optional<at::Tensor>& outlier_index,
                          const std::optional<at::Tensor>& outlier_value) {
  // The checks also require codes, scale, zero and the outliers to be on a's device.
  const MatmulShape shp = check_dequant_matmul_args(a_in, codes_in, scale_in, zero_in, bits,
                                                    group_size, axis, transpose_b, outlier_index,
                                                    outlier_value);
  check_cuda("kvq::dequant_matmul", "a", a_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), codes = codes_in.contiguous(),
                   scale = scale_in.contiguous(), zero = zero_in.contiguous();
  const at::Tensor oi = outlier_index.has_value() ? outlier_index->contiguous() : at::Tensor();
  const at::Tensor ov = outlier_value.has_value() ? outlier_value->contiguous() : at::Tensor();
  std::vector<int64_t> out_shape = a.sizes().vec();
  out_shape.back() = transpose_b ? shp.N : shp.K;
  at::Tensor out = at::empty(out_shape, a.options());
  DequantMatmulArgs args{};
  args.a = a.const_data_ptr();
  args.a_dtype = to_dtype(a.scalar_type());
  args.codes = codes.const_data_ptr<uint8_t>();
  args.scale = scale.const_data_ptr();
  args.zero = zero.const_data_ptr();
  args.scale_dtype = to_dtype(scale.scalar_type());
  args.outlier_index = shp.n_out > 0 ? oi.const_data_ptr<int16_t>() : nullptr;
  args.outlier_value = shp.n_out > 0 ? ov.const_data_ptr() : nullptr;
  args.n_out = shp.n_out;
  args.out = out.mutable_data_ptr();
  args.batch = shp.batch;
  args.M = shp.M;
  args.N = shp.N;
  args.K = shp.K;
  args.group_size = group_size;
  args.bits = static_cast<int>(bits);
  args.row_groups = shp.view.axis == codes.dim() - 2;
  args.transpose_b = transpose_b;
  if (out.numel() == 0) return out;
  // Split-reduction scratch (float32 partials), from the caching allocator: no sync, graph-safe.
  const int64_t ws_bytes = dequant_matmul_workspace_bytes(args);
  const at::Tensor ws = at::empty({ws_bytes > 0 ? ws_bytes : 0}, a.options().dtype(at::kByte));
  const cudaError_t err = launch_dequant_matmul(args, ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr,
                                                c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor remat_kv(const at::Tensor& codes_in, const at::Tensor& scale_in,
                    const at::Tensor& zero_in, int64_t bits, int64_t group_size,
                    const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                    int64_t rope_dim) {
  // The checks also require every input to be on the device of codes.
  const RematShape s = check_remat_kv_args(codes_in, scale_in, zero_in, bits, group_size,
                                           weight_in, bias, cos, sin, rope_dim);
  check_cuda("kvq::remat_kv", "codes", codes_in);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous(), scale = scale_in.contiguous(),
                   zero = zero_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor c = cos.has_value() ? cos->contiguous() : at::Tensor();
  const at::Tensor sn = sin.has_value() ? sin->contiguous() : at::Tensor();
  at::Tensor out = at::empty({s.N, s.T, s.n_out}, weight.options());
  RematKvArgs args{};
  args.codes = codes.const_data_ptr<uint8_t>();
  args.scale = scale.const_data_ptr();
  args.zero = zero.const_data_ptr();
  args.scale_dtype = to_dtype(scale.scalar_type());
  args.weight = weight.const_data_ptr();
  args.bias = b.defined() ? b.const_data_ptr() : nullptr;
  args.cos = c.defined() ? c.const_data_ptr() : nullptr;
  args.sin = sn.defined() ? sn.const_data_ptr() : nullptr;
  args.w_dtype = to_dtype(weight.scalar_type());
  args.out = out.mutable_data_ptr();
  args.N = s.N;
  args.T = s.T;
  args.d = s.d;
  args.n_out = s.n_out;
  args.group_size = group_size;
  args.head_dim = s.head_dim;
  args.rope_dim = rope_dim;
  args.bits = static_cast<int>(bits);
  args.cos_batched = c.defined() && c.size(0) == s.N && s.N > 1;
  const int64_t ws_bytes = remat_kv_workspace_bytes(args);
  const at::Tensor ws = at::empty({ws_bytes}, weight.options().dtype(at::kByte));
  const cudaError_t err = launch_remat_kv(args, ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

// Defined in ops_attention_cuda.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quant_attention(
    const at::Tensor& query, const at::Tensor& k_codes, const at::Tensor& k_scale,
    const at::Tensor& k_zero, const at::Tensor& k_bits, const at::Tensor& v_codes,
    const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& v_bits,
    const at::Tensor& k_fp, const at::Tensor& v_fp, const at::Tensor& fp_pos,
    const std::optional<at::Tensor>& q_exclude, const std::optional<at::Tensor>& k_outlier_index,
    const std::optional<at::Tensor>& k_outlier_value,
    const std::optional<at::Tensor>& v_outlier_index,
    const std::optional<at::Tensor>& v_outlier_value, int64_t group_size, int64_t v_group_size,
    double scale, bool causal, bool return_stats, int64_t q_offset, std::optional<int64_t> window,
    std::optional<double> softcap);

TORCH_LIBRARY_IMPL(kvq, CUDA, m) {
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
  m.impl("outlier_split", &outlier_split);
  m.impl("dequant_matmul", &dequant_matmul);
  m.impl("quant_attention", &quant_attention);
  m.impl("remat_kv", &remat_kv);
}

}  // namespace kvq::cuda
