// Tree-masked paged attention (docs/ops.md, op 1): queries of the new tokens of every sequence
// against its paged KV cache; the committed prefix is fully visible, new token k is visible to
// local query i iff bit (i, k) of the packed mask is set (causal k <= i without a mask).
//
// Algorithm: flash attention with split-KV (flash-decoding). A CTA owns one work item (a range
// of KV positions of one sequence) and one kv head; it serves all query rows that read that kv
// head: rows r = i * group + g (local node i, query head kv_head * group + g), so each K/V byte
// is read from HBM once per kv head. K/V tiles stream through shared memory with cp.async
// (16-byte chunks, double buffered); online softmax in fp32, base-2 exponentials. Two inner
// loops share the tile pipeline:
//   - tensor cores (rows >= 16): 4 warps x 16 rows; S = Q K^T and O += P V with
//     mma.sync.m16n8k16 (fp32 accumulate), fragments from ldmatrix.
//   - CUDA cores (1..8 rows, decode): lane group = D/8 lanes per key, each lane owns one 16-byte
//     chunk of the head dim; dot products reduced with shuffles; each (warp, lane group) keeps
//     its own softmax state, merged through shared memory at the end.
// More rows than one pass holds (64 / 8) loop over row blocks, re-reading the range (from L2).
// A split sequence writes normalised fp32 partials + LSE to the workspace and
// tree_attention_merge_kernel combines them; an unsplit one writes `out` directly.
//
// Memory layout: q/out [total_q, Hq, D]; k/v cache [num_pages, page_size, Hkv, D] (unit last
// stride); shared-memory tiles are [rows][D] with the 16-byte chunk index XOR-swizzled by
// (row & 7), which makes both ldmatrix and the per-lane 16-byte reads bank-conflict free.
//
// Grid: (plan item capacity | batch, num_kv_heads), 128 threads; merge: (total_q), 128 threads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/ptx.cuh"
#include "specrt/attention.h"

