// CPU glue for the cache ops (docs/ops.md, ops 2 and 4): check, cast, call the torch-free
// kernel in csrc/cpu/cache.cpp, which validates index values before writing anything.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <stdexcept>
#include <utility>

#include "cpu/cache.h"
#include "torch/ops.h"

namespace specrt {
namespace {

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
}

void check_index(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
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

// The kernel throws std::invalid_argument; surface it as a c10::Error (RuntimeError in Python).
template <typename F>
void run_kernel(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace

void append_kv_cpu(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                   const Tensor& slot_mapping) {
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&k, "k"}, {&v, "v"},
                         {&k_cache, "k_cache"}, {&v_cache, "v_cache"}}) {
    check_cpu(*t, name);
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
  check_index(slot_mapping, "slot_mapping", at::kLong, 1);
  TORCH_CHECK(slot_mapping.size(0) == k.size(0), "slot_mapping has ", slot_mapping.size(0),
              " entries but k has ", k.size(0), " rows");
  TORCH_CHECK(k_cache.size(1) >= 1, "page_size must be >= 1");
  check_no_self_overlap(k_cache, "k_cache");
  check_no_self_overlap(v_cache, "v_cache");

  cpu::AppendKvParams p;
  p.elem_size = static_cast<int64_t>(k_cache.element_size());
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
  p.num_kv_heads = k.size(1);
  p.head_dim = k.size(2);
  p.num_pages = k_cache.size(0);
  p.page_size = k_cache.size(1);
  run_kernel([&] { cpu::append_kv(p); });
}

void kv_rollback_cpu(Tensor& kv_cache, const Tensor& block_table, Tensor& committed_lens,
                     const Tensor& path, const Tensor& num_accepted) {
  check_cpu(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2,
              "kv_cache: expected [L, 2, num_pages, page_size, Hkv, D], got shape ",
              kv_cache.sizes());
  check_unit_last_stride(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.size(3) >= 1, "page_size must be >= 1");
  check_index(block_table, "block_table", at::kInt, 2);
  check_index(committed_lens, "committed_lens", at::kInt, 1);
  check_index(path, "path", at::kInt, 2);
  check_index(num_accepted, "num_accepted", at::kInt, 1);
  const int64_t b = committed_lens.size(0);
  TORCH_CHECK(block_table.size(0) == b && path.size(0) == b && num_accepted.size(0) == b,
              "block_table (", block_table.size(0), " rows), committed_lens (", b,
              "), path (", path.size(0), " rows) and num_accepted (", num_accepted.size(0),
              ") must agree on the batch size");
  check_no_self_overlap(kv_cache, "kv_cache");
  check_no_self_overlap(committed_lens, "committed_lens");

  cpu::KvRollbackParams p;
  p.elem_size = static_cast<int64_t>(kv_cache.element_size());
  p.kv_cache = kv_cache.data_ptr();
  p.stride_layer = kv_cache.stride(0);
  p.stride_kv = kv_cache.stride(1);
  p.stride_page = kv_cache.stride(2);
  p.stride_slot = kv_cache.stride(3);
  p.stride_head = kv_cache.stride(4);
  p.num_layers = kv_cache.size(0);
  p.num_pages = kv_cache.size(2);
  p.page_size = kv_cache.size(3);
  p.num_kv_heads = kv_cache.size(4);
  p.head_dim = kv_cache.size(5);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride_b = block_table.stride(0);
  p.block_table_stride_p = block_table.stride(1);
  p.max_pages = block_table.size(1);
  p.committed_lens = committed_lens.data_ptr<int32_t>();
  p.committed_lens_stride = committed_lens.stride(0);
  p.path = path.data_ptr<int32_t>();
  p.path_stride_b = path.stride(0);
  p.path_stride_t = path.stride(1);
  p.max_t = path.size(1);
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.num_accepted_stride = num_accepted.stride(0);
  p.batch = b;
  run_kernel([&] { cpu::kv_rollback(p); });
}

}  // namespace specrt
