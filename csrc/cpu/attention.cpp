// CPU tree attention: see attention.h for the algorithm and layout.
#include "cpu/attention.h"
#include "cpu/bf16.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace specrt::cpu {
namespace {

// ---- scalar conversions (IEEE binary16 <-> binary32, round to nearest even; bf16: bf16.h) ----

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: value = mant * 2^-24, exact in fp32.
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {
    // Below the smallest normal half (2^-14): the result is a multiple of 2^-24. The scaling
    // is exact and nearbyint rounds half to even in the default rounding mode; 1024 encodes
    // the smallest normal, so the carry needs no special case.
    const float scaled = bits_to_float(ax) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t m = ax - (112u << 23);  // rebias 127 -> 15
  uint32_t r = m >> 13;
  const uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // carry may reach inf: correct
  return sign | static_cast<uint16_t>(r);
}

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return half_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_to_float(v.bits); }

template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline Half from_float<Half>(float v) { return Half{float_to_half(v)}; }
template <> inline BFloat16 from_float<BFloat16>(float v) { return BFloat16{float_to_bf16(v)}; }

constexpr int64_t kChunk = 64;  // keys converted to fp32 at a time (K+V chunk fits in L1/L2)

// The vector math of one query row against one chunk of keys, compiled for AVX-512, AVX2 and
// the baseline (picked at load time by the CPU's features). Every row is computed the same way
// whatever the other rows are, so a row's output does not depend on the batch. This file is
// built with -ffp-contract=off (CMakeLists.txt): with contraction, a key's score would be an FMA
// in a vectorized loop body and a multiply + add in the remainder, i.e. depend on how many keys
// share its chunk.

// exp(x) for x <= 0 (x < -87, including -inf, gives 0): Cody-Waite reduction by ln 2 and a
// degree-6 polynomial, relative error ~2 ulp; written so the compiler vectorizes it.
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

// sc[j] = q . k_j for j < n, keys transposed: kt[e * kChunk + j].
__attribute__((target_clones("avx512f", "avx2", "default"))) void chunk_scores(
    const float* q, const float* kt, int64_t d, int64_t n, float* sc) {
  for (int64_t j = 0; j < n; ++j) sc[j] = 0.f;
  for (int64_t e = 0; e < d; ++e) {
    const float qe = q[e];
    const float* col = kt + e * kChunk;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sc[j] += qe * col[j];
  }
}

// sc[j] <- exp(sc[j] - m) (masked scores are -inf and give 0).
__attribute__((target_clones("avx512f", "avx2", "default"))) void chunk_exp(float* sc, int64_t n,
                                                                           float m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) sc[j] = exp_nonpos(sc[j] - m);
}

// acc += sum_j w[j] * v_j (v row-major [n, d]), keys in order, zero weights skipped.
__attribute__((target_clones("avx512f", "avx2", "default"))) void chunk_accumulate(
    float* acc, const float* w, const float* v, int64_t n, int64_t d) {
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[j];
    if (wj == 0.f) continue;
    const float* vr = v + j * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[e] += wj * vr[e];
  }
}

// Scratch reused across work items of one thread.
struct Scratch {
  std::vector<float> q, acc, m, l, kt, v, s;
};

constexpr int64_t kRowBlock = 16;  // query rows whose scores are kept at once (pass 1 -> 2)

inline bool key_visible(const TreeAttentionParams& p, int64_t pos, int64_t prefix, int64_t row,
                        int64_t local_i) {
  if (pos < prefix) return true;
  const int64_t k = pos - prefix;
  if (p.mask == nullptr) return k <= local_i;
  const uint32_t word = static_cast<uint32_t>(p.mask[row * p.mask_stride + (k >> 5)]);
  return (word >> (k & 31)) & 1u;
}

template <typename T>
void load_chunk(const TreeAttentionParams& p, const T* cache, int64_t stride_page,
                int64_t stride_slot, int64_t stride_head, const int32_t* pages, int64_t kvh,
                int64_t c0, int64_t n, bool transpose, float* dst) {
  const int64_t d = p.head_dim;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = c0 + j;
    const T* src = cache + pages[pos / p.page_size] * stride_page +
                   (pos % p.page_size) * stride_slot + kvh * stride_head;
    if (transpose) {
      for (int64_t e = 0; e < d; ++e) dst[e * kChunk + j] = to_float(src[e]);
    } else {
      for (int64_t e = 0; e < d; ++e) dst[j * d + e] = to_float(src[e]);
    }
  }
}

