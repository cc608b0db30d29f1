// SIMT emulation: bfloat16 storage type and the conversions the kernels use
// (round-to-nearest-even; NaN stays NaN).
#pragma once
#include <cstdint>

#include "cuda_fp16.h"

struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace simt {
inline unsigned short float_to_bf16_rn(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<unsigned short>((x >> 16) | 0x40u);
  const uint32_t r = x + 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<unsigned short>(r >> 16);
}
inline float bf16_to_float(unsigned short h) { return f32_from(static_cast<uint32_t>(h) << 16); }
}  // namespace simt

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{simt::float_to_bf16_rn(f)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return simt::bf16_to_float(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{__bfloat162float(h.x), __bfloat162float(h.y)};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
