// Element access with a runtime dtype, shared by the CUDA kernels (no torch headers).
//
// Kernels take float32, float16 or bfloat16 tensors as raw pointers plus a DType (launchers.h)
// and convert to float32 for all arithmetic. Keep these off the inner loops, or behind branches
// that are uniform across a warp: the switch is per call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "launchers.h"

namespace kvq::cuda {

__device__ __forceinline__ float load_elem(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

// Rounds to nearest even, as the CPU kernels' conversions do.
__device__ __forceinline__ void store_elem(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      return;
    case DType::kF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      return;
    default:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      return;
  }
}

}  // namespace kvq::cuda