// All query rows of sequence b that read kv head kvh: rows r = i * group + g, query head
// kvh * group + g, local node i. Two passes per block of rows: scores and their exact maximum,
// then weights, their sum and the weighted values. Each is defined on the row's visible keys in
// key order (a masked key adds an exact zero), so a row's output does not depend on the keys it
// cannot see: a node verified in a draft tree, whose siblings sit in the slots between its
// ancestors, gets bit for bit the output of the same token decoded after its accepted
// ancestors (an online softmax over slot chunks would round differently).
template <typename T>
void attend_group(const TreeAttentionParams& p, int64_t b, int64_t kvh, Scratch& s) {
  const int64_t q0 = p.qo_indptr[b];
  const int64_t t = p.qo_indptr[b + 1] - q0;
  if (t == 0) return;
  const int64_t kv_len = p.seq_lens[b];
  const int64_t prefix = kv_len - t;
  const int64_t group = p.num_qo_heads / p.num_kv_heads;
  const int64_t rows = t * group;
  const int64_t d = p.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* pages = p.block_table + b * p.block_table_stride;
  T* out = static_cast<T*>(p.out);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  s.kt.resize(kChunk * d);
  s.v.resize(kChunk * d);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    s.q.assign(nr * d, 0.f);
    s.acc.assign(nr * d, 0.f);
    s.m.assign(nr, kNegInf);
    s.l.assign(nr, 0.f);
    s.s.resize(nr * kv_len);
    // The softmax scale is folded into q (one multiply per element instead of one per score).
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      const T* src =
          q + (q0 + row / group) * p.q_stride_n + (kvh * group + row % group) * p.q_stride_h;
      for (int64_t e = 0; e < d; ++e) s.q[r * d + e] = to_float(src[e]) * p.sm_scale;
    }
    // Pass 1: scores (masked: -inf) and their maximum per row.
    for (int64_t c0 = 0; c0 < kv_len; c0 += kChunk) {
      const int64_t n = std::min(kChunk, kv_len - c0);
      load_chunk(p, kc, p.k_stride_page, p.k_stride_slot, p.k_stride_head, pages, kvh, c0, n,
                 true, s.kt.data());
      const bool all_visible = c0 + n <= prefix;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t local_i = (r0 + r) / group;
        float* sc = s.s.data() + r * kv_len + c0;
        chunk_scores(s.q.data() + r * d, s.kt.data(), d, n, sc);
        float mx = s.m[r];
        for (int64_t j = 0; j < n; ++j) {
          if (!all_visible && !key_visible(p, c0 + j, prefix, q0 + local_i, local_i)) {
            sc[j] = kNegInf;
          }
          mx = std::max(mx, sc[j]);
        }
        s.m[r] = mx;
      }
    }
    // Pass 2: weights exp(score - max), their sum in key order, the weighted values.
    for (int64_t c0 = 0; c0 < kv_len; c0 += kChunk) {
      const int64_t n = std::min(kChunk, kv_len - c0);
      load_chunk(p, vc, p.v_stride_page, p.v_stride_slot, p.v_stride_head, pages, kvh, c0, n,
                 false, s.v.data());
      for (int64_t r = 0; r < nr; ++r) {
        if (s.m[r] == kNegInf) continue;  // nothing visible
        float* w = s.s.data() + r * kv_len + c0;
        chunk_exp(w, n, s.m[r]);
        float l = s.l[r];
        for (int64_t j = 0; j < n; ++j) l += w[j];
        s.l[r] = l;
        chunk_accumulate(s.acc.data() + r * d, w, s.v.data(), n, d);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      const int64_t n = q0 + row / group;
      const int64_t h = kvh * group + row % group;
      T* dst = out + n * p.out_stride_n + h * p.out_stride_h;
      const bool seen = s.l[r] > 0.f;
      const float inv = seen ? 1.f / s.l[r] : 0.f;
      for (int64_t e = 0; e < d; ++e) dst[e] = from_float<T>(s.acc[r * d + e] * inv);
      if (p.lse != nullptr) {
        p.lse[n * p.lse_stride_n + h * p.lse_stride_h] =
            seen ? s.m[r] + std::log(s.l[r]) : kNegInf;
      }
    }
  }
}

