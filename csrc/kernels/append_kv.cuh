// append_kv (docs/ops.md, op 2): scatter the K/V rows of new tokens into the paged cache.
//
// Algorithm: a pure copy. A "row" is one (token n, kv head h) pair: head_dim elements of k and
// the same of v, moved to slot slot_mapping[n] = page * page_size + offset of k_cache / v_cache.
// Slot -1 (padding) and out-of-range slots are skipped (a kernel cannot raise; the host-side
// wrapper checks the values when it may).
//
// Memory layout: k, v [N, Hkv, D]; caches [num_pages, page_size, Hkv, D]; any strides with a
// contiguous last dim. Elements are moved as opaque vectors of VEC bytes (16 when every base
// pointer, stride and the row length allow it; else 8, 4, 2, 1), so the dtype does not matter.
//
// Grid mapping: a group of G = min(32, next_pow2(D * es / VEC)) consecutive lanes owns one row
// (a whole warp for a 512-byte row, half a warp for the 256-byte rows of D = 128 fp16); a
// 256-thread block covers 256 / G rows and the grid strides over the N * Hkv rows. Lanes of a
// group read and write consecutive 16-byte vectors: fully coalesced on both sides. K and V
// loads are issued before either store so two loads per lane are in flight.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "specrt/cache.h"

namespace specrt::kernels {

constexpr int kAppendKvThreads = 256;

template <typename Vec>
__global__ void __launch_bounds__(kAppendKvThreads)
    append_kv_kernel(const __grid_constant__ AppendKvParams p, int log2_group, int row_vecs) {
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t rows = p.num_tokens * p.num_kv_heads;
  const int64_t rows_per_block = kAppendKvThreads >> log2_group;
  const int64_t num_slots = p.num_pages * p.page_size;
  const int64_t es = p.elem_size;
  for (int64_t r = blockIdx.x * rows_per_block + (threadIdx.x >> log2_group); r < rows;
       r += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t n = r / p.num_kv_heads;
    const int64_t h = r - n * p.num_kv_heads;
    const int64_t slot = p.slot_mapping[n * p.slot_mapping_stride];
    if (slot < 0 || slot >= num_slots) continue;  // padding, or out of range: skip
    const int64_t page = slot / p.page_size, off = slot - page * p.page_size;
    const Vec* ks = reinterpret_cast<const Vec*>(static_cast<const char*>(p.k) +
                                                 (n * p.k_stride_n + h * p.k_stride_h) * es);
    const Vec* vs = reinterpret_cast<const Vec*>(static_cast<const char*>(p.v) +
                                                 (n * p.v_stride_n + h * p.v_stride_h) * es);
    Vec* kd = reinterpret_cast<Vec*>(
        static_cast<char*>(p.k_cache) +
        (page * p.k_cache_stride_page + off * p.k_cache_stride_slot + h * p.k_cache_stride_head) *
            es);
    Vec* vd = reinterpret_cast<Vec*>(
        static_cast<char*>(p.v_cache) +
        (page * p.v_cache_stride_page + off * p.v_cache_stride_slot + h * p.v_cache_stride_head) *
            es);
    for (int i = lane; i < row_vecs; i += group) {
      // NOTE: k / v are read once; ld.global.cs (evict-first) keeps them from displacing the
      // cache lines that attention is about to read.
      const Vec kx = __ldcs(ks + i);
      const Vec vx = __ldcs(vs + i);
      kd[i] = kx;
      vd[i] = vx;
    }
  }
}

// Widest vector (16, 8, 4, 2 or 1 bytes) that every base pointer, byte stride and the row
// length are multiples of, so each vector access is naturally aligned.
inline int append_kv_vec_bytes(const AppendKvParams& p) {
  const int64_t es = p.elem_size;
  const int64_t quantities[] = {
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.k) & 15),
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.v) & 15),
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.k_cache) & 15),
      static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.v_cache) & 15),
      p.k_stride_n * es, p.k_stride_h * es, p.v_stride_n * es, p.v_stride_h * es,
      p.k_cache_stride_page * es, p.k_cache_stride_slot * es, p.k_cache_stride_head * es,
      p.v_cache_stride_page * es, p.v_cache_stride_slot * es, p.v_cache_stride_head * es,
      static_cast<int64_t>(p.head_dim) * es};
  int vec = 16;
  for (int64_t q : quantities)
    while (vec > 1 && q % vec != 0) vec >>= 1;
  return vec;
}

template <typename Vec>
cudaError_t launch_append_kv_vec(const AppendKvParams& p, cudaStream_t stream) {
  const int64_t row_vecs = static_cast<int64_t>(p.head_dim) * p.elem_size / sizeof(Vec);
  int log2_group = 0;
  while ((1 << log2_group) < row_vecs && log2_group < 5) ++log2_group;
  const int64_t rows = p.num_tokens * p.num_kv_heads;
  const int64_t rows_per_block = kAppendKvThreads >> log2_group;
  int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  blocks = blocks < (1 << 20) ? blocks : (1 << 20);  // grid-stride beyond this
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kAppendKvThreads);
  cfg.stream = stream;
  return cudaLaunchKernelEx(&cfg, append_kv_kernel<Vec>, p, log2_group,
                            static_cast<int>(row_vecs));
}

inline cudaError_t launch_append_kv(const AppendKvParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_kv_heads < 0 || p.head_dim < 0 || p.page_size < 1 ||
      p.num_pages < 0 || p.elem_size < 1)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0 || p.num_kv_heads == 0 || p.head_dim == 0) return cudaSuccess;
  const int vec = append_kv_vec_bytes(p);
  switch (vec) {
    case 16: return launch_append_kv_vec<uint4>(p, stream);
    case 8: return launch_append_kv_vec<uint2>(p, stream);
    case 4: return launch_append_kv_vec<unsigned int>(p, stream);
    case 2: return launch_append_kv_vec<unsigned short>(p, stream);
    default: return launch_append_kv_vec<unsigned char>(p, stream);
  }
}

}  // namespace specrt::kernels
