// CUDA glue for the cache ops (docs/ops.md, ops 2 and 4): check devices, dtypes and shapes,
// cast, launch through the C API (csrc/include/specrt/cache.h) on the current stream. Index
// values are not checked here (that would sync); specrt.ops checks them when it may, and the
// kernels skip what they cannot use (see the C API header).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <utility>

#include "specrt/cache.h"
#include "torch/ops.h"

namespace specrt {
namespace {

void check_on(const Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == dev, name, ": on ", t.device(), ", expected ", dev);
}

void check_index(const Tensor& t, const char* name, const at::Device& dev, int64_t dim) {
  check_on(t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kInt, name, ": expected dtype int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dims, got shape ", t.sizes());
}

void check_unit_last_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, ": the last dim must be contiguous ",
              "(strides ", t.strides(), ")");
}

void check_no_self_overlap(const Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              ": written in place, so its elements must not share memory (expanded view?)");
}

int32_t to_i32(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x <= INT32_MAX, what, " = ", x, " does not fit in int32");
  return static_cast<int32_t>(x);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "specrt::", op, " (CUDA): launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

void append_kv_cuda(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                    const Tensor& slot_mapping) {
  const at::Device dev = k_cache.device();
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&k, "k"}, {&v, "v"},
                         {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_on(*t, name, dev);
    check_unit_last_stride(*t, name);
  }
  TORCH_CHECK(k_cache.dim() == 4, "k_cache: expected [num_pages, page_size, Hkv, D], got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache shape ", v_cache.sizes(),
              " != k_cache shape ", k_cache.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "k: expected [N, ", k_cache.size(2), ", ", k_cache.size(3), "], got shape ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v shape ", v.sizes(), " != k shape ", k.sizes());
  const auto dt = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dt && k.scalar_type() == dt && v.scalar_type() == dt,
              "k, v, k_cache and v_cache must share one dtype (got ", k.scalar_type(), ", ",
              v.scalar_type(), ", ", dt, ", ", v_cache.scalar_type(), ")");
  check_on(slot_mapping, "slot_mapping", dev);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1,
              "slot_mapping: expected int64 [N], got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.size(0) == k.size(0), "slot_mapping has ", slot_mapping.size(0),
              " entries but k has ", k.size(0), " rows");
  TORCH_CHECK(k_cache.size(1) >= 1, "page_size must be >= 1");
  check_no_self_overlap(k_cache, "k_cache");
  check_no_self_overlap(v_cache, "v_cache");
  if (k.size(0) == 0 || k.numel() == 0) return;

  AppendKvParams p{};
  p.k = k.data_ptr();
  p.k_stride_n = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v = v.data_ptr();
  p.v_stride_n = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.k_cache_stride_page = k_cache.stride(0);
  p.k_cache_stride_slot = k_cache.stride(1);
  p.k_cache_stride_head = k_cache.stride(2);
  p.v_cache = v_cache.data_ptr();
  p.v_cache_stride_page = v_cache.stride(0);
  p.v_cache_stride_slot = v_cache.stride(1);
  p.v_cache_stride_head = v_cache.stride(2);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.slot_mapping_stride = slot_mapping.stride(0);
  p.num_tokens = k.size(0);
  p.num_kv_heads = to_i32(k.size(1), "num_kv_heads");
  p.head_dim = to_i32(k.size(2), "head_dim");
  p.num_pages = k_cache.size(0);
  p.page_size = to_i32(k_cache.size(1), "page_size");
  p.elem_size = static_cast<int32_t>(k_cache.element_size());

  const c10::cuda::CUDAGuard guard(dev);
  check_launch(specrt::append_kv(p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
               "append_kv");
}

void kv_rollback_cuda(Tensor& kv_cache, const Tensor& block_table, Tensor& committed_lens,
                      const Tensor& path, const Tensor& num_accepted) {
  const at::Device dev = kv_cache.device();
  check_on(kv_cache, "kv_cache", dev);
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2,
              "kv_cache: expected [L, 2, num_pages, page_size, Hkv, D], got shape ",
              kv_cache.sizes());
  check_unit_last_stride(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.size(3) >= 1, "page_size must be >= 1");
  check_index(block_table, "block_table", dev, 2);
  check_index(committed_lens, "committed_lens", dev, 1);
  check_index(path, "path", dev, 2);
  check_index(num_accepted, "num_accepted", dev, 1);
  const int64_t b = committed_lens.size(0);
  TORCH_CHECK(block_table.size(0) == b && path.size(0) == b && num_accepted.size(0) == b,
              "block_table (", block_table.size(0), " rows), committed_lens (", b,
              "), path (", path.size(0), " rows) and num_accepted (", num_accepted.size(0),
              ") must agree on the batch size");
  TORCH_CHECK(path.size(1) <= 8192, "kv_rollback (CUDA): max_T = ", path.size(1),
              " is above the kernel's limit of 8192");
  check_no_self_overlap(kv_cache, "kv_cache");
  check_no_self_overlap(committed_lens, "committed_lens");
  if (b == 0) return;

  KvRollbackParams p{};
  p.kv_cache = kv_cache.data_ptr();
  p.stride_layer = kv_cache.stride(0);
  p.stride_kv = kv_cache.stride(1);
  p.stride_page = kv_cache.stride(2);
  p.stride_slot = kv_cache.stride(3);
  p.stride_head = kv_cache.stride(4);
  p.num_layers = to_i32(kv_cache.size(0), "num_layers");
  p.num_pages = kv_cache.size(2);
  p.page_size = to_i32(kv_cache.size(3), "page_size");
  p.num_kv_heads = to_i32(kv_cache.size(4), "num_kv_heads");
  p.head_dim = to_i32(kv_cache.size(5), "head_dim");
  p.elem_size = static_cast<int32_t>(kv_cache.element_size());
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride_b = block_table.stride(0);
  p.block_table_stride_p = block_table.stride(1);
  p.max_pages = to_i32(block_table.size(1), "max_pages");
  p.committed_lens = committed_lens.data_ptr<int32_t>();
  p.committed_lens_stride = committed_lens.stride(0);
  p.path = path.data_ptr<int32_t>();
  p.path_stride_b = path.stride(0);
  p.path_stride_t = path.stride(1);
  p.max_t = to_i32(path.size(1), "max_T");
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.num_accepted_stride = num_accepted.stride(0);
  p.batch = to_i32(b, "batch");

  const c10::cuda::CUDAGuard guard(dev);
  check_launch(specrt::kv_rollback(p, c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
               "kv_rollback");
}

}  // namespace specrt
