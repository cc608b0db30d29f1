// Fused verification (rejection sampling) and sampling from logits, one launch for the batch.
//
// Algorithm (docs/ops.md, section 3; the scalar rules live in sampling_rules.cuh, shared with
// the CPU twin csrc/cpu/sampling.cpp):
//   1. Row statistics of every node of the sequence in one sweep: max, argmax (lowest index),
//      online sum of exp((z - max) / t) in fp64, and an invalid flag (NaN / +inf / all -inf).
//      Any invalid row -> the sequence emits -1 everywhere.
//   2. The walk from the root. A draft's acceptance needs one logit, the row max and the
//      normaliser, so without top-k / top-p a step costs O(1) memory traffic.
//      top-k / top-p of a visited row become one logit threshold `tau` (kept iff z >= tau),
//      found by a 16-ary search over the order-preserving uint32 keys of the logits: each pass
//      counts (top-k) or sums the probability mass (top-p) above 16 pivots, 8 passes in all.
//   3. One inverse-CDF draw (correction / bonus): per-block chunk totals, prefix over the
//      blocks in rank order, then the owning block scans its chunk tile by tile. The residual
//      max(0, p - q) (chains) or "p minus the rejected siblings" (trees) is formed on the fly
//      only for this row; no probability tensor is ever materialised.
// Every sum is fp64 with a fixed reduction order, so results are deterministic run to run and
// bit-identical to the CPU twin when the weights are dyadic.
//
// Grid mapping: one thread-block *cluster* per sequence (row for `sample`), C in {1,2,4,8}
// blocks chosen by the launcher from the batch size; block r of a cluster owns the vocab
// chunk [r * chunk, (r + 1) * chunk). Per-block partials are combined through distributed
// shared memory (cluster.map_shared_rank) in rank order, so no global workspace is needed and
// the launch is CUDA-graph safe. Control flow is uniform across a cluster: every block
// computes the same combined values and takes the same decisions; block 0 writes the outputs.
//
// Memory layout: logits [rows, V] with any row stride (unit vocab stride); 16-byte vector loads
// when the row base and stride allow it. Dynamic shared memory: per-node statistics (partial
// and combined) and the node's parent / token, O(max_T).
#pragma once
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/ptx.cuh"
#include "kernels/sampling_rules.cuh"

namespace specrt::kernels::sampling {

namespace cg = cooperative_groups;
namespace R = specrt::rules;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kPivots = 16;
constexpr int kMaxCluster = 8;
constexpr uint32_t kFull = 0xFFFFFFFFu;

// Everything the kernel reads or writes; filled by the C API from either public params struct.
struct KernelArgs {
  const void* logits;
  int64_t logits_row_stride;
  int64_t vocab;
  int64_t chunk;  // vocab elements per block of a cluster (multiple of 8)
  const int32_t* draft_tokens;
  const int32_t* parents;
  const int32_t* node_indptr;
  const float* draft_probs;
  int64_t draft_probs_row_stride;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
  const float* uniforms;
  int32_t* out_tokens;
  int64_t out_tokens_row_stride;
  int32_t* out_path;
  int64_t out_path_row_stride;
  int64_t max_t;
  int32_t* out_num_accepted;
  float* out_probs;  // sample mode only
  int64_t out_probs_row_stride;
};

// ---- logits access --------------------------------------------------------------------------

template <R::LogitsDtype D>
struct DtypeTraits {
  using Storage = uint16_t;
  static constexpr int kBytes = 2;
  __device__ static float to_float(uint16_t x) {
    return D == R::LogitsDtype::kBFloat16 ? R::bf16_to_float(x) : R::fp16_to_float(x);
  }
};
template <>
struct DtypeTraits<R::LogitsDtype::kFloat32> {
  using Storage = float;
  static constexpr int kBytes = 4;
  __device__ static float to_float(float x) { return x; }
};

// One block's view of one logits row restricted to its vocab chunk [c0, c1). Thread t visits
// elements [base + t * kVec, base + (t + 1) * kVec) of every tile of kThreads * kVec elements,
// so "tile by tile, thread by thread, element by element" is token order.
template <R::LogitsDtype D, bool kAligned>
struct ChunkReader {
  using Tr = DtypeTraits<D>;
  using S = typename Tr::Storage;
  static constexpr int kVec = kAligned ? 16 / Tr::kBytes : 1;
  static constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kVec;
  const S* row;
  int64_t c0, c1;

