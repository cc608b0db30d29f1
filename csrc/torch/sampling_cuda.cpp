// CUDA glue for the sampling ops (docs/ops.md, op 3): check devices, dtypes and shapes, cast,
// launch through the C API (csrc/include/specrt/sampling.h) on the current stream. Index
// values (tree shape, token ids, max_T >= T_b) are not checked here, as that would sync;
// specrt.ops checks them when it may.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "specrt/sampling.h"
#include "torch/ops.h"

namespace specrt {
namespace {

SamplingLogitsDtype logits_dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return SamplingLogitsDtype::kFloat32;
    case at::kBFloat16: return SamplingLogitsDtype::kBFloat16;
    case at::kHalf: return SamplingLogitsDtype::kFloat16;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_on(const Tensor& t, const at::Device& dev, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), ", expected ", dev);
}

void check_vector(const Tensor& t, at::ScalarType st, int64_t n, const at::Device& dev,
                  const char* op, const char* name) {
  check_on(t, dev, op, name);
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_matrix(const Tensor& t, at::ScalarType st, int64_t rows, int64_t cols,
                  const at::Device& dev, const char* op, const char* name) {
  check_on(t, dev, op, name);
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name, " needs a unit last stride");
}

void check_request_params(const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
                          const Tensor& seed, const Tensor& offset, int64_t n,
                          const at::Device& dev, const char* op) {
  check_vector(temperature, at::kFloat, n, dev, op, "temperature");
  check_vector(top_k, at::kInt, n, dev, op, "top_k");
  check_vector(top_p, at::kFloat, n, dev, op, "top_p");
  check_vector(seed, at::kLong, n, dev, op, "seed");
  check_vector(offset, at::kLong, n, dev, op, "offset");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void rejection_sample_cuda(const Tensor& target_logits, const Tensor& draft_tokens,
                           const Tensor& parents, const Tensor& node_indptr,
                           const OptTensor& draft_probs, const Tensor& temperature,
                           const Tensor& top_k, const Tensor& top_p, const Tensor& seed,
                           const Tensor& offset, const OptTensor& uniforms, Tensor& out_tokens,
                           Tensor& out_path, Tensor& out_num_accepted) {
  constexpr const char* op = "specrt::rejection_sample";
  const at::Device dev = target_logits.device();
  check_on(target_logits, dev, op, "target_logits");
  TORCH_CHECK(target_logits.dim() == 2, op, ": target_logits must be [total_nodes, V], got ",
              target_logits.sizes());
  const int64_t total = target_logits.size(0), vocab = target_logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab <= INT32_MAX, op, ": vocabulary size must be in [1, 2^31)");
  TORCH_CHECK(vocab == 1 || target_logits.stride(1) == 1, op,
              ": target_logits needs a unit last stride");
  const auto dtype = logits_dtype_of(target_logits, op);
  check_on(node_indptr, dev, op, "node_indptr");
  TORCH_CHECK(node_indptr.dim() == 1 && node_indptr.size(0) >= 1, op,
              ": node_indptr must be [B + 1], got ", node_indptr.sizes());
  const int64_t batch = node_indptr.size(0) - 1;
  check_vector(node_indptr, at::kInt, batch + 1, dev, op, "node_indptr");
  check_vector(draft_tokens, at::kInt, total, dev, op, "draft_tokens");
  check_vector(parents, at::kInt, total, dev, op, "parents");
  check_request_params(temperature, top_k, top_p, seed, offset, batch, dev, op);
  if (draft_probs.has_value())
    check_matrix(*draft_probs, at::kFloat, total, vocab, dev, op, "draft_probs");
  if (uniforms.has_value()) check_vector(*uniforms, at::kFloat, total, dev, op, "uniforms");
  TORCH_CHECK(out_tokens.dim() == 2, op, ": out_tokens must be [B, max_T], got ",
              out_tokens.sizes());
  const int64_t max_t = out_tokens.size(1);
  TORCH_CHECK(max_t >= 1, op, ": out_tokens needs max_T >= 1");
  check_matrix(out_tokens, at::kInt, batch, max_t, dev, op, "out_tokens");
  check_matrix(out_path, at::kInt, batch, max_t, dev, op, "out_path");
  check_vector(out_num_accepted, at::kInt, batch, dev, op, "out_num_accepted");
  if (batch == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  RejectionSampleCudaParams p{};
  p.target_logits = target_logits.data_ptr();
  p.logits_dtype = dtype;
  p.logits_row_stride = target_logits.stride(0);
  p.vocab_size = vocab;
  p.batch_size = batch;
  p.draft_tokens = draft_tokens.data_ptr<int32_t>();
  p.parents = parents.data_ptr<int32_t>();
  p.node_indptr = node_indptr.data_ptr<int32_t>();
  p.draft_probs = draft_probs.has_value() ? draft_probs->data_ptr<float>() : nullptr;
  p.draft_probs_row_stride = draft_probs.has_value() ? draft_probs->stride(0) : 0;
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.uniforms = uniforms.has_value() ? uniforms->data_ptr<float>() : nullptr;
  p.out_tokens = out_tokens.data_ptr<int32_t>();
  p.out_tokens_row_stride = out_tokens.stride(0);
  p.out_path = out_path.data_ptr<int32_t>();
  p.out_path_row_stride = out_path.stride(0);
  p.max_t = max_t;
  p.out_num_accepted = out_num_accepted.data_ptr<int32_t>();
  check_launch(specrt::rejection_sample(p, c10::cuda::getCurrentCUDAStream(dev.index())), op);
}

void sample_cuda(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                 const Tensor& top_p, const Tensor& seed, const Tensor& offset,
                 const OptTensor& uniforms, Tensor& out_tokens, const OptTensor& out_probs) {
  constexpr const char* op = "specrt::sample";
  const at::Device dev = logits.device();
  check_on(logits, dev, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab <= INT32_MAX, op, ": vocabulary size must be in [1, 2^31)");
  TORCH_CHECK(vocab == 1 || logits.stride(1) == 1, op, ": logits needs a unit last stride");
  const auto dtype = logits_dtype_of(logits, op);
  check_request_params(temperature, top_k, top_p, seed, offset, n, dev, op);
  if (uniforms.has_value()) check_vector(*uniforms, at::kFloat, n, dev, op, "uniforms");
  check_vector(out_tokens, at::kInt, n, dev, op, "out_tokens");
  if (out_probs.has_value()) check_matrix(*out_probs, at::kFloat, n, vocab, dev, op, "out_probs");
  if (n == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  SampleCudaParams p{};
  p.logits = logits.data_ptr();
  p.logits_dtype = dtype;
  p.logits_row_stride = logits.stride(0);
  p.num_rows = n;
  p.vocab_size = vocab;
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.seed = seed.data_ptr<int64_t>();
  p.offset = offset.data_ptr<int64_t>();
  p.uniforms = uniforms.has_value() ? uniforms->data_ptr<float>() : nullptr;
  p.out_tokens = out_tokens.data_ptr<int32_t>();
  p.out_probs = out_probs.has_value() ? out_probs->data_ptr<float>() : nullptr;
  p.out_probs_row_stride = out_probs.has_value() ? out_probs->stride(0) : 0;
  check_launch(specrt::sample(p, c10::cuda::getCurrentCUDAStream(dev.index())), op);
}

}  // namespace specrt
