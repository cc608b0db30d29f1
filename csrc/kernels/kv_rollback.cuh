// kv_rollback (docs/ops.md, op 4): compact each sequence's accepted path in the paged cache, for
// every layer, K and V, in ONE launch, and grow committed_lens in the same launch.
//
// Algorithm. Sequence b has n = num_accepted[b] + 1 path entries. Entry j moves position
// c + path[j] to c + j (c = committed_lens[b]). A valid path climbs strictly from 0, so
// path[j] >= j, and once path[j] > j every later entry moves too: the moved entries are the
// suffix [m, n) (m = first j with path[j] != j); entries already in place cost nothing, and a
// sequence with m == n (a chain, all-first-children) moves no byte.
//   Work of a sequence = moved entries x units, a unit being one (layer, K/V, kv head) plane
// row: head_dim elements. Units touch disjoint memory, so only entries of the same unit can
// overlap (a destination c + j may be the source c + path[i] of an entry i < j). Each block
// owns a set of whole units and processes its items (entry, unit, vector) in rounds of
// kStage * kThreads vectors, ordered entry-major: every thread loads its round's vectors into
// registers, __syncthreads, then stores them. NOTE why no second barrier is needed between a
// round's stores and the next round's loads: a later round only reads sources of entries
// k >= j for every entry j stored earlier, and path[k] >= path[j] > j (j moves), so it never
// reads a position already overwritten. Within a round, the barrier orders all reads before all
// writes. Correctness therefore never depends on block launch order or on other blocks.
//
// committed_lens: every block of a sequence that moves data needs the OLD length c. The
// sequence's blocks form one thread-block cluster (sm_90; at most kRollbackMaxCluster blocks,
// each owning a contiguous share of the units): all of them read c, cluster-barrier, then
// the designated block (cluster rank 0) writes c + n. The hardware co-schedules a cluster and
// the barrier orders every read before the write, so no block can ever see the new length. A
// sequence that moves nothing has a single reader (rank 0 reads and writes; the other blocks
// exit before reading). With a cluster of 1 (large batches, or pre-sm_90) the sequence's one
// block is the only reader. No scratch memory, no second launch, no host sync: graph safe.
//
// Memory layout: kv_cache [L, 2, num_pages, page_size, Hkv, D], any strides with a contiguous
// last dim; moved as opaque VEC-byte vectors (16 when pointer, strides and row allow it).
// block_table [B, max_pages], path [B, max_t], lens / num_accepted [B], int32, strided.
//
// Grid mapping: gridDim.x = B * cluster; block (b, rank) = (blockIdx.x / cluster, % cluster)
// owns units [rank * U / cluster, (rank + 1) * U / cluster) of U = L * 2 * Hkv (layer x K/V x
// head chunks, folded into one range). cluster = min(8, U, ceil(2 * num_SMs / B)): about one
// wave of 256-thread blocks, so batch 1 spreads over 8 SMs and a large batch whose paths are
// all chains costs one short wave. Consecutive lanes take consecutive 16-byte vectors of a row,
// then the next head of the same plane: coalesced. Dynamic shared memory holds the (src, dst)
// plane offsets of the moved entries (16 bytes per entry, max_t entries).
//
// Invalid input cannot raise here: a sequence whose num_accepted, path, length or pages break
// the rules (cpu/cache.h, shared with the CPU twin) is skipped whole, length included.
#pragma once
#include <cstdint>
#include <climits>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "cpu/cache.h"
#include "kernels/ptx.cuh"
#include "specrt/cache.h"

