// CPU skinny GEMM (see linear.h for the contract and the numerics).
//
// Work unit: a tile of C weight rows (C = 1 or 4) times a group of up to 6 rows of x, one fp32
// accumulator per pair in registers. The weight loop is outermost, so each weight row is read
// from memory once and then served from L1 to every group of rows; x (a few KB per row) stays
// in L1/L2.
#include "cpu/linear.h"

#include "cpu/bf16.h"

// GCC 12's AVX-512 headers trip its own uninitialized-value warnings (_mm256_undefined_pd in
// _mm512_reduce_add_ps); nothing in this file is uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <string>

namespace specrt::cpu {
namespace {

bool cpu_has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
  return v;
}

bool cpu_has_avx512_bf16() {
  static const bool v = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return v;
}

// A tile computes the dot products of C weight rows with R rows of x, one fp32 accumulator per
// pair, k ascending in vector steps with a masked tail, then a fixed reduction of the lanes.
// The order is the same for every (C, R) and both layouts, which is what makes a row's result
// independent of the rest of the batch. Plain layout: C = 1 for one or two rows of x (the
// weight is then read as one sequential stream), C = 4 otherwise (4 weight rows share each load
// of x). Packed layout: always C = 4, one sequential stream.

// GCC keeps the accumulator arrays in registers only when every loop over them is unrolled
// (otherwise it stores them to the stack after each FMA: 3x slower, seen in the assembly).
#define SPECRT_UNROLL _Pragma("GCC unroll 16")
// Plain C = 4 tiles prefetch their weight rows kAheadTiles tiles ahead (prefetches never fault,
// so running past the last row is harmless): the hardware prefetchers follow 4 interleaved row
// streams less well than one (measured +10-20%). Packed tiles prefetch kAheadPacked tiles ahead
// when x has more than one group of rows: the later groups read the tile from L1, and the
// hardware prefetchers, which run ahead of demand misses only, leave the memory idle meanwhile
// (measured, fp32: 8 rows -15-20% time, 12 rows -25-30%; with one group the prefetches cost up
// to 20% instead, so they are off there).
constexpr int64_t kAheadTiles = 2;
constexpr int64_t kAheadPacked = 1;

// Element j of weight row c of the tile: plain rows wr[c], or the packed tile at wr[0]
// (vector steps of S elements, the 4 rows' steps side by side).
#define SPECRT_W(c) (P ? wr[0] + 4 * j + (c) * S : wr[c] + j)

// One vector step of every (row, column) pair.
#define SPECRT_TILE_STEP(VEC, wload, xload, madd)                                        \
  do {                                                                                   \
    VEC w[C];                                                                            \
    SPECRT_UNROLL for (int c = 0; c < C; ++c) w[c] = wload(SPECRT_W(c));                 \
    if (P ? ahead != 0 : C > 1)                                                          \
      SPECRT_UNROLL for (int c = 0; c < C; ++c)                                          \
          _mm_prefetch(reinterpret_cast<const char*>(SPECRT_W(c) + ahead), _MM_HINT_T0); \
    SPECRT_UNROLL for (int r = 0; r < R; ++r) {                                          \
      const VEC xv = xload(xr[r] + j);                                                   \
      SPECRT_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = madd(acc[r][c], xv, w[c]);   \
    }                                                                                    \
  } while (0)

// The packed layout is zero padded, so its tail step loads the weight in full.
#define SPECRT_TILE_BODY(VEC, load_full, load_tail, madd)                                \
  __m512 acc[R][C];                                                                      \
  SPECRT_UNROLL for (int r = 0; r < R; ++r)                                              \
    SPECRT_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();           \
  int64_t j = 0;                                                                         \
  for (; j + S <= k; j += S) SPECRT_TILE_STEP(VEC, load_full, load_full, madd);          \
  if (j < k) {                                                                           \
    if (P) SPECRT_TILE_STEP(VEC, load_full, load_tail, madd);                            \
    else SPECRT_TILE_STEP(VEC, load_tail, load_tail, madd);                              \
  }                                                                                      \
  SPECRT_UNROLL for (int r = 0; r < R; ++r)                                              \
    SPECRT_UNROLL for (int c = 0; c < C; ++c) out[r][c] = _mm512_reduce_add_ps(acc[r][c]);

// Loads and multiply-adds per dtype (macros: the target attributes of a function do not reach
// lambdas inside it). `tail` is the mask of the last, partial step.
#define SPECRT_F32_FULL(q) _mm512_loadu_ps(q)
#define SPECRT_F32_TAIL(q) _mm512_maskz_loadu_ps(tail, q)
#define SPECRT_FMA(a, x, w) _mm512_fmadd_ps(x, w, a)
#define SPECRT_WIDEN(h) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
#define SPECRT_BF16W_FULL(q) SPECRT_WIDEN(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)))
#define SPECRT_BF16W_TAIL(q) SPECRT_WIDEN(_mm256_maskz_loadu_epi16(tail, q))
#define SPECRT_BF16_FULL(q) ((__m512bh)_mm512_loadu_si512(q))
#define SPECRT_BF16_TAIL(q) ((__m512bh)_mm512_maskz_loadu_epi16(tail, q))
#define SPECRT_DPBF16(a, x, w) _mm512_dpbf16_ps(a, x, w)

// Elements per vector step (and per packed step): fp32 16; bf16 32 with BF16 dot products,
// 16 when widened to fp32.
constexpr int64_t kStepF32 = 16, kStepBf16Dp = 32, kStepBf16Widen = 16;

template <int C, int R, bool P>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_f32(
    const float* const* xr, const float* const* wr, int64_t k, int64_t ahead,
    float (*out)[4]) {
  constexpr int64_t S = kStepF32;
  const __mmask16 tail = __mmask16((1u << (k % S)) - 1u);
  SPECRT_TILE_BODY(__m512, SPECRT_F32_FULL, SPECRT_F32_TAIL, SPECRT_FMA)
}

template <int C, int R, bool P>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_bf16_widen(
    const uint16_t* const* xr, const uint16_t* const* wr, int64_t k, int64_t ahead,
    float (*out)[4]) {
  constexpr int64_t S = kStepBf16Widen;
  const __mmask16 tail = __mmask16((1u << (k % S)) - 1u);
  SPECRT_TILE_BODY(__m512, SPECRT_BF16W_FULL, SPECRT_BF16W_TAIL, SPECRT_FMA)
}

template <int C, int R, bool P>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void tile_bf16_dp(
    const uint16_t* const* xr, const uint16_t* const* wr, int64_t k, int64_t ahead,
    float (*out)[4]) {
  constexpr int64_t S = kStepBf16Dp;
  const __mmask32 tail = __mmask32((1ull << (k % S)) - 1ull);
  SPECRT_TILE_BODY(__m512bh, SPECRT_BF16_FULL, SPECRT_BF16_TAIL, SPECRT_DPBF16)
}

#undef SPECRT_TILE_BODY
#undef SPECRT_TILE_STEP
#undef SPECRT_W
#undef SPECRT_UNROLL
#undef SPECRT_F32_FULL
#undef SPECRT_F32_TAIL
#undef SPECRT_FMA
#undef SPECRT_WIDEN
#undef SPECRT_BF16W_FULL
#undef SPECRT_BF16W_TAIL
#undef SPECRT_BF16_FULL
#undef SPECRT_BF16_TAIL
#undef SPECRT_DPBF16

template <typename T>
using TileFn = void (*)(const T* const*, const T* const*, int64_t, int64_t, float (*)[4]);

// Rows of x per register tile: 4 x 6 accumulators + 4 weight vectors + 1 x vector = 29 of the
// 32 vector registers.
constexpr int kRows = 6;

// Tiles by [kind][R - 1], kind 0: plain C = 1, 1: plain C = 4, 2: packed.
template <typename T>
struct TileSet {
  TileFn<T> t[3][kRows];
  int64_t step;  // S of the packed layout
};

int64_t packed_step(DType dtype) {
  if (dtype == DType::kFloat32) return kStepF32;
  return cpu_has_avx512_bf16() ? kStepBf16Dp : kStepBf16Widen;
}

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

template <typename T>
void run_columns(const LinearParams& p, int64_t n0, int64_t n1, const TileSet<T>& tiles) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.y);
  const int C = (p.packed || p.m > 2) ? 4 : 1;
  const int kind = p.packed ? 2 : C == 4 ? 1 : 0;
  const int64_t tile_elems = 4 * round_up(p.k, tiles.step);  // packed
  // Row groups of near-equal size (8 rows: 4 + 4, not 6 + 2: a short group does few FMAs per
  // weight load and per lane reduction; measured 20-40% more FMAs/s at 7-8 rows).
  const int64_t groups = (p.m + kRows - 1) / kRows;
  // Weight prefetch distance in elements (0: none), see kAheadTiles / kAheadPacked.
  const int64_t ahead = p.packed ? (groups > 1 ? kAheadPacked * tile_elems : 0)
                                 : kAheadTiles * C * p.w_stride;
  auto group_rows = [&](int64_t g) { return int(p.m / groups + (g < p.m % groups ? 1 : 0)); };
  float out[kRows][4];
  for (int64_t c0 = n0; c0 < n1; c0 += C) {
    const int nc = int(std::min<int64_t>(C, n1 - c0));
    const T* wr[4];
    if (p.packed) {
      wr[0] = w + (c0 / 4) * tile_elems;
    } else {
      // Missing columns of a last partial tile re-read a valid row; their results are dropped.
      for (int c = 0; c < C; ++c) wr[c] = w + (c0 + std::min(c, nc - 1)) * p.w_stride;
    }
    for (int64_t g = 0, r0 = 0; g < groups; r0 += group_rows(g), ++g) {
      const int nr = group_rows(g);
      const T* xr[kRows];
      for (int r = 0; r < nr; ++r) xr[r] = x + (r0 + r) * p.x_stride;
      tiles.t[kind][nr - 1](xr, wr, p.k, ahead, out);
      for (int r = 0; r < nr; ++r) {
        T* yr = y + (r0 + r) * p.y_stride + c0;
        const T* rr = res != nullptr ? res + (r0 + r) * p.r_stride + c0 : nullptr;
        for (int c = 0; c < nc; ++c) {
          float v = out[r][c];
          if constexpr (sizeof(T) == 4) {
            if (bias != nullptr) v += bias[c0 + c];
            if (rr != nullptr) v = rr[c] + v;
            yr[c] = v;
          } else {
            if (bias != nullptr) v += bf16_to_float(bias[c0 + c]);
            if (rr != nullptr) v = bf16_to_float(rr[c]) + bf16_round(v);
            yr[c] = float_to_bf16(v);
          }
        }
      }
    }
  }
}

