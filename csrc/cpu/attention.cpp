// CPU tree attention: see attention.h for the algorithm and layout.
#include "cpu/attention.h"
#include "cpu/bf16.h"
#include "cpu/vmath.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

// GCC 12's AVX-512 headers trip its own uninitialized-value warnings (as in linear.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

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

// ---- AVX-512 versions of the two inner loops: the same operations in the same order (so the
// same bits), with the running sums held in registers. Compiled from plain loops, each step
// re-loaded and re-stored its sums through memory, a store-to-load chain per key or per
// dimension that made these two loops ~half of the attention's time at decode shapes. ----
bool cpu_has_avx512f() {
  static const bool v = __builtin_cpu_supports("avx512f");
  return v;
}

static_assert(kChunk == 64, "chunk_scores_avx512 holds a chunk's scores in 4 vectors");

__attribute__((target("avx512f"))) void chunk_scores_avx512(const float* q, const float* kt,
                                                            int64_t d, int64_t n, float* sc) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t e = 0; e < d; ++e) {
    const __m512 qe = _mm512_set1_ps(q[e]);
    const float* col = kt + e * kChunk;
    a0 = _mm512_add_ps(a0, _mm512_mul_ps(qe, _mm512_loadu_ps(col)));
    a1 = _mm512_add_ps(a1, _mm512_mul_ps(qe, _mm512_loadu_ps(col + 16)));
    a2 = _mm512_add_ps(a2, _mm512_mul_ps(qe, _mm512_loadu_ps(col + 32)));
    a3 = _mm512_add_ps(a3, _mm512_mul_ps(qe, _mm512_loadu_ps(col + 48)));
  }
  const __m512 a[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4 && 16 * i < n; ++i) {
    const int64_t left = n - 16 * i;
    const __mmask16 m = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    _mm512_mask_storeu_ps(sc + 16 * i, m, a[i]);
  }
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc[0 : 16 V] += sum_j w[j] * rows[j][0 : 16 V], keys in order, zero weights skipped; the
// value rows are read where they are in the cache (bf16 widened on the fly).
template <int V, typename Raw>
__attribute__((target("avx512f"))) void accumulate_rows_avx512(float* acc, const float* w,
                                                               const Raw* const* rows,
                                                               int64_t n) {
  __m512 a[V];
  for (int i = 0; i < V; ++i) a[i] = _mm512_loadu_ps(acc + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    if (w[j] == 0.f) continue;
    const __m512 wj = _mm512_set1_ps(w[j]);
    for (int i = 0; i < V; ++i) a[i] = _mm512_add_ps(a[i], _mm512_mul_ps(wj, load16(rows[j] + 16 * i)));
  }
  for (int i = 0; i < V; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

template <typename Raw>
using AccumulateFn = void (*)(float*, const float*, const Raw* const*, int64_t);

// accumulate_rows_avx512 for d = 16 V, V = 1 .. 8 (null otherwise: the buffered path runs).
template <typename Raw>
AccumulateFn<Raw> accumulate_rows_for(int64_t d) {
  switch (d) {
    case 16: return accumulate_rows_avx512<1, Raw>;
    case 32: return accumulate_rows_avx512<2, Raw>;
    case 48: return accumulate_rows_avx512<3, Raw>;
    case 64: return accumulate_rows_avx512<4, Raw>;
    case 80: return accumulate_rows_avx512<5, Raw>;
    case 96: return accumulate_rows_avx512<6, Raw>;
    case 112: return accumulate_rows_avx512<7, Raw>;
    case 128: return accumulate_rows_avx512<8, Raw>;
    default: return nullptr;
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

// ---- keys transposed 16 at a time in registers (AVX-512) ----
// A scalar transpose of a 64-key chunk is one strided store per element and cost several times
// the score arithmetic it feeds (decode: a few query rows per kv head). This is data movement
// only: the values, hence the scores, are exactly those of the scalar path.

// Transposes r[i][c] (16 rows, 16 columns) in place into r[c][i]: 32-bit then 64-bit interleaves
// within 128-bit lanes, then two rounds of 128-bit lane shuffles.
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + m]: lane k holds column 4k + m of rows 4g .. 4g + 3.
  __m512 u[16];
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), e = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 x = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44);   // lanes 0, 1 of each
    const __m512 y = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
    const __m512 x2 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xee);  // lanes 2, 3 of each
    const __m512 y2 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xee);
    r[m] = _mm512_shuffle_f32x4(x, y, 0x88);        // column m
    r[4 + m] = _mm512_shuffle_f32x4(x, y, 0xdd);    // column 4 + m
    r[8 + m] = _mm512_shuffle_f32x4(x2, y2, 0x88);  // column 8 + m
    r[12 + m] = _mm512_shuffle_f32x4(x2, y2, 0xdd);
  }
}