namespace specrt::kernels {

constexpr int kRollbackThreads = 256;
constexpr int kRollbackStage = 8;  // 16-byte vectors in flight per thread (32 KB per block)
constexpr int kRollbackBlocksPerSm = 2;
constexpr int kRollbackMaxCluster = 8;  // portable cluster size
constexpr int kRollbackMaxT = 8192;

__device__ __forceinline__ int32_t rb_path(const KvRollbackParams& p, int64_t b, int64_t j) {
  return p.path[b * p.path_stride_b + j * p.path_stride_t];
}

__device__ __forceinline__ int32_t rb_page(const KvRollbackParams& p, int64_t b, int64_t i) {
  return p.block_table[b * p.block_table_stride_b + i * p.block_table_stride_p];
}

template <typename Vec>
__global__ void __launch_bounds__(kRollbackThreads, kRollbackBlocksPerSm)
    kv_rollback_kernel(const __grid_constant__ KvRollbackParams p, int cluster) {
  SPECRT_DYNAMIC_SHARED(int64_t, s_off);  // [2 * (n - m)]: (src, dst) element offsets in a plane
  SPECRT_SHARED(int, s_first_moved);
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / cluster;
  const int rank = blockIdx.x - static_cast<int>(b) * cluster;

  const int32_t n = cpu::rollback_path_len(p.num_accepted[b * p.num_accepted_stride], p.max_t);
  if (n <= 0) return;  // rejected (0) or invalid num_accepted (-1): nothing moves, no update

  // ---- validate the path; find the first moved entry ----
  if (tid == 0) s_first_moved = n;
  __syncthreads();
  bool bad = false;
  for (int j = tid; j < n; j += kRollbackThreads) {
    const int32_t pj = rb_path(p, b, j);
    if (!cpu::rollback_entry_ok(j, pj, j > 0 ? rb_path(p, b, j - 1) : 0, p.max_t))
      bad = true;
    else if (pj != j)
      atomicMin(&s_first_moved, j);
  }
  if (__syncthreads_or(bad)) return;  // same verdict in every block of the cluster
  const int m = s_first_moved;
  const bool moves = m < n;
  if (!moves && rank != 0) return;  // only rank 0 reads (and writes) the length then

  // ---- the old length, and the pages it implies ----
  const int64_t c = p.committed_lens[b * p.committed_lens_stride];
  const int64_t ps = p.page_size;
  const int64_t last = c + rb_path(p, b, n - 1);
  bad = c < 0 || c + n > INT_MAX || last >= static_cast<int64_t>(p.max_pages) * ps;
  if (!bad) {
    for (int64_t i = c / ps + tid; i <= last / ps; i += kRollbackThreads) {
      const int32_t page = rb_page(p, b, i);
      bad |= page < 0 || page >= p.num_pages;
    }
  }
  if (__syncthreads_or(bad)) return;  // uniform across the cluster: same inputs, same c

  if (!moves) {
    if (tid == 0) p.committed_lens[b * p.committed_lens_stride] = static_cast<int32_t>(c + n);
    return;
  }

  for (int j = m + tid; j < n; j += kRollbackThreads) {
    const int64_t src = c + rb_path(p, b, j), dst = c + j;
    s_off[2 * (j - m)] = rb_page(p, b, src / ps) * p.stride_page + (src % ps) * p.stride_slot;
    s_off[2 * (j - m) + 1] = rb_page(p, b, dst / ps) * p.stride_page + (dst % ps) * p.stride_slot;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Every block of the sequence has read committed_lens[b] (above) before any passes here.
  if (cluster > 1) cooperative_groups::this_cluster().sync();
#endif
  __syncthreads();  // s_off complete
  if (rank == 0 && tid == 0)
    p.committed_lens[b * p.committed_lens_stride] = static_cast<int32_t>(c + n);

  // ---- move: rounds of (load all, barrier, store all), entry-major ----
  const int64_t units = 2 * static_cast<int64_t>(p.num_layers) * p.num_kv_heads;
  const int64_t ubeg = rank * units / cluster, uend = (rank + 1) * units / cluster;
  const uint32_t ub = static_cast<uint32_t>(uend - ubeg);
  const uint32_t row_vecs = static_cast<uint32_t>(p.head_dim * p.elem_size / sizeof(Vec));
  const uint32_t total = static_cast<uint32_t>(n - m) * ub * row_vecs;  // < 2^31 (host check)
  const uint32_t heads = static_cast<uint32_t>(p.num_kv_heads);
  char* const base = static_cast<char*>(p.kv_cache);
  const int64_t es = p.elem_size;
  for (uint32_t round = 0; round < total; round += kRollbackThreads * kRollbackStage) {
    Vec stage[kRollbackStage];
    int64_t dst_byte[kRollbackStage];
#pragma unroll
    for (int k = 0; k < kRollbackStage; ++k) {
      const uint32_t w = round + k * kRollbackThreads + tid;
      if (w < total) {
        const uint32_t t = w / row_vecs, v = w - t * row_vecs;
        const uint32_t jj = t / ub, ul = t - jj * ub;
        const uint32_t u = static_cast<uint32_t>(ubeg) + ul;
        const uint32_t lk = u / heads, h = u - lk * heads;
        const int64_t plane = (lk >> 1) * p.stride_layer + (lk & 1) * p.stride_kv +
                              static_cast<int64_t>(h) * p.stride_head;
        const int64_t src_byte = (plane + s_off[2 * jj]) * es + v * sizeof(Vec);
        dst_byte[k] = (plane + s_off[2 * jj + 1]) * es + v * sizeof(Vec);
        // NOTE: ld.global.cg (L2 only), not the read-only path: this kernel writes the cache.
        stage[k] = __ldcg(reinterpret_cast<const Vec*>(base + src_byte));
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kRollbackStage; ++k) {
      const uint32_t w = round + k * kRollbackThreads + tid;
      if (w < total) *reinterpret_cast<Vec*>(base + dst_byte[k]) = stage[k];
    }
  }
}

// Widest vector (16, 8, 4, 2 or 1 bytes) that the base pointer, every byte stride and the row
// length are multiples of.
inline int rollback_vec_bytes(const KvRollbackParams& p) {
  const int64_t es = p.elem_size;
  const int64_t quantities[] = {
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.kv_cache) & 15), p.stride_layer * es,
      p.stride_kv * es, p.stride_page * es, p.stride_slot * es, p.stride_head * es,
      static_cast<int64_t>(p.head_dim) * es};
  int vec = 16;
  for (int64_t q : quantities)
    while (vec > 1 && q % vec != 0) vec >>= 1;
  return vec;
}

// Largest cluster (<= kRollbackMaxCluster) the hardware and the compiled kernel support; 1
// without clusters. Computed once per instantiation (first call, normally before any capture).
template <typename Vec>
int rollback_max_cluster() {
  static const int best = [] {
    int dev = 0, major = 0;
    cudaFuncAttributes fa{};
    // A kernel JIT-compiled from pre-sm_90 PTX has no cluster barrier: it must run unclustered.
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaFuncGetAttributes(&fa, kv_rollback_kernel<Vec>) != cudaSuccess || major < 9 ||
        fa.ptxVersion < 90) {
      (void)cudaGetLastError();
      return 1;
    }
    for (int c = kRollbackMaxCluster; c > 1; c /= 2) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(c, 1, 1);
      cfg.blockDim = dim3(kRollbackThreads, 1, 1);
      cfg.dynamicSmemBytes = 2 * sizeof(int64_t) * 1024;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = c;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int active = 0;
      if (cudaOccupancyMaxActiveClusters(&active, kv_rollback_kernel<Vec>, &cfg) == cudaSuccess &&
          active > 0)
        return c;
      (void)cudaGetLastError();
    }
    return 1;
  }();
  return best;
}