template <typename T>
void pack(const T* w, int64_t w_stride, int64_t n, int64_t k, int64_t S, T* out) {
  const int64_t steps = round_up(k, S) / S;
  for (int64_t t = 0; t < (n + 3) / 4; ++t)
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t c = 0; c < 4; ++c)
        for (int64_t e = 0; e < S; ++e, ++out) {
          const int64_t row = 4 * t + c, col = s * S + e;
          *out = (row < n && col < k) ? w[row * w_stride + col] : T(0);
        }
}

#define SPECRT_TILES(tile)                                                             \
  {{tile<1, 1, false>, tile<1, 2, false>, tile<1, 3, false>, tile<1, 4, false>,        \
    tile<1, 5, false>, tile<1, 6, false>},                                             \
   {tile<4, 1, false>, tile<4, 2, false>, tile<4, 3, false>, tile<4, 4, false>,        \
    tile<4, 5, false>, tile<4, 6, false>},                                             \
   {tile<4, 1, true>, tile<4, 2, true>, tile<4, 3, true>, tile<4, 4, true>,            \
    tile<4, 5, true>, tile<4, 6, true>}}

const TileSet<float> kTilesF32 = {SPECRT_TILES(tile_f32), kStepF32};
const TileSet<uint16_t> kTilesBf16Dp = {SPECRT_TILES(tile_bf16_dp), kStepBf16Dp};
const TileSet<uint16_t> kTilesBf16Widen = {SPECRT_TILES(tile_bf16_widen), kStepBf16Widen};