namespace specrt::kernels::attention {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kPlanHeader = 8;  // see specrt/attention_plan.py
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Traits {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  // Keys per K/V tile. NOTE: the tensor-core path at D = 256 holds 128 fp32 accumulators per
  // thread; 16-key tiles keep its S fragment small enough to stay free of spills.
  static constexpr int kTileNMma = D <= 128 ? 64 : 16;
  static constexpr int kTileNSimt = D <= 128 ? 64 : 32;
  static constexpr int kChunks = D / 8;              // 16-byte chunks per row
  static constexpr int kStages = 2;
  static constexpr int kMmaRows = 16 * kWarps;  // rows per pass, tensor-core path
  static constexpr int kMaxSimtRows = 8;        // rows per pass, CUDA-core path (at most)
  static constexpr int kLanesPerKey = kChunks;  // CUDA-core path: one chunk per lane
  static constexpr int kKeysInFlight = 32 / kLanesPerKey;
  static constexpr int kSimtStates = kWarps * kKeysInFlight;  // softmax states to merge
  static constexpr int kv_bytes(int tile_n) { return kStages * 2 * tile_n * D * 2; }
  static constexpr int kQBytes = kMmaRows * D * 2;
  static constexpr int kMergeBytes = kSimtStates * kMaxSimtRows * (D + 2) * 4;
  static constexpr int smem_bytes(bool mma) {
    return mma ? kv_bytes(kTileNMma) + kQBytes
               : (kv_bytes(kTileNSimt) > kMergeBytes ? kv_bytes(kTileNSimt) : kMergeBytes);
  }
};

// ---- PTX helpers (kernels/ptx.cuh; emulated twins under the SIMT emulation) ----
using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
__device__ __forceinline__ float fast_exp2(float x) { return ptx::ex2_approx(x); }

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
  __device__ static void to_float8(const uint4& v, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ static uint32_t pack2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static __half from_float(float a) { return __float2half_rn(a); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  }
};

template <>
struct TypeOps<__nv_bfloat16> {
  __device__ static void to_float8(const uint4& v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ static uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static __nv_bfloat16 from_float(float a) { return __float2bfloat16_rn(a); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
  }
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows][D] shared tile.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return (row * Traits<D>::kChunks + (chunk ^ (row & 7))) * 8;
}

// What one CTA works on, decoded from the plan (or the whole sequence without a plan).
struct WorkItem {
  int seq, kv_start, kv_end, partial_row;
  int q0, t, prefix;
};

__device__ __forceinline__ bool decode_item(const TreeAttentionCudaParams& p, WorkItem& w) {
  if (p.plan != nullptr) {
    if (static_cast<int>(blockIdx.x) >= p.plan[0]) return false;
    const int32_t* it = p.plan + kPlanHeader + 4 * blockIdx.x;
    w.seq = it[0];
    w.kv_start = it[1];
    w.kv_end = it[2];
    w.partial_row = it[3];
  } else {
    w.seq = blockIdx.x;
    w.kv_start = 0;
    w.kv_end = 1 << 30;
    w.partial_row = -1;
  }
  if (w.seq < 0 || w.seq >= p.batch) return false;
  w.q0 = p.qo_indptr[w.seq];
  w.t = p.qo_indptr[w.seq + 1] - w.q0;
  const int kv_len = p.seq_lens[w.seq];
  w.prefix = kv_len - w.t;
  w.kv_end = min(w.kv_end, kv_len);
  return w.t > 0 && w.kv_start < w.kv_end;
}

// Can local node `node` (global query row q_row) see KV position pos? (pos < kv_len)
__device__ __forceinline__ bool key_visible(const TreeAttentionCudaParams& p, int pos, int prefix,
                                            int q_row, int node) {
  if (pos < prefix) return true;
  const int k = pos - prefix;
  if (p.mask == nullptr) return k <= node;
  const int word = k >> 5;
  if (word >= p.mask_words) return false;
  const uint32_t bits = static_cast<uint32_t>(__ldg(p.mask + q_row * p.mask_stride + word));
  return (bits >> (k & 31)) & 1u;
}

// Issue the cp.async copies of one K/V tile (keys pos0 .. pos0 + N - 1) into a stage.
template <typename T, int D, int N>
__device__ __forceinline__ void load_kv_tile(const TreeAttentionCudaParams& p, const WorkItem& w,
                                             int kv_head, int page_shift, int pos0, T* sk, T* sv) {
  using Tr = Traits<D>;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* pages = p.block_table + w.seq * p.block_table_stride;
  const int page_mask = p.page_size - 1;
#pragma unroll
  for (int i = 0; i < N * Tr::kChunks / kThreads; ++i) {
    const int c = threadIdx.x + i * kThreads;
    const int j = c / Tr::kChunks;
    const int ch = c % Tr::kChunks;
    const int pos = pos0 + j;
    bool valid = pos < w.kv_end;
    int64_t page = 0;
    if (valid) {
      const int page_idx = pos >> page_shift;
      page = page_idx < p.max_pages ? __ldg(pages + page_idx) : -1;
      valid = page >= 0 && page < p.num_pages;  // the wrapper validates; never fault here
    }
    const int slot = pos & page_mask;
    const T* ksrc = valid ? kc + page * p.k_stride_page + slot * p.k_stride_slot +
                                kv_head * p.k_stride_head + ch * 8
                          : kc;
    const T* vsrc = valid ? vc + page * p.v_stride_page + slot * p.v_stride_slot +
                                kv_head * p.v_stride_head + ch * 8
                          : vc;
    cp_async16(sk + swz<D>(j, ch), ksrc, valid);
    cp_async16(sv + swz<D>(j, ch), vsrc, valid);
  }
}

// Store one finished row (normalised) to out/lse or, for a split sequence, to the workspace.
// o points at this thread's `n` contiguous values of the row starting at column col.
template <typename T>
__device__ __forceinline__ void store_row_values(const TreeAttentionCudaParams& p,
                                                 const WorkItem& w, int node, int head, int col,
                                                 const float* o, int n) {
  if (w.partial_row < 0) {
    T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(w.q0 + node) * p.out_stride_n +
             static_cast<int64_t>(head) * p.out_stride_h + col;
    if (n == 2) {
      *reinterpret_cast<uint32_t*>(dst) = TypeOps<T>::pack2(o[0], o[1]);
    } else {
      for (int e = 0; e < n; ++e) dst[e] = TypeOps<T>::from_float(o[e]);
    }
  } else {
    const int64_t row = w.partial_row + node;
    if (row >= p.workspace_rows) return;  // a plan for another batch: drop, never fault
    float* dst = p.workspace + (row * p.num_qo_heads + head) * p.head_dim + col;
    for (int e = 0; e < n; ++e) dst[e] = o[e];
  }
}

__device__ __forceinline__ void store_row_lse(const TreeAttentionCudaParams& p, const WorkItem& w,
                                              int node, int head, float m_log2, float l) {
  const float lse = l > 0.f ? (m_log2 + __log2f(l)) * kLn2 : -INFINITY;
  if (w.partial_row < 0) {
    if (p.lse != nullptr) {
      p.lse[static_cast<int64_t>(w.q0 + node) * p.lse_stride_n +
            static_cast<int64_t>(head) * p.lse_stride_h] = lse;
    }
  } else {
    const int64_t row = w.partial_row + node;
    if (row >= p.workspace_rows) return;
    p.workspace[p.workspace_rows * p.num_qo_heads * p.head_dim + row * p.num_qo_heads + head] =
        lse;
  }
}

// ---------------------------------------------------------------------------------------------
// tensor-core pass: rows row_base .. row_base + 63 of the item's (node, head-in-group) rows
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void mma_pass(const TreeAttentionCudaParams& p, const WorkItem& w,
                                         int kv_head, int group, int page_shift, int row_base,
                                         T* sk, T* sv, T* sq, float scale_log2) {
  using Tr = Traits<D>;
  constexpr int N = Tr::kTileNMma;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows = w.t * group;
  const int n_rows = min(Tr::kMmaRows, rows - row_base);

  // Q tile (rows past n_rows zero-filled), committed with the first K/V tile.
  const T* q = static_cast<const T*>(p.q);
  for (int c = threadIdx.x; c < Tr::kMmaRows * Tr::kChunks; c += kThreads) {
    const int r = c / Tr::kChunks, ch = c % Tr::kChunks;
    const bool valid = r < n_rows;
    const int rr = row_base + r;
    const T* src = valid ? q + static_cast<int64_t>(w.q0 + rr / group) * p.q_stride_n +
                               static_cast<int64_t>(kv_head * group + rr % group) * p.q_stride_h +
                               ch * 8
                         : q;
    cp_async16(sq + swz<D>(r, ch), src, valid);
  }

  const int g = lane / 4, tq = lane % 4;
  const int r0 = warp * 16 + g, r1 = r0 + 8;  // this thread's two rows within the pass
  const bool warp_active = warp * 16 < n_rows;
  const int node0 = (row_base + r0) / group, node1 = (row_base + r1) / group;
  const bool valid0 = r0 < n_rows, valid1 = r1 < n_rows;

  // ldmatrix row addresses. Every fragment row this lane addresses has row & 7 == lane & 7, and
  // the chunk is 2 * step + (one lane bit), so the swizzled chunk is (2 * step) ^ sw with a
  // per-lane sw: the offsets below are compile-time constants plus a few registers (computing
  // swz() per fragment cost D = 256 its spill-free register budget).
  const T* q_frag = sq + (warp * 16 + (lane % 16)) * D;
  const int q_sw = (lane / 16) ^ (lane & 7);
  const int k_row = (lane / 16) * 8 + (lane % 8);
  const int k_sw = ((lane / 8) % 2) ^ (lane & 7);
  const int v_row = (lane % 8) + ((lane / 8) % 2) * 8;
  int v_sw[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v_sw[i] = ((2 * i) ^ ((lane / 16) ^ (lane & 7))) * 8;

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const int num_tiles = (w.kv_end - w.kv_start + N - 1) / N;
  load_kv_tile<T, D, N>(p, w, kv_head, page_shift, w.kv_start, sk, sv);
  cp_async_commit();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < num_tiles) {
      load_kv_tile<T, D, N>(p, w, kv_head, page_shift, w.kv_start + (tile + 1) * N,
                         sk + (stage ^ 1) * N * D, sv + (stage ^ 1) * N * D);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;

    if (warp_active) {
      float s[N / 8][4];
#pragma unroll
      for (int i = 0; i < N / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll 4
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, q_frag + ((2 * ks) ^ q_sw) * 8);
        const T* k_frag = tk + k_row * D + ((2 * ks) ^ k_sw) * 8;
#pragma unroll
        for (int nb = 0; nb < N / 16; ++nb) {
          uint32_t b[4];
          ldmatrix_x4(b, k_frag + nb * 16 * D);
          TypeOps<T>::mma(s[2 * nb], a, b[0], b[1]);
          TypeOps<T>::mma(s[2 * nb + 1], a, b[2], b[3]);
        }
      }
      // Scale into the log2 domain; mask only tiles that reach the new tokens or the end.
      const bool needs_mask = pos0 + N > w.prefix || pos0 + N > w.kv_end;
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nb][e] * scale_log2;
          if (needs_mask) {
            const int pos = pos0 + nb * 8 + 2 * tq + (e & 1);
            const bool hi = e >= 2;
            const bool ok = hi ? valid1 : valid0;
            // Padding rows (past n_rows) see every real key: finite, never stored.
            if (pos >= w.kv_end ||
                (ok && !key_visible(p, pos, w.prefix, w.q0 + (hi ? node1 : node0),
                                    hi ? node1 : node0))) {
              x = -INFINITY;
            }
          }
          s[nb][e] = x;
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
        mx0 = fmaxf(mx0, fmaxf(s[nb][0], s[nb][1]));
        mx1 = fmaxf(mx1, fmaxf(s[nb][2], s[nb][3]));
      }
#pragma unroll
      for (int off = 1; off < 4; off *= 2) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      // NOTE: a row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids
      // (-inf) - (-inf) = NaN, and exp2(-inf) = 0 keeps its state empty.
      const float base0 = mn0 == -INFINITY ? 0.f : mn0;
      const float base1 = mn1 == -INFINITY ? 0.f : mn1;
      const float alpha0 = fast_exp2(m0 - base0), alpha1 = fast_exp2(m1 - base1);
      m0 = mn0;
      m1 = mn1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int nb = 0; nb < N / 8; ++nb) {
        s[nb][0] = fast_exp2(s[nb][0] - base0);
        s[nb][1] = fast_exp2(s[nb][1] - base0);
        s[nb][2] = fast_exp2(s[nb][2] - base1);
        s[nb][3] = fast_exp2(s[nb][3] - base1);
        sum0 += s[nb][0] + s[nb][1];
        sum1 += s[nb][2] + s[nb][3];
      }
      l0 = l0 * alpha0 + sum0;
      l1 = l1 * alpha1 + sum1;
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        o[db][0] *= alpha0;
        o[db][1] *= alpha0;
        o[db][2] *= alpha1;
        o[db][3] *= alpha1;
      }
      // O += P V: the S accumulators of two adjacent key blocks are the A fragment of P.
