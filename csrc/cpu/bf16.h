// Scalar bfloat16 <-> binary32 conversions shared by the CPU kernels (round to nearest even;
// NaN stays a quiet NaN). Torch-free.
#pragma once
#include <cstdint>
#include <cstring>

namespace specrt::cpu {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// f rounded to bfloat16 precision, kept as binary32 (what a bf16 tensor op's result holds).
inline float bf16_round(float f) { return bf16_to_float(float_to_bf16(f)); }

}  // namespace specrt::cpu