#undef SPECRT_TILES

}  // namespace

const char* linear_isa(DType dtype) {
  if (dtype == DType::kFloat32) return cpu_has_avx512() ? "avx512" : "";
  if (dtype == DType::kBFloat16) {
    if (cpu_has_avx512_bf16()) return "avx512_bf16";
    return cpu_has_avx512() ? "avx512" : "";
  }
  return "";
}

int64_t linear_packed_size(DType dtype, int64_t n, int64_t k) {
  if (*linear_isa(dtype) == '\0' || n < 0 || k < 0) return 0;
  return round_up(n, 4) * round_up(k, packed_step(dtype));
}

void linear_pack(DType dtype, const void* w, int64_t w_stride, int64_t n, int64_t k,
                 void* packed) {
  if (dtype == DType::kFloat32) {
    pack(static_cast<const float*>(w), w_stride, n, k, packed_step(dtype),
         static_cast<float*>(packed));
  } else {
    pack(static_cast<const uint16_t*>(w), w_stride, n, k, packed_step(dtype),
         static_cast<uint16_t*>(packed));
  }
}

std::string validate_linear(const LinearParams& p) {
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kBFloat16)
    return "dtype must be float32 or bfloat16";
  if (p.m < 0 || p.n < 0 || p.k < 0) return "negative size";
  if (p.m > 0 && p.n > 0) {
    if (p.y == nullptr || (p.k > 0 && (p.x == nullptr || p.w == nullptr)))
      return "null data pointer";
    if (p.x_stride < p.k || (!p.packed && p.w_stride < p.k) || p.y_stride < p.n ||
        (p.residual != nullptr && p.r_stride < p.n))
      return "row strides must be at least the row lengths";
  }
  if (*linear_isa(p.dtype) == '\0') return "this CPU lacks AVX-512 (use another GEMM)";
  return "";
}

void linear_columns(const LinearParams& p, int64_t n0, int64_t n1) {
  if (p.m == 0 || n1 <= n0) return;
  if (p.dtype == DType::kFloat32) {
    run_columns<float>(p, n0, n1, kTilesF32);
  } else if (cpu_has_avx512_bf16()) {
    run_columns<uint16_t>(p, n0, n1, kTilesBf16Dp);
  } else {
    run_columns<uint16_t>(p, n0, n1, kTilesBf16Widen);
  }
}

}  // namespace specrt::cpu

#pragma GCC diagnostic pop