#pragma unroll
      for (int kb = 0; kb < N / 16; ++kb) {
        uint32_t a[4];
        a[0] = TypeOps<T>::pack2(s[2 * kb][0], s[2 * kb][1]);
        a[1] = TypeOps<T>::pack2(s[2 * kb][2], s[2 * kb][3]);
        a[2] = TypeOps<T>::pack2(s[2 * kb + 1][0], s[2 * kb + 1][1]);
        a[3] = TypeOps<T>::pack2(s[2 * kb + 1][2], s[2 * kb + 1][3]);
        const T* v_frag = tv + (kb * 16 + v_row) * D;
#pragma unroll
        for (int db = 0; db < D / 16; ++db) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, v_frag + ((2 * db) & ~7) * 8 + v_sw[db & 3]);
          TypeOps<T>::mma(o[2 * db], a, b[0], b[1]);
          TypeOps<T>::mma(o[2 * db + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's loads
  }

  if (!warp_active) return;
#pragma unroll
  for (int off = 1; off < 4; off *= 2) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int head0 = kv_head * group + (row_base + r0) % group;
  const int head1 = kv_head * group + (row_base + r1) % group;
#pragma unroll
  for (int db = 0; db < D / 8; ++db) {
    const int col = db * 8 + 2 * tq;
    if (valid0) {
      const float v[2] = {o[db][0] * inv0, o[db][1] * inv0};
      store_row_values<T>(p, w, node0, head0, col, v, 2);
    }
    if (valid1) {
      const float v[2] = {o[db][2] * inv1, o[db][3] * inv1};
      store_row_values<T>(p, w, node1, head1, col, v, 2);
    }
  }
  if (tq == 0) {
    if (valid0) store_row_lse(p, w, node0, head0, m0, l0);
    if (valid1) store_row_lse(p, w, node1, head1, m1, l1);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core pass: rows row_base .. row_base + R - 1 (R = 1, 2, 4 or 8: the launcher picks the
// smallest that holds the typical rows per sequence, which sets the register footprint)
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int R>
__device__ __forceinline__ void simt_pass(const TreeAttentionCudaParams& p, const WorkItem& w,
                                          int kv_head, int group, int page_shift, int row_base,
                                          T* sk, T* sv, float* scratch, float scale_log2) {
  using Tr = Traits<D>;
  constexpr int N = Tr::kTileNSimt;
  constexpr int LPK = Tr::kLanesPerKey;
  constexpr int KIF = Tr::kKeysInFlight;
  constexpr int kKeysPerWarp = N / kWarps;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ch = lane % LPK;       // this lane's 16-byte chunk of the head dim
  const int key_slot = lane / LPK;  // which of the warp's in-flight keys
  const int rows = w.t * group;
  const int n_rows = min(R, rows - row_base);

  float qf[R][8];
  int node[R];
  const T* q = static_cast<const T*>(p.q);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rr = row_base + r;
    node[r] = rr / group;
    if (r < n_rows) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(
          q + static_cast<int64_t>(w.q0 + node[r]) * p.q_stride_n +
          static_cast<int64_t>(kv_head * group + rr % group) * p.q_stride_h + ch * 8));
      TypeOps<T>::to_float8(raw, qf[r]);
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[r][e] *= scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[r][e] = 0.f;
    }
  }
  float acc[R][8], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  const int num_tiles = (w.kv_end - w.kv_start + N - 1) / N;
  load_kv_tile<T, D, N>(p, w, kv_head, page_shift, w.kv_start, sk, sv);
  cp_async_commit();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < num_tiles) {
      load_kv_tile<T, D, N>(p, w, kv_head, page_shift, w.kv_start + (tile + 1) * N,
                         sk + (stage ^ 1) * N * D, sv + (stage ^ 1) * N * D);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tk = sk + stage * N * D;
    const T* tv = sv + stage * N * D;
    const int pos0 = w.kv_start + tile * N;
    const bool needs_mask = pos0 + N > w.prefix || pos0 + N > w.kv_end;

#pragma unroll 2
    for (int kk = 0; kk < kKeysPerWarp; kk += KIF) {
      const int j = warp * kKeysPerWarp + kk + key_slot;
      const int pos = pos0 + j;
      float kf[8], vf[8];
      TypeOps<T>::to_float8(*reinterpret_cast<const uint4*>(tk + swz<D>(j, ch)), kf);
      TypeOps<T>::to_float8(*reinterpret_cast<const uint4*>(tv + swz<D>(j, ch)), vf);
      float s[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[r][e], kf[e], d);
        s[r] = d;
      }
#pragma unroll
      for (int off = LPK / 2; off > 0; off /= 2) {
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += __shfl_xor_sync(0xffffffffu, s[r], off);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        bool vis = r < n_rows && pos < w.kv_end;
        if (vis && needs_mask) vis = key_visible(p, pos, w.prefix, w.q0 + node[r], node[r]);
        if (!vis) continue;
        const float mn = fmaxf(m[r], s[r]);
        const float alpha = fast_exp2(m[r] - mn);  // m = -inf on the first visible key: 0
        const float pr = fast_exp2(s[r] - mn);
        l[r] = l[r] * alpha + pr;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(acc[r][e], alpha, pr * vf[e]);
        m[r] = mn;
      }
    }
    __syncthreads();
  }

  // Merge the kWarps * KIF softmax states of every row through shared memory (the K/V stages
  // are free now: the loop ended on a barrier and no copy is in flight).
  constexpr int S = Tr::kSimtStates;
  float* s_acc = scratch;                 // [S][R][D]
  float* s_m = scratch + S * R * D;       // [S][R]
  float* s_l = s_m + S * R;               // [S][R]
  const int state = warp * KIF + key_slot;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float* dst = s_acc + (state * R + r) * D + ch * 8;
    reinterpret_cast<float4*>(dst)[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    if (ch == 0) {
      s_m[state * R + r] = m[r];
      s_l[state * R + r] = l[r];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < n_rows * D; idx += kThreads) {
    const int r = idx / D, col = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int st = 0; st < S; ++st) mx = fmaxf(mx, s_m[st * R + r]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, o = 0.f;
#pragma unroll
    for (int st = 0; st < S; ++st) {
      const float wgt = fast_exp2(s_m[st * R + r] - base);
      lsum += s_l[st * R + r] * wgt;
      o += s_acc[(st * R + r) * D + col] * wgt;
    }
    const float v = lsum > 0.f ? o / lsum : 0.f;
    const int rr = row_base + r;
    const int nd = rr / group, head = kv_head * group + rr % group;
    store_row_values<T>(p, w, nd, head, col, &v, 1);
    if (col == 0) store_row_lse(p, w, nd, head, mx, lsum);
  }
  __syncthreads();  // scratch overlaps the K/V stages reused by the next pass
}

