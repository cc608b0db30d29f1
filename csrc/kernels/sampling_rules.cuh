// The edge-case rules of sampling / verification (docs/ops.md, section 3), written once for the
// CPU twin (csrc/cpu/sampling.cpp) and the CUDA kernel (rejection_sampling.cuh). Only scalar
// decisions live here; how a row is scanned (sequentially on CPU, by cluster-wide reductions on
// GPU) is up to each kernel, but every comparison that decides a token goes through these
// functions, with the same operand types on both sides.
//
// Numerics shared by both implementations:
//   w_j = exp((z_j - max z) / t)      fp32, for tokens kept by top-k / top-p, else 0
//   sums (normaliser, masses, CDF)    fp64 accumulators
//   p_j = float(double(w_j) * (1 / S))  only where a normalised value is needed (chains,
//                                     top-p masses, out_probs)
// Acceptance of deterministic drafts and every inverse-CDF draw are scale invariant, so they
// run on the unnormalised weights. With dyadic weights (e.g. logits in {0, -inf}) every sum
// is exact in any order, hence CPU and GPU emit bit-identical tokens.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/philox.cuh"

namespace specrt::rules {

enum class LogitsDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

SPECRT_HD inline float bits_to_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

SPECRT_HD inline uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

SPECRT_HD inline float bf16_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// IEEE binary16 -> binary32, subnormals and inf/NaN included (exact: every half is a float).
SPECRT_HD inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // Subnormal half: renormalise into a normal float.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3FFu;
    return bits_to_float(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13));
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

SPECRT_HD inline float load_logit(const void* row, int64_t j, LogitsDtype dt) {
  switch (dt) {
    case LogitsDtype::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[j]);
    case LogitsDtype::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(row)[j]);
    default: return static_cast<const float*>(row)[j];
  }
}

// ---- request parameters ----
// NOTE: any temperature that is not > 0 (negative, NaN) is treated as greedy.
SPECRT_HD inline bool is_greedy(float temperature) { return !(temperature > 0.f); }
SPECRT_HD inline bool top_k_active(int32_t k, int64_t vocab) { return k > 0 && k < vocab; }
SPECRT_HD inline bool top_p_active(float top_p) { return top_p < 1.f; }

// ---- row validity: NaN or +inf anywhere, or no finite/−inf-only row (max == -inf) ----
SPECRT_HD inline bool is_bad_logit(float z) { return z != z || z == INFINITY; }
SPECRT_HD inline bool row_max_is_invalid(float zmax) { return zmax == -INFINITY; }

// Greedy argmax: larger value wins, lowest index on ties. Combining partial (value, index)
// results with this predicate in any order gives the same winner.
SPECRT_HD inline bool argmax_better(float z, int64_t j, float best_z, int64_t best_j) {
  return z > best_z || (z == best_z && j < best_j);
}

// ---- processed distribution ----
SPECRT_HD inline float softmax_weight(float z, float zmax, float temperature) {
  return expf((z - zmax) / temperature);
}
// top-k: keep every token at least as large as the k-th largest logit (ties all kept).
SPECRT_HD inline bool top_k_keep(float z, float kth_largest) { return z >= kth_largest; }
// top-p: keep a token iff the probability mass of tokens with a strictly larger logit (i.e.
// strictly larger probability, decided without exp rounding) is < top_p. The most likely
// tokens are always kept, so top_p <= 0 degrades to "keep the argmax level" instead of an
// empty distribution.
SPECRT_HD inline bool top_p_keep(float z, float zmax, double mass_strictly_larger, float top_p) {
  return z == zmax || mass_strictly_larger < static_cast<double>(top_p);
}
// The same rule seen from a threshold search (GPU): the kept levels are those at or above the
// largest level whose inclusive mass (this level and every larger one) reaches top_p.
SPECRT_HD inline bool top_p_mass_reaches(double inclusive_mass, float top_p) {
  return !(inclusive_mass < static_cast<double>(top_p));
}
SPECRT_HD inline float normalize(float w, double inv_sum) {
  return static_cast<float>(static_cast<double>(w) * inv_sum);
}

// ---- acceptance tests ----
// Deterministic draft (q one-hot): accept iff u * sum(r) < r[x], with r the target
// distribution minus the siblings already rejected (any common scale).
SPECRT_HD inline bool accept_deterministic(float u, double sum_r, float r_x) {
  return static_cast<double>(u) * sum_r < static_cast<double>(r_x);
}
// Sampled draft: accept with probability min(1, p/q), as u * q < p.
SPECRT_HD inline bool accept_with_draft(float u, float q_x, float p_x) {
  return static_cast<double>(u) * static_cast<double>(q_x) < static_cast<double>(p_x);
}
// Residual of speculative sampling; NaN-safe (a NaN draft probability contributes 0).
SPECRT_HD inline float residual(float p, float q) {
  const float d = p - q;
  return d > 0.f ? d : 0.f;
}

// ---- inverse-CDF draw ----
// Threshold of the draw: the chosen token is the smallest j with cumsum(r)[j] > u * sum(r).
SPECRT_HD inline double cdf_threshold(float u, double total) {
  return static_cast<double>(u) * total;
}

// Sequential form of the draw, fed r_j in token order (the GPU runs it inside one thread's
// slice after locating the slice by prefix sums). The overshoot fallback, the largest j with
// r_j > 0, is tracked on the way; -1 means r is all zero and the caller must fall back.
struct CdfScan {
  double thr;
  double cum;
  int64_t chosen;
  int64_t last_positive;

  SPECRT_HD inline CdfScan(double threshold, double start)
      : thr(threshold), cum(start), chosen(-1), last_positive(-1) {}
  SPECRT_HD inline void push(int64_t j, float r) {
    if (r > 0.f) last_positive = j;
    cum += static_cast<double>(r);
    if (chosen < 0 && cum > thr) chosen = j;
  }
  SPECRT_HD inline int64_t result() const { return chosen >= 0 ? chosen : last_positive; }
};

// Order-preserving map float -> uint32 (for radix selection of logit thresholds; no NaNs).
SPECRT_HD inline uint32_t float_order_key(float f) {
  if (f == 0.f) f = 0.f;  // -0 and +0 are the same logit: one key
  const uint32_t u = float_to_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
SPECRT_HD inline float float_from_order_key(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

}  // namespace specrt::rules
