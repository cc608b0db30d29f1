// specrt C API: the cache-writing CUDA kernels (docs/ops.md, op 2 `append_kv` and op 4
// `kv_rollback`), for engines that embed the kernels without torch.
//
// Conventions: raw device pointers; strides in elements (not bytes); the last dim of every
// K/V tensor is contiguous; one element size for all K/V tensors of a call (the kernels only
// move bytes, so fp16 / bf16 / fp32 / fp8 all work). Calls are asynchronous on `stream`, never
// allocate and never sync with the host, so they can be captured in CUDA graphs. They return
// the launch status; index values are not checked on the host (that would need a sync):
//   - append_kv skips rows whose slot is -1 or outside [0, num_pages * page_size);
//   - kv_rollback skips (moves nothing, leaves the length) any sequence whose num_accepted,
//     path, committed length or block-table pages are invalid by the rules of docs/ops.md.
// Distinct positions of the moved ranges must live in distinct pages (no page shared between
// sequences or repeated within a row); the CPU twin rejects such tables, the kernel cannot.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace specrt {

struct AppendKvParams {
  const void* k;  // [num_tokens, num_kv_heads, head_dim]
  int64_t k_stride_n, k_stride_h;
  const void* v;  // [num_tokens, num_kv_heads, head_dim]
  int64_t v_stride_n, v_stride_h;
  void* k_cache;  // [num_pages, page_size, num_kv_heads, head_dim]
  int64_t k_cache_stride_page, k_cache_stride_slot, k_cache_stride_head;
  void* v_cache;  // [num_pages, page_size, num_kv_heads, head_dim]
  int64_t v_cache_stride_page, v_cache_stride_slot, v_cache_stride_head;
  const int64_t* slot_mapping;  // [num_tokens]: page * page_size + offset, or -1
  int64_t slot_mapping_stride;
  int64_t num_tokens;
  int32_t num_kv_heads, head_dim;
  int64_t num_pages;
  int32_t page_size;
  int32_t elem_size;  // bytes per element
};

// Row n of k / v goes to slot slot_mapping[n] of k_cache / v_cache.
cudaError_t append_kv(AppendKvParams params, cudaStream_t stream);

struct KvRollbackParams {
  void* kv_cache;  // [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]
  int64_t stride_layer, stride_kv, stride_page, stride_slot, stride_head;
  int32_t num_layers, num_kv_heads, head_dim, page_size;
  int64_t num_pages;
  int32_t elem_size;  // bytes per element
  const int32_t* block_table;  // [batch, max_pages]
  int64_t block_table_stride_b, block_table_stride_p;
  int32_t max_pages;
  int32_t* committed_lens;  // [batch], read and updated in place (+= num_accepted + 1)
  int64_t committed_lens_stride;
  const int32_t* path;  // [batch, max_t], accepted local node indices, root first
  int64_t path_stride_b, path_stride_t;
  int32_t max_t;
  const int32_t* num_accepted;  // [batch], -1: nothing moves
  int64_t num_accepted_stride;
  int32_t batch;
};

// One launch for the whole batch, all layers, K and V: moves the K/V of position
// committed_lens[b] + path[b, j] to committed_lens[b] + j (j < num_accepted[b] + 1; entries
// already in place are not copied), then committed_lens[b] += num_accepted[b] + 1.
// Returns cudaErrorInvalidValue for sizes the kernel does not handle (max_t > 8192, or one
// sequence's work past 2^31 vectors).
cudaError_t kv_rollback(KvRollbackParams params, cudaStream_t stream);

}  // namespace specrt
