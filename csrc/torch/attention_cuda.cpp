// CUDA glue for tree_attention: check, cast, take the current stream, call the C API
// (csrc/include/specrt/attention.h). Index *values* (page ids, lengths) are validated by
// specrt.ops in Python when it can afford the host sync; here only what is free to check.
#include <cstdlib>
#include <cstring>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "specrt/attention.h"
#include "torch/ops.h"

namespace specrt {
namespace {

void check_on(const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "tree_attention: ", name, " must be on ", dev, ", got ",
              t.device());
}

void check_index(const Tensor& t, const char* name, int64_t dim, const at::Device& dev) {
  check_on(t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kInt, "tree_attention: ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "tree_attention: ", name, " must have ", dim, " dims, got ",
              t.dim());
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "tree_attention: ", name,
              " must have a unit last stride");
}

// The kernel moves q / K / V / out in 16-byte chunks.
void check_vector_io(const Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, "tree_attention: ", name, " needs a unit last stride");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "tree_attention: ", name,
              " must be 16-byte aligned");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, "tree_attention: ", name,
                " strides must be multiples of 8 elements, got ", t.strides());
  }
}

int32_t path_override() {
  // SPECRT_ATTN_PATH=cuda_cores|tensor_cores forces one inner loop (tests, benchmarks).
  const char* env = std::getenv("SPECRT_ATTN_PATH");
  if (env == nullptr) return SPECRT_ATTN_AUTO;
  if (std::strcmp(env, "cuda_cores") == 0) return SPECRT_ATTN_CUDA_CORES;
  if (std::strcmp(env, "tensor_cores") == 0) return SPECRT_ATTN_TENSOR_CORES;
  return SPECRT_ATTN_AUTO;
}

}  // namespace

void tree_attention_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& block_table, const Tensor& seq_lens,
                         const Tensor& qo_indptr, const OptTensor& mask, Tensor& out,
                         const OptTensor& lse, double sm_scale, const OptTensor& plan,
                         const OptTensor& workspace) {
  TORCH_CHECK(q.is_cuda(), "tree_attention (CUDA): q must be a CUDA tensor");
  const at::Device dev = q.device();
  TORCH_CHECK(q.dim() == 3, "tree_attention: q must be [total_q, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "tree_attention: k_cache / v_cache must be [num_pages, page_size, Hkv, D]");
  check_on(k_cache, "k_cache", dev);
  check_on(v_cache, "v_cache", dev);
  check_on(out, "out", dev);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "tree_attention (CUDA): q must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype &&
                  out.scalar_type() == dtype,
              "tree_attention: q, k_cache, v_cache and out must share a dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "tree_attention: k_cache and v_cache differ");
  const int64_t total_q = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t num_pages = k_cache.size(0), page_size = k_cache.size(1);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "tree_attention: head_dim of q (", d, ") and cache (",
              k_cache.size(3), ") differ");
  TORCH_CHECK(d == 64 || d == 128 || d == 256,
              "tree_attention (CUDA): head_dim must be 64, 128 or 256, got ", d);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "tree_attention: num_qo_heads (", hq,
              ") must be a multiple of num_kv_heads (", hkv, ")");
  TORCH_CHECK(page_size > 0 && (page_size & (page_size - 1)) == 0,
              "tree_attention (CUDA): page_size must be a power of two, got ", page_size);
  TORCH_CHECK(out.sizes() == q.sizes(), "tree_attention: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  check_vector_io(q, "q");
  check_vector_io(out, "out");
  check_vector_io(k_cache, "k_cache");
  check_vector_io(v_cache, "v_cache");

  check_index(block_table, "block_table", 2, dev);
  check_index(seq_lens, "seq_lens", 1, dev);
  check_index(qo_indptr, "qo_indptr", 1, dev);
  const int64_t batch = seq_lens.size(0);
  TORCH_CHECK(block_table.size(0) == batch, "tree_attention: block_table has ",
              block_table.size(0), " rows for ", batch, " sequences");
  TORCH_CHECK(qo_indptr.size(0) == batch + 1, "tree_attention: qo_indptr must have ", batch + 1,
              " entries, got ", qo_indptr.size(0));
  TORCH_CHECK(total_q < (int64_t{1} << 31) && num_pages < (int64_t{1} << 31),
              "tree_attention: sizes exceed int32");

  TreeAttentionCudaParams p{};
  p.dtype = dtype == at::kHalf ? SPECRT_ATTN_FP16 : SPECRT_ATTN_BF16;
  if (mask.has_value()) {
    check_index(*mask, "mask", 2, dev);
    TORCH_CHECK(mask->size(0) == total_q, "tree_attention: mask must have ", total_q,
                " rows, got ", mask->size(0));
    TORCH_CHECK(total_q == 0 || mask->size(1) > 0,
                "tree_attention: mask needs at least one int32 word per row");
    p.mask = mask->data_ptr<int32_t>();
    p.mask_stride = mask->stride(0);
    p.mask_words = static_cast<int32_t>(mask->size(1));
  }
  if (lse.has_value()) {
    check_on(*lse, "lse", dev);
    TORCH_CHECK(lse->scalar_type() == at::kFloat, "tree_attention: lse must be float32");
    TORCH_CHECK(lse->dim() == 2 && lse->size(0) == total_q && lse->size(1) == hq,
                "tree_attention: lse must be [", total_q, ", ", hq, "], got ", lse->sizes());
    p.lse = lse->data_ptr<float>();
    p.lse_stride_n = lse->stride(0);
    p.lse_stride_h = lse->stride(1);
  }
  if (plan.has_value()) {
    TORCH_CHECK(workspace.has_value(), "tree_attention: a plan needs its workspace");
    check_index(*plan, "plan", 1, dev);
    const int64_t items = plan->numel() - 8 - (batch + 1);
    TORCH_CHECK(items >= 4 && items % 4 == 0,
                "tree_attention: plan does not match this batch (", plan->numel(),
                " entries for ", batch, " sequences); build it with plan_tree_attention");
    check_on(*workspace, "workspace", dev);
    TORCH_CHECK(workspace->scalar_type() == at::kFloat && workspace->is_contiguous(),
                "tree_attention: workspace must be a contiguous float32 tensor");
    const int64_t rows = workspace->numel() / (hq * (d + 1));
    TORCH_CHECK(rows >= 1, "tree_attention: workspace too small");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace->data_ptr()) % 16 == 0,
                "tree_attention: workspace must be 16-byte aligned");
    p.plan = plan->data_ptr<int32_t>();
    p.plan_item_capacity = static_cast<int32_t>(items / 4);
    p.workspace = workspace->data_ptr<float>();
    p.workspace_rows = rows;
  }

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
  p.batch = static_cast<int32_t>(batch);
  p.total_q = static_cast<int32_t>(total_q);
  p.num_qo_heads = static_cast<int32_t>(hq);
  p.num_kv_heads = static_cast<int32_t>(hkv);
  p.head_dim = static_cast<int32_t>(d);
  p.num_pages = static_cast<int32_t>(num_pages);
  p.page_size = static_cast<int32_t>(page_size);
  p.max_pages = static_cast<int32_t>(block_table.size(1));
  p.sm_scale = static_cast<float>(sm_scale);
  p.path = path_override();

  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err =
      specrt_tree_attention(p, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "tree_attention: CUDA launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace specrt