// kSimtRows == 0: tensor-core path; else the CUDA-core path with that many rows per pass.
template <typename T, int D, int kSimtRows>
__global__ void __launch_bounds__(kThreads)
    tree_attention_kernel(const __grid_constant__ TreeAttentionCudaParams p) {
  using Tr = Traits<D>;
  constexpr bool kMma = kSimtRows == 0;
  constexpr int N = kMma ? Tr::kTileNMma : Tr::kTileNSimt;
  WorkItem w;
  if (!decode_item(p, w)) return;
  SPECRT_DYNAMIC_SHARED(unsigned char, smem);
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = sk + Tr::kStages * N * D;
  const int kv_head = blockIdx.y;
  const int group = p.num_qo_heads / p.num_kv_heads;
  const int page_shift = __ffs(p.page_size) - 1;
  const float scale_log2 = p.sm_scale * kLog2e;
  const int rows = w.t * group;
  if constexpr (kMma) {
    T* sq = sv + Tr::kStages * N * D;
    for (int row_base = 0; row_base < rows; row_base += Tr::kMmaRows) {
      mma_pass<T, D>(p, w, kv_head, group, page_shift, row_base, sk, sv, sq, scale_log2);
      __syncthreads();  // Q tile and stages are reused by the next pass
    }
  } else {
    float* scratch = reinterpret_cast<float*>(smem);
    for (int row_base = 0; row_base < rows; row_base += kSimtRows) {
      simt_pass<T, D, kSimtRows>(p, w, kv_head, group, page_shift, row_base, sk, sv, scratch,
                                 scale_log2);
    }
  }
}

