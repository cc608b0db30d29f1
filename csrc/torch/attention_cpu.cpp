// CPU glue for the attention ops: check, cast, call the torch-free kernel in csrc/cpu.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/attention.h"
#include "torch/ops.h"

namespace specrt {
namespace {

cpu::DType to_cpu_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kHalf: return cpu::DType::kFloat16;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    default: TORCH_CHECK(false, "tree_attention: q must be float32, float16 or bfloat16, got ", t);
  }
}

void check_index(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "tree_attention: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kInt, "tree_attention: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "tree_attention: ", name, " must have ", dim, " dims, got ",
              t.dim());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "tree_attention: ", name,
              " must have a unit last stride");
}

}  // namespace

void tree_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& block_table, const Tensor& seq_lens,
                        const Tensor& qo_indptr, const OptTensor& mask, Tensor& out,
                        const OptTensor& lse, double sm_scale, const OptTensor& plan,
                        const OptTensor& workspace) {
  (void)plan;  // split-KV plan and scratch are CUDA-only
  (void)workspace;
  TORCH_CHECK(q.dim() == 3, "tree_attention: q must be [total_q, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "tree_attention: k_cache / v_cache must be [num_pages, page_size, Hkv, D]");
  const Tensor* dense[] = {&q, &k_cache, &v_cache, &out};
  for (const Tensor* t : dense) {
    TORCH_CHECK(t->device().is_cpu(), "tree_attention (CPU): all tensors must be on the CPU");
  }
  const cpu::DType dtype = to_cpu_dtype(q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "tree_attention: q, k_cache, v_cache and out must share a dtype, got ",
              q.scalar_type(), ", ", k_cache.scalar_type(), ", ", v_cache.scalar_type(), ", ",
              out.scalar_type());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(),
              "tree_attention: k_cache and v_cache shapes differ: ", k_cache.sizes(), " vs ",
              v_cache.sizes());
  const int64_t total_q = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t num_pages = k_cache.size(0), page_size = k_cache.size(1);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "tree_attention: head_dim of q (", d,
              ") and of the cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "tree_attention: num_qo_heads (", hq,
              ") must be a multiple of num_kv_heads (", hkv, ")");
  TORCH_CHECK(page_size > 0 && d > 0, "tree_attention: page_size and head_dim must be positive");
  TORCH_CHECK(out.sizes() == q.sizes(), "tree_attention: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "tree_attention: q, out, k_cache and v_cache need a unit last stride");

  check_index(block_table, "block_table", 2);
  check_index(seq_lens, "seq_lens", 1);
  check_index(qo_indptr, "qo_indptr", 1);
  const int64_t batch = seq_lens.size(0);
  TORCH_CHECK(block_table.size(0) == batch, "tree_attention: block_table has ",
              block_table.size(0), " rows for ", batch, " sequences");
  TORCH_CHECK(qo_indptr.size(0) == batch + 1, "tree_attention: qo_indptr must have ", batch + 1,
              " entries, got ", qo_indptr.size(0));

  cpu::TreeAttentionParams p;
  if (mask.has_value()) {
    check_index(*mask, "mask", 2);
    TORCH_CHECK(mask->size(0) == total_q, "tree_attention: mask must have ", total_q,
                " rows, got ", mask->size(0));
    // An empty tensor's data pointer may be null, which the kernel reads as "causal".
    TORCH_CHECK(total_q == 0 || mask->size(1) > 0,
                "tree_attention: mask needs at least one int32 word per row");
    p.mask = mask->data_ptr<int32_t>();
    p.mask_stride = mask->stride(0);
    p.mask_words = mask->size(1);
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->device().is_cpu() && lse->scalar_type() == at::kFloat,
                "tree_attention: lse must be a float32 CPU tensor");
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == total_q && lse->size(1) == hq,
                "tree_attention: lse must be [", total_q, ", ", hq, "], got ", lse->sizes());
    p.lse = lse->data_ptr<float>();
    p.lse_stride_n = lse->stride(0);
    p.lse_stride_h = lse->stride(1);
  }

  p.dtype = dtype;
  p.q = q.data_ptr();
  p.q_stride_n = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_slot = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_cache = v_cache.data_ptr();
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_slot = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.out_stride_n = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.batch = batch;
  p.total_q = total_q;
  p.num_qo_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.num_pages = num_pages;
  p.page_size = page_size;
  p.max_pages = block_table.size(1);
  p.sm_scale = static_cast<float>(sm_scale);

  const std::string err = cpu::validate_tree_attention(p);
  TORCH_CHECK(err.empty(), "tree_attention: ", err);
  // One item per (sequence, kv head) on torch's intra-op threads (the kernel's own threads
  // would be started per call, ~30 layers x each step).
  at::parallel_for(0, cpu::tree_attention_items(p), 1,
                   [&](int64_t b, int64_t e) { cpu::tree_attention_run(p, b, e); });
}

}  // namespace specrt
