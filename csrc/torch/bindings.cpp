// The one place where specrt's op schemas are declared and their implementations registered
// per dispatch key. Ops use destination passing: outputs are `Tensor(a!)` arguments the caller
// allocates; every op returns (). That keeps them usable under torch.compile(fullgraph=True)
// and inside CUDA graphs (no allocation, no host sync).
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "torch/ops.h"

#ifndef SPECRT_BUILD_ABI_TAG
#define SPECRT_BUILD_ABI_TAG "specrt-0.1"
#endif

TORCH_LIBRARY(specrt, m) {
  // ---- attention over the paged KV cache ----
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor qo_indptr, Tensor? mask, Tensor(a!) out, Tensor(b!)? lse, "
      "float sm_scale, Tensor? plan=None, Tensor(c!)? workspace=None) -> ()");
  m.def(
      "append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
  // ---- KV-cache rollback ----
  m.def(
      "kv_rollback(Tensor(a!) kv_cache, Tensor block_table, Tensor(b!) committed_lens, "
      "Tensor path, Tensor num_accepted) -> ()");
  // ---- skinny GEMM of decode / verify steps (CPU only; other devices use their BLAS) ----
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, bool packed=False, "
      "Tensor? residual=None) -> ()");
  m.def("linear_pack(Tensor weight, Tensor(a!) packed) -> ()");
  // ---- fused row-wise decoder-layer ops (CPU only) ----
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("rope(Tensor(a!) qk, Tensor cos, Tensor sin, int heads, int head_dim) -> ()");
  m.def("silu_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  // ---- sampling / verification ----
  m.def(
      "rejection_sample(Tensor target_logits, Tensor draft_tokens, Tensor parents, "
      "Tensor node_indptr, Tensor? draft_probs, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor seed, Tensor offset, Tensor? uniforms, Tensor(a!) out_tokens, "
      "Tensor(b!) out_path, Tensor(c!) out_num_accepted) -> ()");
  m.def(
      "sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
      "Tensor offset, Tensor? uniforms, Tensor(a!) out_tokens, Tensor(b!)? out_probs) -> ()");
}

TORCH_LIBRARY_IMPL(specrt, CPU, m) {
  m.impl("tree_attention", &specrt::tree_attention_cpu);
  m.impl("append_kv", &specrt::append_kv_cpu);
  m.impl("kv_rollback", &specrt::kv_rollback_cpu);
  m.impl("rejection_sample", &specrt::rejection_sample_cpu);
  m.impl("sample", &specrt::sample_cpu);
  m.impl("linear", &specrt::linear_cpu);
  m.impl("linear_pack", &specrt::linear_pack_cpu);
  m.impl("rms_norm", &specrt::rms_norm_cpu);
  m.impl("rope", &specrt::rope_cpu);
  m.impl("silu_mul", &specrt::silu_mul_cpu);
}

#ifdef SPECRT_WITH_CUDA
TORCH_LIBRARY_IMPL(specrt, CUDA, m) {
  m.impl("tree_attention", &specrt::tree_attention_cuda);
  m.impl("append_kv", &specrt::append_kv_cuda);
  m.impl("kv_rollback", &specrt::kv_rollback_cuda);
  m.impl("rejection_sample", &specrt::rejection_sample_cuda);
  m.impl("sample", &specrt::sample_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "specrt native extension: ops are registered as torch.ops.specrt.*";
  m.attr("ABI_TAG") = SPECRT_BUILD_ABI_TAG;
  m.def("linear_isa", [](const std::string& dtype) {
    if (dtype == "float32") return specrt::linear_isa_cpu(at::kFloat);
    if (dtype == "bfloat16") return specrt::linear_isa_cpu(at::kBFloat16);
    return std::string();
  }, "Instruction set of the CPU skinny GEMM for a dtype ('' when it cannot run here).");
  m.def("linear_packed_size", [](const std::string& dtype, int64_t n, int64_t k) -> int64_t {
    if (dtype == "float32") return specrt::linear_packed_size_cpu(at::kFloat, n, k);
    if (dtype == "bfloat16") return specrt::linear_packed_size_cpu(at::kBFloat16, n, k);
    return 0;
  }, "Elements of the packed layout of an [n, k] weight (0 when the kernel cannot run here).");
#ifdef SPECRT_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