  __device__ float at(int64_t j) const { return Tr::to_float(row[j]); }

  // Loads this thread's slice of the tile starting at `tile`; returns how many are valid.
  __device__ int load(int64_t tile, float (&z)[kVec]) const {
    const int64_t base = tile + static_cast<int64_t>(threadIdx.x) * kVec;
    if (base >= c1) return 0;
    if constexpr (kAligned) {
      if (base + kVec <= c1) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + base));
        const S* v = reinterpret_cast<const S*>(&raw);
#pragma unroll
        for (int e = 0; e < kVec; ++e) z[e] = Tr::to_float(v[e]);
        return kVec;
      }
    }
    const int n = static_cast<int>(c1 - base < kVec ? c1 - base : kVec);
    for (int e = 0; e < n; ++e) z[e] = Tr::to_float(row[base + e]);
    return n;
  }

  template <class F>
  __device__ void for_each(F&& f) const {
    for (int64_t tile = c0; tile < c1; tile += kTile) {
      float z[kVec];
      const int n = load(tile, z);
      const int64_t base = tile + static_cast<int64_t>(threadIdx.x) * kVec;
      for (int e = 0; e < n; ++e) f(base + e, z[e]);
    }
  }
};

// ---- per-row statistics ----------------------------------------------------------------------

struct RowStat {
  float m;         // max logit
  int32_t argmax;  // lowest index of the max
  double s;        // sum of exp((z - m) / t) (sampling rows only)
  int32_t bad;     // NaN or +inf seen
};

__device__ inline RowStat stat_init() { return RowStat{-INFINITY, INT32_MAX, 0.0, 0}; }

__device__ inline void stat_push(RowStat& a, float z, int64_t j, float t, bool greedy) {
  if (R::is_bad_logit(z)) {
    a.bad = 1;
    return;
  }
  if (R::argmax_better(z, j, a.m, a.argmax)) {
    if (!greedy && z > a.m) a.s = (a.m == -INFINITY ? 0.0 : a.s * R::softmax_weight(a.m, z, t));
    a.m = z;
    a.argmax = static_cast<int32_t>(j);
  }
  if (!greedy && z != -INFINITY) a.s += R::softmax_weight(z, a.m, t);
}

__device__ inline void stat_merge(RowStat& a, const RowStat& b, float t, bool greedy) {
  a.bad |= b.bad;
  const float m = a.m > b.m ? a.m : b.m;
  if (!greedy) {
    double s = 0.0;
    if (a.m != -INFINITY) s += a.s * R::softmax_weight(a.m, m, t);
    if (b.m != -INFINITY) s += b.s * R::softmax_weight(b.m, m, t);
    a.s = s;
  }
  if (R::argmax_better(b.m, b.argmax, a.m, a.argmax)) a.argmax = b.argmax;
  a.m = m;
}

__device__ inline RowStat shfl_down_stat(const RowStat& v, int off) {
  RowStat o;
  o.m = __shfl_down_sync(kFull, v.m, off);
  o.argmax = __shfl_down_sync(kFull, v.argmax, off);
  o.s = __shfl_down_sync(kFull, v.s, off);
  o.bad = __shfl_down_sync(kFull, v.bad, off);
  return o;
}

// ---- shared state of a block ----------------------------------------------------------------

struct Smem {
  double warp_buf[kWarps * kPivots];
  double slot[2][kPivots + 2];  // what other blocks of the cluster read (double-buffered)
  double bcast[kPivots + 2];
  RowStat warp_stat[kWarps];
  double scan_local[kThreads];
  double scan_warp[kWarps + 1];
  int64_t result;        // local: overshoot fallback, then the owner's token
  int64_t owner_result;  // written remotely by the owning block, in every block
  int32_t owner;
  int32_t flag;
};

