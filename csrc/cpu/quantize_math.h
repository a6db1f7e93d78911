// The float32 math of asymmetric min/max quantization, shared by every CPU kernel that packs
// or unpacks codes. Must match src/torchkvq/reference.py bit for bit.
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace kvq::cpu {

struct GroupParams {
  float scale;  // stored scale, already rounded to the scale dtype
  float zero;   // stored zero point (the group minimum), rounded likewise
  float inv;    // 1 / scale, or 0 for a constant group so every code is 0
};

inline float round_to(float v, bool half) {
  return half ? static_cast<float>(c10::Half(v)) : v;
}

// A group whose min/max or stored scale/zero is not finite (NaN/Inf input, or a range the
// scale dtype cannot hold) is stored as NaN so that it dequantizes to NaN, never to garbage.
inline GroupParams group_params(float mn, float mx, int bits, bool half_scale) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float qmax = static_cast<float>((1 << bits) - 1);
  const float scale = round_to((mx - mn) / qmax, half_scale);
  const float zero = round_to(mn, half_scale);
  if (!std::isfinite(mn) || !std::isfinite(mx) || !std::isfinite(scale) || !std::isfinite(zero)) {
    return {nan, nan, 0.f};
  }
  return {scale, zero, scale > 0.f ? 1.f / scale : 0.f};
}

// round-half-to-even of a value already clamped to [0, 255], matching torch.round; the magic
// constant keeps the loop vectorizable where nearbyint would not be.
inline float round_small(float v) {
  constexpr float magic = 12582912.f;  // 1.5 * 2^23
  return (v + magic) - magic;
}

inline uint8_t encode(float x, float zero, float inv, float qmax) {
  float v = (x - zero) * inv;
  v = v < 0.f ? 0.f : (v > qmax ? qmax : v);
  // NaN (only from a NaN group, whose inv is 0 -> v is NaN only if x is) encodes as 0.
  return v == v ? static_cast<uint8_t>(round_small(v)) : 0;
}

}  // namespace kvq::cpu
