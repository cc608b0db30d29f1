// CPU twins of the cache-writing kernels (docs/ops.md, op 2 `append_kv` and op 4
// `kv_rollback`). Torch-free: raw pointers, element strides and an element size, so one
// byte-wise implementation serves fp32 / fp16 / bf16 (and any other element type) alike.
//
// append_kv: row n of k / v ([N, Hkv, D]) goes to slot `slot_mapping[n]` of the per-layer cache
//   views k_cache / v_cache ([num_pages, page_size, Hkv, D]); slot -1 skips the row.
// kv_rollback: for every sequence with n = num_accepted[b] + 1 > 0 path entries, the K/V row of
//   position committed_lens[b] + path[b, j] moves to position committed_lens[b] + j in every
//   layer, K and V, of kv_cache ([L, 2, num_pages, page_size, Hkv, D]); committed_lens[b] += n.
//
// Both functions validate everything they index before they write anything and throw
// std::invalid_argument (message names the offending entry) on bad input: nothing is written.
// Caches may be any strided views whose last dim is contiguous and whose rows do not overlap.
//
// The path rules at the bottom are shared with the CUDA kernel (csrc/kernels/kv_rollback.cuh)
// so that both agree on what a valid path is.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPECRT_CACHE_HD __host__ __device__ __forceinline__
#else
#define SPECRT_CACHE_HD inline
#endif

namespace specrt::cpu {

struct AppendKvParams {
  int64_t elem_size = 0;  // bytes per element (k, v and both caches share the dtype)
  const void* k = nullptr;
  int64_t k_stride_n = 0, k_stride_h = 0;  // elements; last dim contiguous
  const void* v = nullptr;
  int64_t v_stride_n = 0, v_stride_h = 0;
  void* k_cache = nullptr;
  int64_t k_cache_stride_page = 0, k_cache_stride_slot = 0, k_cache_stride_head = 0;
  void* v_cache = nullptr;
  int64_t v_cache_stride_page = 0, v_cache_stride_slot = 0, v_cache_stride_head = 0;
  const int64_t* slot_mapping = nullptr;
  int64_t slot_mapping_stride = 1;
  int64_t num_tokens = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_pages = 0, page_size = 0;
};

struct KvRollbackParams {
  int64_t elem_size = 0;
  void* kv_cache = nullptr;  // [L, 2, num_pages, page_size, Hkv, D], last dim contiguous
  int64_t stride_layer = 0, stride_kv = 0, stride_page = 0, stride_slot = 0, stride_head = 0;
  int64_t num_layers = 0, num_pages = 0, page_size = 0, num_kv_heads = 0, head_dim = 0;
  const int32_t* block_table = nullptr;  // [batch, max_pages]
  int64_t block_table_stride_b = 0, block_table_stride_p = 1, max_pages = 0;
  int32_t* committed_lens = nullptr;  // [batch], read and updated
  int64_t committed_lens_stride = 1;
  const int32_t* path = nullptr;  // [batch, max_t]
  int64_t path_stride_b = 0, path_stride_t = 1, max_t = 0;
  const int32_t* num_accepted = nullptr;  // [batch]
  int64_t num_accepted_stride = 1;
  int64_t batch = 0;
};

// Throw std::invalid_argument on bad input (before any write).
void append_kv(const AppendKvParams& p);
void kv_rollback(const KvRollbackParams& p);

// ---- path rules shared with the CUDA kernel ----

// Number of path entries of a sequence (num_accepted + 1), or -1 when num_accepted is outside
// [-1, max_t - 1]. 0 means "invalid logits, nothing moves".
SPECRT_CACHE_HD int32_t rollback_path_len(int32_t num_accepted, int64_t max_t) {
  return (num_accepted >= -1 && num_accepted < max_t) ? num_accepted + 1 : -1;
}

// Path entry j (value pj, previous entry prev; prev is ignored for j == 0) is valid iff the
// path starts at the root and climbs strictly: path[0] == 0, path[j] > path[j-1], path[j] < max_t.
// Strict increase from 0 gives path[j] >= j, which is what makes in-place moves safe.
SPECRT_CACHE_HD bool rollback_entry_ok(int64_t j, int32_t pj, int32_t prev, int64_t max_t) {
  return j == 0 ? pj == 0 : (pj > prev && pj < max_t);
}

// NOTE: once path[j] > j for some j, path[j'] >= path[j] + (j' - j) > j' for every j' > j, so the
// entries that actually move form a suffix [first_moved, n) of the path and the in-place ones a
// prefix (a chain, or a path that follows the first children, moves nothing).

}  // namespace specrt::cpu