struct Ctx {
  cg::cluster_group cluster;
  Smem* sm;
  int rank, nblocks, phase;
  int lane, warp;
};

// Cluster-wide fp64 reduction of K values per thread (sum or max), in a fixed order; every
// thread of every block gets the same result.
template <int K, bool kMax>
__device__ void cluster_reduce(Ctx& ctx, double (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k)
    for (int off = 16; off > 0; off >>= 1) {
      const double o = __shfl_down_sync(kFull, v[k], off);
      v[k] = kMax ? (o > v[k] ? o : v[k]) : v[k] + o;
    }
  if (ctx.lane == 0)
    for (int k = 0; k < K; ++k) ctx.sm->warp_buf[ctx.warp * K + k] = v[k];
  __syncthreads();
  double* slot = ctx.sm->slot[ctx.phase];
  if (threadIdx.x < K) {
    const int k = threadIdx.x;
    double acc = ctx.sm->warp_buf[k];
    for (int w = 1; w < kWarps; ++w) {
      const double o = ctx.sm->warp_buf[w * K + k];
      acc = kMax ? (o > acc ? o : acc) : acc + o;
    }
    slot[k] = acc;
  }
  ctx.cluster.sync();
  if (threadIdx.x < K) {
    const int k = threadIdx.x;
    double acc = ctx.cluster.map_shared_rank(slot, 0)[k];
    for (int r = 1; r < ctx.nblocks; ++r) {
      const double o = ctx.cluster.map_shared_rank(slot, r)[k];
      acc = kMax ? (o > acc ? o : acc) : acc + o;
    }
    ctx.sm->bcast[k] = acc;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = ctx.sm->bcast[k];
  ctx.phase ^= 1;
}

// ---- processed distribution of a visited row --------------------------------------------------

struct RowProc {
  float m;
  uint32_t tau_key;  // kept iff float_order_key(z) >= tau_key
  double sum;        // sum of kept weights
  double inv_sum;
};

__device__ inline float kept_weight(const RowProc& rp, float z, float t) {
  return R::float_order_key(z) >= rp.tau_key ? R::softmax_weight(z, rp.m, t) : 0.f;
}

template <class Reader>
__device__ double kept_sum(Ctx& ctx, const Reader& rd, float m, uint32_t tau_key, float t) {
  double acc[1] = {0.0};
  rd.for_each([&](int64_t, float z) {
    if (R::float_order_key(z) >= tau_key) acc[0] += R::softmax_weight(z, m, t);
  });
  cluster_reduce<1, false>(ctx, acc);
  return acc[0];
}

// Largest key v in [lo, hi] with F(v) = sum of weight(z) over keys >= v reaching `target`
// (F(lo) is assumed to, or lo is the answer). kMass: weight = normalised probability of the
// tokens at or above min_key, compared with top_p; else weight = 1, compared with k.
template <bool kMass, class Reader>
__device__ uint32_t threshold_search(Ctx& ctx, const Reader& rd, uint32_t lo, uint32_t hi,
                                     double target, float m, float t, double inv_sum,
                                     uint32_t min_key) {
  while (lo < hi) {
    const uint64_t span = static_cast<uint64_t>(hi) - lo;
    uint32_t piv[kPivots];
#pragma unroll
    for (int i = 0; i < kPivots; ++i)
      piv[i] = lo + static_cast<uint32_t>((span * (i + 1) + kPivots - 1) / kPivots);
    double f[kPivots];
#pragma unroll
    for (int i = 0; i < kPivots; ++i) f[i] = 0.0;
    rd.for_each([&](int64_t, float z) {
      const uint32_t key = R::float_order_key(z);
      if (key < min_key) return;
      double w = 1.0;
      if constexpr (kMass) w = R::normalize(R::softmax_weight(z, m, t), inv_sum);
#pragma unroll
      for (int i = 0; i < kPivots; ++i)
        if (key >= piv[i]) f[i] += w;
    });
    cluster_reduce<kPivots, false>(ctx, f);
    int best = -1;
#pragma unroll
    for (int i = 0; i < kPivots; ++i) {
      const bool reach = kMass ? R::top_p_mass_reaches(f[i], static_cast<float>(target))
                               : f[i] >= target;
      if (reach) best = i;
    }
    if (best < 0) {
      hi = piv[0] - 1;
    } else {
      lo = piv[best];
      if (best + 1 < kPivots) hi = piv[best + 1] - 1;
    }
  }
  return lo;
}

template <class Reader>
__device__ RowProc process_row(Ctx& ctx, const Reader& rd, const RowStat& st, float t,
                               int32_t top_k, float top_p, int64_t vocab) {
  RowProc rp{st.m, 0u, st.s, 0.0};
  const uint32_t max_key = R::float_order_key(st.m);
  if (R::top_k_active(top_k, vocab)) {
    rp.tau_key = threshold_search<false>(ctx, rd, 0u, max_key, static_cast<double>(top_k), st.m,
                                         t, 0.0, 0u);
    rp.sum = kept_sum(ctx, rd, st.m, rp.tau_key, t);
  }
  if (R::top_p_active(top_p)) {
    const uint32_t k_key = rp.tau_key;
    rp.tau_key = threshold_search<true>(ctx, rd, k_key, max_key, static_cast<double>(top_p),
                                        st.m, t, 1.0 / rp.sum, k_key);
    rp.sum = kept_sum(ctx, rd, st.m, rp.tau_key, t);
  }
  rp.inv_sum = 1.0 / rp.sum;
  return rp;
}

// ---- inverse-CDF draw -------------------------------------------------------------------------

enum class DrawMode { kKept, kKeptMinusTried, kResidual };

struct DrawSpec {
  DrawMode mode;
  RowProc rp;
  float t;
  const float* q;          // kResidual: draft distribution row
  const int32_t* tried;    // kKeptMinusTried: rejected sibling tokens (shared memory)
  int n_tried;
};

__device__ inline float draw_weight(const DrawSpec& d, int64_t j, float z) {
  const float w = R::float_order_key(z) >= d.rp.tau_key ? R::softmax_weight(z, d.rp.m, d.t) : 0.f;
  if (d.mode == DrawMode::kResidual) return R::residual(R::normalize(w, d.rp.inv_sum), d.q[j]);
  if (d.mode == DrawMode::kKeptMinusTried)
    for (int i = 0; i < d.n_tried; ++i)
      if (d.tried[i] == j) return 0.f;
  return w;
}

// Draws with uniform u from the weights of `d` over the whole row. Returns, in every thread of
// every block of the cluster, the token, or -1 if all weights are zero: callers branch on the
// result (fallback draws hold cluster barriers), so it must be cluster-uniform.
template <class Reader>
__device__ int64_t cdf_draw(Ctx& ctx, const Reader& rd, const DrawSpec& d, float u) {
  Smem* sm = ctx.sm;
  // Pass A: chunk total and last positive index of this block.
  double tot = 0.0;
  int64_t last = -1;
  rd.for_each([&](int64_t j, float z) {
    const float r = draw_weight(d, j, z);
    tot += r;
    if (r > 0.f && j > last) last = j;
  });
  double tl[2] = {tot, static_cast<double>(last)};
  for (int off = 16; off > 0; off >>= 1) {
    tl[0] += __shfl_down_sync(kFull, tl[0], off);
    const double o = __shfl_down_sync(kFull, tl[1], off);
    tl[1] = o > tl[1] ? o : tl[1];
  }
  if (ctx.lane == 0) {
    sm->warp_buf[2 * ctx.warp] = tl[0];
    sm->warp_buf[2 * ctx.warp + 1] = tl[1];
  }
  __syncthreads();
  double* slot = sm->slot[ctx.phase];
  if (threadIdx.x == 0) {
    double a = 0.0, b = -1.0;
    for (int w = 0; w < kWarps; ++w) {
      a += sm->warp_buf[2 * w];
      b = sm->warp_buf[2 * w + 1] > b ? sm->warp_buf[2 * w + 1] : b;
    }
    slot[0] = a;
    slot[1] = b;
  }
  ctx.cluster.sync();
  if (threadIdx.x == 0) {
    double total = 0.0, lastpos = -1.0;
    for (int r = 0; r < ctx.nblocks; ++r) {
      const double* rs = ctx.cluster.map_shared_rank(slot, r);
      total += rs[0];
      lastpos = rs[1] > lastpos ? rs[1] : lastpos;
    }
    int32_t owner = -1;
    double excl = 0.0, run = 0.0;
    const double thr = R::cdf_threshold(u, total);
    if (total > 0.0) {
      for (int r = 0; r < ctx.nblocks; ++r) {
        const double v = ctx.cluster.map_shared_rank(slot, r)[0];
        if (run + v > thr) {
          owner = r;
          excl = run;
          break;
        }
        run += v;
      }
    }
    sm->owner = owner;
    sm->bcast[0] = thr;
    sm->bcast[1] = excl;
    sm->result = total > 0.0 ? static_cast<int64_t>(lastpos) : -1;  // overshoot fallback
    sm->flag = total > 0.0;
  }
  ctx.phase ^= 1;
  __syncthreads();
  const int32_t owner = sm->owner;
  const double thr = sm->bcast[0];
  if (ctx.rank == owner) {
    // Pass B: tile by tile; the first thread whose inclusive prefix passes thr holds the token.
    double cum = sm->bcast[1];
    constexpr int kVec = Reader::kVec;
    for (int64_t tile = rd.c0; tile < rd.c1; tile += Reader::kTile) {
      float z[kVec];
      const int n = rd.load(tile, z);
      const int64_t base = tile + static_cast<int64_t>(threadIdx.x) * kVec;
      float r[kVec];
      double own = 0.0;
      for (int e = 0; e < kVec; ++e) {
        r[e] = e < n ? draw_weight(d, base + e, z[e]) : 0.f;
        own += r[e];
      }
      // Sequential scan per warp, then over warps: monotone prefixes in thread order.
      sm->scan_local[threadIdx.x] = own;
      __syncthreads();
      if (ctx.lane == 0) {
        double acc = 0.0;
        for (int l = 0; l < 32; ++l) {
          acc += sm->scan_local[threadIdx.x + l];
          sm->scan_local[threadIdx.x + l] = acc;
        }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        double acc = cum;
        for (int w = 0; w < kWarps; ++w) {
          sm->scan_warp[w] = acc;
          acc += sm->scan_local[w * 32 + 31];
        }
        sm->scan_warp[kWarps] = acc;
      }
      __syncthreads();
      const double warp_base = sm->scan_warp[ctx.warp];
      const double incl = warp_base + sm->scan_local[threadIdx.x];
      const double excl = ctx.lane == 0 ? warp_base : warp_base + sm->scan_local[threadIdx.x - 1];
      const bool cross = incl > thr;
      const int n_cross = __syncthreads_count(cross);
      if (n_cross > 0) {
        if (threadIdx.x == kThreads - n_cross) {
          R::CdfScan scan(thr, excl);
          for (int e = 0; e < n; ++e) scan.push(base + e, r[e]);
          sm->result = scan.result();  // in-thread overshoot -> its last positive element
        }
        break;
      }
      cum = sm->scan_warp[kWarps];
      __syncthreads();  // scan buffers are rewritten by the next tile
    }
    __syncthreads();
    // NOTE: every block gets the token, not only block 0 (the writer): a block that read its
    // own never-written owner_result could see a stale negative value, take the fallback draw
    // alone and wait forever at its cluster barrier (found by the SIMT emulation).
    if (threadIdx.x == 0)
      for (int r = 0; r < ctx.nblocks; ++r)
        *ctx.cluster.map_shared_rank(&sm->owner_result, r) = sm->result;
  }
  ctx.cluster.sync();
  const bool any = sm->flag != 0;
  const int64_t tok = owner >= 0 ? sm->owner_result : sm->result;
  __syncthreads();
  return any ? tok : -1;
}

// ---- the kernel -------------------------------------------------------------------------------

// u of local node i (sample mode: lo = row, i = 0).
__device__ inline float node_uniform(const KernelArgs& a, int64_t b, int64_t lo, int64_t i) {
  if (a.uniforms) return a.uniforms[lo + i];
  return philox_uniform(a.seed[b], a.offset[b], static_cast<uint32_t>(i));
}

template <R::LogitsDtype D, bool kAligned, bool kSample>
__global__ void __launch_bounds__(kThreads)
    rejection_sample_kernel(const __grid_constant__ KernelArgs a) {
  using Reader = ChunkReader<D, kAligned>;
  using S = typename Reader::S;
  SPECRT_SHARED(Smem, smem);
  SPECRT_DYNAMIC_SHARED(unsigned char, dyn);

  Ctx ctx{cg::this_cluster(), &smem, 0, 1, 0, static_cast<int>(threadIdx.x & 31),
          static_cast<int>(threadIdx.x >> 5)};
  ctx.rank = static_cast<int>(ctx.cluster.block_rank());
  ctx.nblocks = static_cast<int>(ctx.cluster.num_blocks());
  const int64_t b = blockIdx.x / ctx.nblocks;

  const int64_t lo = kSample ? b : a.node_indptr[b];
  const int64_t n_nodes = kSample ? 1 : a.node_indptr[b + 1] - lo;
  const float t = a.temperature[b];
  const bool greedy = R::is_greedy(t);
  const int64_t vocab = a.vocab;
  const int64_t c0 = ctx.rank * a.chunk < vocab ? ctx.rank * a.chunk : vocab;
  const int64_t c1 = c0 + a.chunk < vocab ? c0 + a.chunk : vocab;

  // Dynamic shared memory: part[max_t], stat[max_t] (RowStat), par[max_t], tok[max_t],
  // tried[max_t] (int32).
  const int64_t cap = kSample ? 1 : a.max_t;
  RowStat* part = reinterpret_cast<RowStat*>(dyn);
  RowStat* stat = part + cap;
  int32_t* par = reinterpret_cast<int32_t*>(stat + cap);
  int32_t* tok = par + cap;
  int32_t* tried = tok + cap;

  auto reader_of = [&](int64_t node) {
    const S* row = static_cast<const S*>(a.logits) + (lo + node) * a.logits_row_stride;
    return Reader{row, c0, c1};
  };

  for (int64_t i = threadIdx.x; i < n_nodes; i += kThreads) {
    par[i] = kSample ? -1 : a.parents[lo + i];
    tok[i] = kSample ? 0 : a.draft_tokens[lo + i];
  }

  // 1. Statistics of every row (validity needs them all; the walk then reads them for free).
  for (int64_t i = 0; i < n_nodes; ++i) {
    RowStat s = stat_init();
    reader_of(i).for_each([&](int64_t j, float z) { stat_push(s, z, j, t, greedy); });
    for (int off = 16; off > 0; off >>= 1) stat_merge(s, shfl_down_stat(s, off), t, greedy);
    if (ctx.lane == 0) smem.warp_stat[ctx.warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      RowStat acc = smem.warp_stat[0];
      for (int w = 1; w < kWarps; ++w) stat_merge(acc, smem.warp_stat[w], t, greedy);
      part[i] = acc;
    }
    __syncthreads();
  }
  ctx.cluster.sync();
  for (int64_t i = threadIdx.x; i < n_nodes; i += kThreads) {
    RowStat acc = *ctx.cluster.map_shared_rank(&part[i], 0);
    for (int r = 1; r < ctx.nblocks; ++r)
      stat_merge(acc, *ctx.cluster.map_shared_rank(&part[i], r), t, greedy);
    stat[i] = acc;
  }
  ctx.cluster.sync();  // part[] of every block has been read; stat[] is complete

  bool invalid = false;
  for (int64_t i = 0; i < n_nodes; ++i)
    invalid |= stat[i].bad != 0 || R::row_max_is_invalid(stat[i].m);

  const bool leader = ctx.rank == 0 && threadIdx.x == 0;
  int32_t* out_tok = kSample ? a.out_tokens + b : a.out_tokens + b * a.out_tokens_row_stride;
  int32_t* out_path = kSample ? nullptr : a.out_path + b * a.out_path_row_stride;
  float* out_probs = (kSample && a.out_probs) ? a.out_probs + b * a.out_probs_row_stride : nullptr;

  if (invalid) {
    if (out_probs)
      for (int64_t j = c0 + threadIdx.x; j < c1; j += kThreads) out_probs[j] = 0.f;
    if (leader) {
      if constexpr (kSample) {
        out_tok[0] = -1;
      } else {
        for (int64_t i = 0; i < a.max_t; ++i) out_tok[i] = out_path[i] = -1;
        a.out_num_accepted[b] = -1;
      }
    }
    return;  // no distributed shared memory is read after the last cluster.sync
  }

  const int32_t top_k = a.top_k[b];
  const float top_p = a.top_p[b];
  int64_t c = 0, accepted = 0, final_tok = -1;
  if (leader && !kSample) out_path[0] = 0;

  if (greedy) {
    while (true) {
      const int64_t am = stat[c].argmax;
      int64_t ch = -1;
      for (int64_t i = c + 1; i < n_nodes; ++i)
        if (par[i] == c && tok[i] == am) {
          ch = i;
          break;
        }
      if (ch < 0) {
        final_tok = am;
        break;
      }
      if (leader) {
        out_tok[accepted] = static_cast<int32_t>(am);
        out_path[accepted + 1] = static_cast<int32_t>(ch);
      }
      ++accepted;
      c = ch;
    }
    if (out_probs)
      for (int64_t j = c0 + threadIdx.x; j < c1; j += kThreads)
        out_probs[j] = j == final_tok ? 1.f : 0.f;
  } else if (!kSample && a.draft_probs != nullptr) {
    // Chain with draft probabilities: node c's child is c + 1.
    while (true) {
      const Reader rd = reader_of(c);
      const RowProc rp = process_row(ctx, rd, stat[c], t, top_k, top_p, vocab);
      const float u0 = node_uniform(a, b, lo, 0);
      if (c == n_nodes - 1) {
        final_tok = cdf_draw(ctx, rd, DrawSpec{DrawMode::kKept, rp, t, nullptr, nullptr, 0}, u0);
        break;
      }
      const int32_t x = tok[c + 1];
      const float* q = a.draft_probs + (lo + c) * a.draft_probs_row_stride;
      const float px = R::normalize(kept_weight(rp, rd.at(x), t), rp.inv_sum);
      if (R::accept_with_draft(node_uniform(a, b, lo, c + 1), q[x], px)) {
        if (leader) {
          out_tok[accepted] = x;
          out_path[accepted + 1] = static_cast<int32_t>(c + 1);
        }
        ++accepted;
        ++c;
        continue;
      }
      final_tok = cdf_draw(ctx, rd, DrawSpec{DrawMode::kResidual, rp, t, q, nullptr, 0}, u0);
      if (final_tok < 0)  // p == q up to rounding: the residual is empty
        final_tok = cdf_draw(ctx, rd, DrawSpec{DrawMode::kKept, rp, t, nullptr, nullptr, 0}, u0);
      break;
    }
  } else {
    // Deterministic drafts (and `sample`, a tree with a root only).
    while (true) {
      const Reader rd = reader_of(c);
      const RowProc rp = process_row(ctx, rd, stat[c], t, top_k, top_p, vocab);
      double sum_r = rp.sum;
      int64_t found = -1;
      int n_tried = 0;
      for (int64_t i = c + 1; i < n_nodes; ++i) {
        if (par[i] != c) continue;
        const int32_t x = tok[i];
        bool dup = false;  // a repeated sibling token already has r[x] = 0
        for (int k = 0; k < n_tried; ++k) dup |= tried[k] == x;
        const float wx = dup ? 0.f : kept_weight(rp, rd.at(x), t);
        if (R::accept_deterministic(node_uniform(a, b, lo, i), sum_r, wx)) {
          found = i;
          break;
        }
        sum_r -= wx;
        __syncthreads();  // every thread has read tried[] before it grows
        if (threadIdx.x == 0) tried[n_tried] = x;
        __syncthreads();
        ++n_tried;
      }
      if (found >= 0) {
        if (leader) {
          out_tok[accepted] = tok[found];
          out_path[accepted + 1] = static_cast<int32_t>(found);
        }
        ++accepted;
        c = found;
        continue;
      }
      const float u0 = node_uniform(a, b, lo, 0);
      const DrawMode mode = n_tried > 0 ? DrawMode::kKeptMinusTried : DrawMode::kKept;
      final_tok = cdf_draw(ctx, rd, DrawSpec{mode, rp, t, nullptr, tried, n_tried}, u0);
      if (final_tok < 0)  // every supported token was tried: fall back to p_c
        final_tok = cdf_draw(ctx, rd, DrawSpec{DrawMode::kKept, rp, t, nullptr, nullptr, 0}, u0);
      if (out_probs)
        for (int64_t j = c0 + threadIdx.x; j < c1; j += kThreads)
          out_probs[j] = R::normalize(kept_weight(rp, rd.at(j), t), rp.inv_sum);
      break;
    }
  }

  if (leader) {
    out_tok[accepted] = static_cast<int32_t>(final_tok);
    if constexpr (!kSample) {
      for (int64_t i = accepted + 1; i < a.max_t; ++i) out_tok[i] = -1;
      for (int64_t i = accepted + 1; i < a.max_t; ++i) out_path[i] = -1;
      a.out_num_accepted[b] = static_cast<int32_t>(accepted);
    }
  }
}

// ---- launcher -------------------------------------------------------------------------------

inline size_t dynamic_smem_bytes(int64_t cap) {
  return static_cast<size_t>(cap) * (2 * sizeof(RowStat) + 3 * sizeof(int32_t));
}

template <R::LogitsDtype D, bool kAligned, bool kSample>
cudaError_t launch_typed(const KernelArgs& args, int64_t rows, int cluster, size_t smem,
                         cudaStream_t stream) {
  auto kernel = rejection_sample_kernel<D, kAligned, kSample>;
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows * cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args);
}

