// Dispatch over the three input dtypes the kvq ops accept (float32, float16, bfloat16).
#pragma once

#include <ATen/Dispatch.h>

#define KVQ_DISPATCH_FLOATS(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