template <typename T>
void run_items(const TreeAttentionParams& p, int64_t begin, int64_t end) {
  Scratch s;
  for (int64_t it = begin; it < end; ++it)
    attend_group<T>(p, it / p.num_kv_heads, it % p.num_kv_heads, s);
}

template <typename T>
void run(const TreeAttentionParams& p) {
  const int64_t items = p.batch * p.num_kv_heads;
  // Rough work estimate to avoid spawning threads for tiny problems.
  double work = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const double rows = double(p.qo_indptr[b + 1] - p.qo_indptr[b]) * p.num_qo_heads;
    work += rows * double(p.seq_lens[b]) * double(p.head_dim);
  }
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t nthreads = std::min<int64_t>({hw, items, 1 + int64_t(work / 4.0e6)});
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    Scratch s;
    for (int64_t it = next++; it < items; it = next++) {
      attend_group<T>(p, it / p.num_kv_heads, it % p.num_kv_heads, s);
    }
  };
  if (nthreads <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int64_t i = 1; i < nthreads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

}  // namespace

std::string validate_tree_attention(const TreeAttentionParams& p) {
  if (p.num_qo_heads <= 0 || p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0) {
    return "num_qo_heads (" + std::to_string(p.num_qo_heads) +
           ") must be a positive multiple of num_kv_heads (" + std::to_string(p.num_kv_heads) +
           ")";
  }
  if (p.head_dim <= 0) return "head_dim must be positive";
  if (p.page_size <= 0) return "page_size must be positive";
  if (p.batch < 0 || p.total_q < 0) return "negative batch or query count";
  if (p.qo_indptr[0] != 0) return "qo_indptr[0] must be 0";
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t t = int64_t(p.qo_indptr[b + 1]) - p.qo_indptr[b];
    if (t < 0) return "qo_indptr must be non-decreasing (at sequence " + std::to_string(b) + ")";
    const int64_t len = p.seq_lens[b];
    if (len < t) {
      return "seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) +
             " is shorter than its " + std::to_string(t) + " new tokens";
    }
    if (len > p.max_pages * p.page_size) {
      return "seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) +
             " exceeds the block table capacity (" + std::to_string(p.max_pages) + " pages of " +
             std::to_string(p.page_size) + ")";
    }
    if (p.mask != nullptr && t > p.mask_words * 32) {
      return "mask has " + std::to_string(p.mask_words) + " words per row, too few for " +
             std::to_string(t) + " new tokens of sequence " + std::to_string(b);
    }
    const int64_t used = (len + p.page_size - 1) / p.page_size;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t page = p.block_table[b * p.block_table_stride + j];
      if (page < 0 || page >= p.num_pages) {
        return "block_table[" + std::to_string(b) + ", " + std::to_string(j) + "] = " +
               std::to_string(page) + " is not a page id in [0, " + std::to_string(p.num_pages) +
               ")";
      }
    }
  }
  if (p.qo_indptr[p.batch] != p.total_q) {
    return "qo_indptr[-1] = " + std::to_string(p.qo_indptr[p.batch]) +
           " does not match the number of query rows " + std::to_string(p.total_q);
  }
  return {};
}

int64_t tree_attention_items(const TreeAttentionParams& p) {
  return p.batch * p.num_kv_heads;
}

void tree_attention_run(const TreeAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: run_items<float>(p, begin, end); break;
    case DType::kFloat16: run_items<Half>(p, begin, end); break;
    case DType::kBFloat16: run_items<BFloat16>(p, begin, end); break;
  }
}

std::string tree_attention(const TreeAttentionParams& p) {
  std::string err = validate_tree_attention(p);
  if (!err.empty()) return err;
  switch (p.dtype) {
    case DType::kFloat32: run<float>(p); break;
    case DType::kFloat16: run<Half>(p); break;
    case DType::kBFloat16: run<BFloat16>(p); break;
    default: return "unsupported dtype";
  }
  return {};
}

}  // namespace specrt::cpu
