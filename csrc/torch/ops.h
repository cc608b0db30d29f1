// Declarations of every op implementation, per dispatch key. The schemas live in bindings.cpp
// (the one TORCH_LIBRARY block); each *_cpu.cpp / *_cuda.cpp file here only checks, casts and
// calls a torch-free kernel (csrc/cpu for CPU, the C API in csrc/include/specrt for CUDA).
#pragma once
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>

namespace specrt {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- attention / cache writes (attention_*.cpp, cache_*.cpp) ----
void tree_attention_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        const Tensor& block_table, const Tensor& seq_lens,
                        const Tensor& qo_indptr, const OptTensor& mask, Tensor& out,
                        const OptTensor& lse, double sm_scale, const OptTensor& plan,
                        const OptTensor& workspace);
void append_kv_cpu(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                   const Tensor& slot_mapping);
void kv_rollback_cpu(Tensor& kv_cache, const Tensor& block_table, Tensor& committed_lens,
                     const Tensor& path, const Tensor& num_accepted);

// ---- skinny GEMM for decode / verify steps (linear_cpu.cpp; CPU only) ----
void linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, Tensor& out,
                bool packed, const OptTensor& residual);
void linear_pack_cpu(const Tensor& weight, Tensor& packed);
std::string linear_isa_cpu(at::ScalarType dtype);
int64_t linear_packed_size_cpu(at::ScalarType dtype, int64_t n, int64_t k);

// ---- fused row-wise decoder-layer ops (layer_cpu.cpp; CPU only) ----
void rms_norm_cpu(const Tensor& x, const Tensor& weight, double eps, Tensor& out);
void rope_cpu(Tensor& qk, const Tensor& cos, const Tensor& sin, int64_t heads, int64_t head_dim);
void silu_mul_cpu(const Tensor& gate_up, Tensor& out);

// ---- sampling (sampling_*.cpp) ----
void rejection_sample_cpu(const Tensor& target_logits, const Tensor& draft_tokens,
                          const Tensor& parents, const Tensor& node_indptr,
                          const OptTensor& draft_probs, const Tensor& temperature,
                          const Tensor& top_k, const Tensor& top_p, const Tensor& seed,
                          const Tensor& offset, const OptTensor& uniforms, Tensor& out_tokens,
                          Tensor& out_path, Tensor& out_num_accepted);
void sample_cpu(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                const Tensor& top_p, const Tensor& seed, const Tensor& offset,
                const OptTensor& uniforms, Tensor& out_tokens, const OptTensor& out_probs);

#ifdef SPECRT_WITH_CUDA
void tree_attention_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                         const Tensor& block_table, const Tensor& seq_lens,
                         const Tensor& qo_indptr, const OptTensor& mask, Tensor& out,
                         const OptTensor& lse, double sm_scale, const OptTensor& plan,
                         const OptTensor& workspace);
void append_kv_cuda(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache,
                    const Tensor& slot_mapping);
void kv_rollback_cuda(Tensor& kv_cache, const Tensor& block_table, Tensor& committed_lens,
                      const Tensor& path, const Tensor& num_accepted);
void rejection_sample_cuda(const Tensor& target_logits, const Tensor& draft_tokens,
                           const Tensor& parents, const Tensor& node_indptr,
                           const OptTensor& draft_probs, const Tensor& temperature,
                           const Tensor& top_k, const Tensor& top_p, const Tensor& seed,
                           const Tensor& offset, const OptTensor& uniforms, Tensor& out_tokens,
                           Tensor& out_path, Tensor& out_num_accepted);
void sample_cuda(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                 const Tensor& top_p, const Tensor& seed, const Tensor& offset,
                 const OptTensor& uniforms, Tensor& out_tokens, const OptTensor& out_probs);
#endif

}  // namespace specrt
