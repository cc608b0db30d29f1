// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3",
// SC'11): a counter-based generator, i.e. a pure function (counter, key) -> 4 words, so every
// node of every request gets its own uniform with no state and no ordering between threads.
// Shared verbatim by the CPU twin (plain g++) and the CUDA kernels, which is what makes a CPU
// and a GPU run with the same (seed, offset) draw the same uniforms.
//
// specrt's stream (docs/ops.md): key = (seed_lo, seed_hi), counter = (offset_lo, offset_hi,
// idx, 0); the uniform is (x0 >> 8) * 2^-24, exactly representable in fp32 and in [0, 1).
#pragma once
#include <cstdint>

#ifndef SPECRT_HD
#ifdef __CUDACC__
#define SPECRT_HD __host__ __device__
#else
#define SPECRT_HD
#endif
#endif

namespace specrt {

struct Philox4x32Out {
  uint32_t x[4];
};

SPECRT_HD inline void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

SPECRT_HD inline Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                             uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32Out{{c0, c1, c2, c3}};
}

// 24 random bits scaled by 2^-24: exact in fp32, never 1.0.
SPECRT_HD inline float uniform_from_bits(uint32_t x0) {
  return static_cast<float>(x0 >> 8) * (1.0f / 16777216.0f);
}

SPECRT_HD inline float philox_uniform(int64_t seed, int64_t offset, uint32_t idx) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const Philox4x32Out r =
      philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), idx, 0u,
                    static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return uniform_from_bits(r.x[0]);
}

}  // namespace specrt
