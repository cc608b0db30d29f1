// specrt C API: tree-masked paged attention (docs/ops.md, op 1) on CUDA.
//
// Plain declarations for engines that embed the kernel without torch: fill a
// TreeAttentionCudaParams (raw device pointers, strides in elements) and call
// specrt_tree_attention on a stream. The call allocates nothing and never syncs with the host,
// so it can be captured in a CUDA graph. It does not validate index *values* (page ids,
// lengths, indptr) — the caller does (specrt.ops does it in Python when it can); it only
// rejects unsupported shapes / dtypes with cudaErrorInvalidValue.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum SpecrtAttnDType { SPECRT_ATTN_FP16 = 1, SPECRT_ATTN_BF16 = 2 };

// Which inner loop serves a launch. AUTO: the CUDA-core path when the mean number of query
// rows per (sequence, kv head) is at most 8 (decode, short chains), else tensor cores.
enum SpecrtAttnPath {
  SPECRT_ATTN_AUTO = 0,
  SPECRT_ATTN_CUDA_CORES = 1,
  SPECRT_ATTN_TENSOR_CORES = 2
};

typedef struct TreeAttentionCudaParams {
  int32_t dtype;  // SpecrtAttnDType of q, k/v cache and out
  // q [total_q, Hq, D]; every pointer of q / k / v / out 16-byte aligned, strides % 8 == 0
  const void* q;
  int64_t q_stride_n, q_stride_h;
  // k_cache / v_cache [num_pages, page_size, Hkv, D]
  const void* k_cache;
  int64_t k_stride_page, k_stride_slot, k_stride_head;
  const void* v_cache;
  int64_t v_stride_page, v_stride_slot, v_stride_head;
  const int32_t* block_table;  // [batch, max_pages]
  int64_t block_table_stride;
  const int32_t* seq_lens;   // [batch], including the new tokens
  const int32_t* qo_indptr;  // [batch + 1]
  const int32_t* mask;       // [total_q, mask_words] packed visibility, or NULL (causal)
  int64_t mask_stride;
  int32_t mask_words;
  void* out;  // [total_q, Hq, D], dtype of q
  int64_t out_stride_n, out_stride_h;
  float* lse;  // [total_q, Hq] natural-log LSE, or NULL
  int64_t lse_stride_n, lse_stride_h;
  // Split-KV plan from specrt/attention_plan.py (NULL: one CTA per (sequence, kv head)).
  const int32_t* plan;
  int32_t plan_item_capacity;  // grid.x when plan != NULL
  float* workspace;            // partial outputs + LSE, workspace_rows rows (see the plan doc)
  int64_t workspace_rows;
  int32_t batch, total_q;
  int32_t num_qo_heads, num_kv_heads, head_dim;  // head_dim in {64, 128, 256}
  int32_t num_pages, page_size, max_pages;        // page_size a power of two
  float sm_scale;
  int32_t path;  // SpecrtAttnPath
} TreeAttentionCudaParams;

cudaError_t specrt_tree_attention(TreeAttentionCudaParams params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
