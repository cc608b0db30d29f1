// C API of the fused sampling / verification kernels (csrc/include/specrt/sampling.h).
#include "kernels/rejection_sampling.cuh"
#include "specrt/sampling.h"

namespace specrt {

namespace ks = kernels::sampling;

cudaError_t rejection_sample(RejectionSampleCudaParams p, cudaStream_t stream) {
  if (p.vocab_size <= 0 || p.batch_size < 0 || p.max_t < 1) return cudaErrorInvalidValue;
  ks::KernelArgs a{};
  a.logits = p.target_logits;
  a.logits_row_stride = p.logits_row_stride;
  a.vocab = p.vocab_size;
  a.draft_tokens = p.draft_tokens;
  a.parents = p.parents;
  a.node_indptr = p.node_indptr;
  a.draft_probs = p.draft_probs;
  a.draft_probs_row_stride = p.draft_probs_row_stride;
  a.temperature = p.temperature;
  a.top_k = p.top_k;
  a.top_p = p.top_p;
  a.seed = p.seed;
  a.offset = p.offset;
  a.uniforms = p.uniforms;
  a.out_tokens = p.out_tokens;
  a.out_tokens_row_stride = p.out_tokens_row_stride;
  a.out_path = p.out_path;
  a.out_path_row_stride = p.out_path_row_stride;
  a.max_t = p.max_t;
  a.out_num_accepted = p.out_num_accepted;
  return ks::launch<false>(a, static_cast<rules::LogitsDtype>(p.logits_dtype), p.batch_size,
                           p.max_t, stream);
}

cudaError_t sample(SampleCudaParams p, cudaStream_t stream) {
  if (p.vocab_size <= 0 || p.num_rows < 0) return cudaErrorInvalidValue;
  ks::KernelArgs a{};
  a.logits = p.logits;
  a.logits_row_stride = p.logits_row_stride;
  a.vocab = p.vocab_size;
  a.temperature = p.temperature;
  a.top_k = p.top_k;
  a.top_p = p.top_p;
  a.seed = p.seed;
  a.offset = p.offset;
  a.uniforms = p.uniforms;
  a.out_tokens = p.out_tokens;
  a.max_t = 1;
  a.out_probs = p.out_probs;
  a.out_probs_row_stride = p.out_probs_row_stride;
  return ks::launch<true>(a, static_cast<rules::LogitsDtype>(p.logits_dtype), p.num_rows, 1,
                          stream);
}

}  // namespace specrt