// Combines the partials of split sequences: one CTA per query row, threads over (head, 4 dims).
// Rows of unsplit sequences were written by the main kernel and are skipped.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    tree_attention_merge_kernel(const __grid_constant__ TreeAttentionCudaParams p) {
  const int n = blockIdx.x;
  int lo = 0, hi = p.batch - 1;  // last sequence whose first row is <= n
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.qo_indptr[mid] <= n) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  const int32_t* seq_items = p.plan + kPlanHeader + 4 * p.plan_item_capacity;
  const int i0 = seq_items[b], i1 = seq_items[b + 1];
  if (i1 - i0 <= 1) return;
  const int node = n - p.qo_indptr[b];
  const int hq = p.num_qo_heads;
  const float* ws_lse = p.workspace + p.workspace_rows * hq * D;
  for (int idx = threadIdx.x; idx < hq * (D / 4); idx += kThreads) {
    const int h = idx / (D / 4), col = (idx % (D / 4)) * 4;
    float mx = -INFINITY;
    for (int it = i0; it < i1; ++it) {
      const int64_t row = p.plan[kPlanHeader + 4 * it + 3] + node;
      if (row < p.workspace_rows) mx = fmaxf(mx, ws_lse[row * hq + h]);
    }
    const float base = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int it = i0; it < i1; ++it) {
      const int64_t row = p.plan[kPlanHeader + 4 * it + 3] + node;
      if (row >= p.workspace_rows) continue;
      const float wgt = __expf(ws_lse[row * hq + h] - base);
      const float4 x = *reinterpret_cast<const float4*>(p.workspace + (row * hq + h) * D + col);
      lsum += wgt;
      o.x += wgt * x.x;
      o.y += wgt * x.y;
      o.z += wgt * x.z;
      o.w += wgt * x.w;
    }
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(n) * p.out_stride_n +
             static_cast<int64_t>(h) * p.out_stride_h + col;
    uint2 packed;
    packed.x = TypeOps<T>::pack2(o.x * inv, o.y * inv);
    packed.y = TypeOps<T>::pack2(o.z * inv, o.w * inv);
    *reinterpret_cast<uint2*>(dst) = packed;
    if (col == 0 && p.lse != nullptr) {
      p.lse[static_cast<int64_t>(n) * p.lse_stride_n + static_cast<int64_t>(h) * p.lse_stride_h] =
          lsum > 0.f ? base + __logf(lsum) : -INFINITY;
    }
  }
}

