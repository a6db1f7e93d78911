// CUDA backend of kvq::quantize / kvq::dequantize: argument checks (shared with the CPU kernels),
// device guard, output allocation, and calls into the torch-free launchers of quantize.cu.
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

#include "launchers.h"
#include "quantize_args.h"

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
      check_dequantize_args(codes_in, scale_in, zero_in, bits, group_size, axis, dtype);
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

}  // namespace

TORCH_LIBRARY_IMPL(kvq, CUDA, m) {
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
}

}  // namespace kvq::cuda
