// Torch-free entry points of the CUDA kernels (csrc/cuda/*.cu), called by csrc/cuda/ops_cuda.cpp.
// Only plain C++ types and cudaStream_t cross this boundary, so the .cu files compile with nvcc
// alone in about a second, without torch headers.
//
// Every launcher takes contiguous tensors seen as [outer, n, inner] around the grouped axis (see
// quantize_args.h) and enqueues its kernels on `stream`. It returns cudaErrorInvalidValue for
// arguments it cannot handle (the tensor glue validates first, so this signals a bug) and
// otherwise cudaSuccess; launch errors are left for the caller's cudaGetLastError
// (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvq::cuda {

// Element types of the inputs/outputs and of scale/zero (scale/zero: kF16 or kF32 only).
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// kvq::quantize. x: [outer, n, inner] of x_dtype, n % group_size == 0, group_size % 8 == 0.
// codes: [outer, n * bits / 8, inner] uint8. scale, zero: [outer, n / group_size, inner] of
// scale_dtype (kF16 or kF32). 1 <= bits <= 8.
cudaError_t launch_quantize(const void* x, DType x_dtype, uint8_t* codes, void* scale, void* zero,
                            DType scale_dtype, int64_t outer, int64_t n, int64_t inner,
                            int64_t group_size, int bits, cudaStream_t stream);

// kvq::dequantize: the inverse, out[outer, n, inner] of out_dtype from codes/scale/zero shaped as
// above.
cudaError_t launch_dequantize(const uint8_t* codes, const void* scale, const void* zero,
                              DType scale_dtype, void* out, DType out_dtype, int64_t outer,
                              int64_t n, int64_t inner, int64_t group_size, int bits,
                              cudaStream_t stream);

}  // namespace kvq::cuda