#define SPECRT_ATTN_DISPATCH_HEAD_DIM(head_dim, D, ...)   \
  switch (head_dim) {                                     \
    case 64: { constexpr int D = 64; __VA_ARGS__ } break;   \
    case 128: { constexpr int D = 128; __VA_ARGS__ } break; \
    case 256: { constexpr int D = 256; __VA_ARGS__ } break; \
    default: return cudaErrorInvalidValue;                \
  }

#define SPECRT_ATTN_DISPATCH_DTYPE(dtype, T, ...)                         \
  switch (dtype) {                                                        \
    case SPECRT_ATTN_FP16: { using T = __half; __VA_ARGS__ } break;        \
    case SPECRT_ATTN_BF16: { using T = __nv_bfloat16; __VA_ARGS__ } break; \
    default: return cudaErrorInvalidValue;                                \
  }

template <typename T, int D, int kSimtRows>
cudaError_t launch_main(const TreeAttentionCudaParams& p, cudaStream_t stream) {
  constexpr int smem = Traits<D>::smem_bytes(kSimtRows == 0);
  auto kernel = tree_attention_kernel<T, D, kSimtRows>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.plan != nullptr ? p.plan_item_capacity : p.batch, p.num_kv_heads);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  return cudaLaunchKernelEx(&cfg, kernel, p);
}