// Blocks per cluster: enough clusters x blocks to cover ~2 waves of SMs, never a chunk smaller
// than one tile of vector loads.
inline int choose_cluster(int64_t rows, int64_t vocab, int num_sms) {
  int c = 1;
  while (c < kMaxCluster && rows * c * 2 <= 2 * static_cast<int64_t>(num_sms) &&
         vocab / (c * 2) >= static_cast<int64_t>(kThreads) * 8)
    c *= 2;
  return c;
}

template <bool kSample>
cudaError_t launch(KernelArgs args, R::LogitsDtype dtype, int64_t rows, int64_t cap,
                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  int device = 0, num_sms = 132;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  const int cluster = choose_cluster(rows, args.vocab, num_sms);
  args.chunk = ((args.vocab + cluster - 1) / cluster + 7) / 8 * 8;
  const int elem = dtype == R::LogitsDtype::kFloat32 ? 4 : 2;
  const bool aligned = reinterpret_cast<uintptr_t>(args.logits) % 16 == 0 &&
                       (args.logits_row_stride * elem) % 16 == 0;
  const size_t smem = dynamic_smem_bytes(cap);
#define SPECRT_SAMPLING_LAUNCH(DT)                                                           \
  return aligned ? launch_typed<DT, true, kSample>(args, rows, cluster, smem, stream)      \
                 : launch_typed<DT, false, kSample>(args, rows, cluster, smem, stream)
  switch (dtype) {
    case R::LogitsDtype::kBFloat16: SPECRT_SAMPLING_LAUNCH(R::LogitsDtype::kBFloat16);
    case R::LogitsDtype::kFloat16: SPECRT_SAMPLING_LAUNCH(R::LogitsDtype::kFloat16);
    default: SPECRT_SAMPLING_LAUNCH(R::LogitsDtype::kFloat32);
  }
#undef SPECRT_SAMPLING_LAUNCH
}

}  // namespace specrt::kernels::sampling