// dst[e * kChunk + i] = key i's element e, for 16 keys at src[i] and d % 16 == 0 (bf16 widened
// by load16).
template <typename Raw>
__attribute__((target("avx512f"))) void transpose_keys16(const Raw* const* src, int64_t d,
                                                         float* dst) {
  for (int64_t e0 = 0; e0 < d; e0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = load16(src[i] + e0);
    transpose16(r);
    for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (e0 + c) * kChunk, r[c]);
  }
}

// The cache row of kv head kvh at position pos of a sequence whose pages are `pages`.
template <typename T>
inline const T* cache_row(const TreeAttentionParams& p, const T* cache, int64_t stride_page,
                          int64_t stride_slot, int64_t stride_head, const int32_t* pages,
                          int64_t kvh, int64_t pos) {
  return cache + pages[pos / p.page_size] * stride_page + (pos % p.page_size) * stride_slot +
         kvh * stride_head;
}

template <typename T>
void load_chunk(const TreeAttentionParams& p, const T* cache, int64_t stride_page,
                int64_t stride_slot, int64_t stride_head, const int32_t* pages, int64_t kvh,
                int64_t c0, int64_t n, bool transpose, float* dst) {
  const int64_t d = p.head_dim;
  auto key = [&](int64_t pos) {
    return cache_row(p, cache, stride_page, stride_slot, stride_head, pages, kvh, pos);
  };
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, BFloat16>) {
    if (transpose && d % 16 == 0 && cpu_has_avx512f()) {
      using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
      for (; j + 16 <= n; j += 16) {
        const Raw* src[16];
        for (int i = 0; i < 16; ++i) src[i] = reinterpret_cast<const Raw*>(key(c0 + j + i));
        transpose_keys16(src, d, dst + j);
      }
    }
  }
  for (; j < n; ++j) {
    const T* src = key(c0 + j);
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
  // AVX-512 inner loops (fp32 / bf16 caches, head_dim a multiple of 16 up to 128): value rows
  // read in place instead of through the s.v buffer.
  const bool avx512 = cpu_has_avx512f();
  using Raw = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
  AccumulateFn<Raw> acc_rows = nullptr;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, BFloat16>) {
    if (avx512) acc_rows = accumulate_rows_for<Raw>(d);
  }
  const Raw* vrows[kChunk];
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
        if (avx512) chunk_scores_avx512(s.q.data() + r * d, s.kt.data(), d, n, sc);
        else chunk_scores(s.q.data() + r * d, s.kt.data(), d, n, sc);
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
      if (acc_rows != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
          vrows[j] = reinterpret_cast<const Raw*>(cache_row(p, vc, p.v_stride_page,
                                                            p.v_stride_slot, p.v_stride_head,
                                                            pages, kvh, c0 + j));
        }
      } else {
        load_chunk(p, vc, p.v_stride_page, p.v_stride_slot, p.v_stride_head, pages, kvh, c0, n,
                   false, s.v.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        if (s.m[r] == kNegInf) continue;  // nothing visible
        float* w = s.s.data() + r * kv_len + c0;
        chunk_exp(w, n, s.m[r]);
        float l = s.l[r];
        for (int64_t j = 0; j < n; ++j) l += w[j];
        s.l[r] = l;
        if (acc_rows != nullptr) acc_rows(s.acc.data() + r * d, w, vrows, n);
        else chunk_accumulate(s.acc.data() + r * d, w, s.v.data(), n, d);
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

#pragma GCC diagnostic pop