inline cudaError_t run(const TreeAttentionCudaParams& p, cudaStream_t stream) {
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0) return cudaErrorInvalidValue;
  if (p.page_size <= 0 || (p.page_size & (p.page_size - 1)) != 0) return cudaErrorInvalidValue;
  if (p.plan != nullptr && (p.workspace == nullptr || p.plan_item_capacity <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (p.batch <= 0 || p.total_q <= 0) return cudaSuccess;
  const int group = p.num_qo_heads / p.num_kv_heads;
  // Rows per (sequence, kv head), rounded up over the batch: exact for uniform batches (decode,
  // fixed-size trees); a longer sequence in a mixed batch just takes more passes.
  const int64_t mean_rows = (static_cast<int64_t>(p.total_q) * group + p.batch - 1) / p.batch;
  bool mma = p.path == SPECRT_ATTN_TENSOR_CORES;
  if (p.path == SPECRT_ATTN_AUTO) mma = mean_rows > 8;
  const int simt_rows = mean_rows <= 1 ? 1 : mean_rows <= 2 ? 2 : mean_rows <= 4 ? 4 : 8;
  SPECRT_ATTN_DISPATCH_DTYPE(p.dtype, T, {
    SPECRT_ATTN_DISPATCH_HEAD_DIM(p.head_dim, D, {
      cudaError_t err = mma              ? launch_main<T, D, 0>(p, stream)
                        : simt_rows == 1 ? launch_main<T, D, 1>(p, stream)
                        : simt_rows == 2 ? launch_main<T, D, 2>(p, stream)
                        : simt_rows == 4 ? launch_main<T, D, 4>(p, stream)
                                         : launch_main<T, D, 8>(p, stream);
      if (err != cudaSuccess) return err;
      if (p.plan != nullptr) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(p.total_q);
        cfg.blockDim = dim3(kThreads);
        cfg.stream = stream;
        err = cudaLaunchKernelEx(&cfg, tree_attention_merge_kernel<T, D>, p);
        if (err != cudaSuccess) return err;
      }
    })
  })
  return cudaSuccess;
}

}  // namespace specrt::kernels::attention