template <typename Vec>
cudaError_t launch_kv_rollback_vec(const KvRollbackParams& p, cudaStream_t stream) {
  int dev = 0, num_sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  // NOTE: blocks per sequence = cluster size, chosen so the grid is about one wave: small
  // batches get up to kRollbackMaxCluster blocks per sequence (B = 1 still spreads over 8 SMs),
  // large batches one block each, so a batch in which nothing moves stays one tiny wave.
  const int64_t units = 2 * static_cast<int64_t>(p.num_layers) * p.num_kv_heads;
  const int64_t wave = static_cast<int64_t>(num_sms) * kRollbackBlocksPerSm;
  int64_t cluster = (wave + p.batch - 1) / p.batch;
  cluster = cluster < rollback_max_cluster<Vec>() ? cluster : rollback_max_cluster<Vec>();
  cluster = cluster < units ? cluster : units;
  cluster = cluster > 1 ? cluster : 1;

  const int64_t row_vecs = static_cast<int64_t>(p.head_dim) * p.elem_size / sizeof(Vec);
  const int64_t units_per_block = (units + cluster - 1) / cluster;
  if (static_cast<int64_t>(p.max_t) * units_per_block * row_vecs >= (int64_t{1} << 31))
    return cudaErrorInvalidValue;

  const size_t smem = 2 * sizeof(int64_t) * static_cast<size_t>(p.max_t > 0 ? p.max_t : 1);
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kv_rollback_kernel<Vec>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.batch * cluster), 1, 1);
  cfg.blockDim = dim3(kRollbackThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kv_rollback_kernel<Vec>, p, static_cast<int>(cluster));
}

inline cudaError_t launch_kv_rollback(const KvRollbackParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.num_layers < 0 || p.num_kv_heads < 0 || p.head_dim < 0 ||
      p.page_size < 1 || p.num_pages < 0 || p.max_pages < 0 || p.max_t < 0 || p.elem_size < 1 ||
      p.max_t > kRollbackMaxT)
    return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const int vec = rollback_vec_bytes(p);
  switch (vec) {
    case 16: return launch_kv_rollback_vec<uint4>(p, stream);
    case 8: return launch_kv_rollback_vec<uint2>(p, stream);
    case 4: return launch_kv_rollback_vec<unsigned int>(p, stream);
    case 2: return launch_kv_rollback_vec<unsigned short>(p, stream);
    default: return launch_kv_rollback_vec<unsigned char>(p, stream);
  }
}

}  // namespace specrt::kernels
