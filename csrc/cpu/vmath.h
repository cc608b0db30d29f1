// Vectorizable scalar math shared by the CPU kernels. Written as plain float code so that a
// loop calling it under `#pragma omp simd` compiles to vector instructions; every lane computes
// the same operations, so a result never depends on where in a loop an element falls (the
// files using it build with -ffp-contract=off). Torch-free.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace specrt::cpu {

// exp(x) for x <= 0 (x < -87, including -inf, gives 0): Cody-Waite reduction by ln 2 and a
// degree-6 polynomial, relative error ~2 ulp.
inline float exp_nonpos(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  n = std::max(n, -127.0f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  const float poly =
      1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-01f + r * (4.16666679e-02f +
                                                                 r * (8.33333377e-03f +
                                                                      r * 1.38888892e-03f)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : poly * scale;
}

// x * sigmoid(x) (SiLU), through exp(-|x|) <= 1 so nothing overflows; NaN propagates.
inline float silu(float x) {
  const float e = exp_nonpos(-std::fabs(x));
  const float sig = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
  return x * sig;
}

}  // namespace specrt::cpu
