// CPU twin of the tree-attention kernel (docs/ops.md, op 1). Torch-free: raw pointers + strides.
//
// Algorithm: for every (sequence b, kv head) the T_b * group query rows that share that kv head
// are processed together (GQA: each K/V row is converted to fp32 once and reused by the whole
// group), streaming the keys in chunks with an online (flash) softmax in fp32. Key j of sequence
// b is visible to local query i iff j < seq_lens[b] - T_b (committed prefix) or, for a new token
// k = j - prefix, mask bit (i, k) is set (causal k <= i when mask == nullptr).
//
// Layout: q/out [total_q, Hq, D], k/v cache [num_pages, page_size, Hkv, D] (unit last stride,
// other strides free), block_table [B, max_pages], mask [total_q, mask_words], lse [total_q, Hq].
#pragma once
#include <cstdint>
#include <string>

namespace specrt::cpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TreeAttentionParams {
  DType dtype = DType::kFloat32;  // of q, k/v cache and out alike
  const void* q = nullptr;
  int64_t q_stride_n = 0, q_stride_h = 0;
  const void* k_cache = nullptr;
  int64_t k_stride_page = 0, k_stride_slot = 0, k_stride_head = 0;
  const void* v_cache = nullptr;
  int64_t v_stride_page = 0, v_stride_slot = 0, v_stride_head = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  const int32_t* seq_lens = nullptr;   // [batch]
  const int32_t* qo_indptr = nullptr;  // [batch + 1]
  const int32_t* mask = nullptr;       // nullptr: causal among the new tokens
  int64_t mask_stride = 0;
  void* out = nullptr;
  int64_t out_stride_n = 0, out_stride_h = 0;
  float* lse = nullptr;  // optional
  int64_t lse_stride_n = 0, lse_stride_h = 0;

  int64_t batch = 0, total_q = 0;
  int64_t num_qo_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t num_pages = 0, page_size = 0, max_pages = 0;
  int64_t mask_words = 0;
  float sm_scale = 1.0f;
};

// Checks every index the kernel will follow (indptr, lengths, page ids, mask width, head
// counts). Returns an empty string when the input is valid, else a message saying what is wrong.
std::string validate_tree_attention(const TreeAttentionParams& p);

// Validates, then computes (on its own threads when the work is large). Returns "" on success;
// on error returns the message and has written nothing to out / lse.
std::string tree_attention(const TreeAttentionParams& p);

// For callers with their own thread pool: the work splits into tree_attention_items(p)
// independent items (one per sequence and kv head); tree_attention_run computes items
// [begin, end) without validating (validate once first). Any split gives the same output.
int64_t tree_attention_items(const TreeAttentionParams& p);
void tree_attention_run(const TreeAttentionParams& p, int64_t begin, int64_t end);

}  // namespace specrt::cpu
