// CPU glue for the sampling ops: check, cast, call the torch-free kernel in csrc/cpu.
#include <string>

#include <torch/library.h>

#include "cpu/sampling.h"
#include "torch/ops.h"

namespace specrt {
namespace {

rules::LogitsDtype logits_dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return rules::LogitsDtype::kFloat32;
    case at::kBFloat16: return rules::LogitsDtype::kBFloat16;
    case at::kHalf: return rules::LogitsDtype::kFloat16;
    default:
      TORCH_CHECK(false, op, ": logits must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_vector(const Tensor& t, at::ScalarType st, int64_t n, const char* op,
                  const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_matrix(const Tensor& t, at::ScalarType st, int64_t rows, int64_t cols, const char* op,
                  const char* name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
              " must have shape [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name, " needs a unit last stride");
}

cpu::SamplingParamsView check_request_params(const Tensor& temperature, const Tensor& top_k,
                                             const Tensor& top_p, const Tensor& seed,
                                             const Tensor& offset, int64_t n, const char* op) {
  check_vector(temperature, at::kFloat, n, op, "temperature");
  check_vector(top_k, at::kInt, n, op, "top_k");
  check_vector(top_p, at::kFloat, n, op, "top_p");
  check_vector(seed, at::kLong, n, op, "seed");
  check_vector(offset, at::kLong, n, op, "offset");
  return {temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
          seed.data_ptr<int64_t>(), offset.data_ptr<int64_t>()};
}

}  // namespace

void rejection_sample_cpu(const Tensor& target_logits, const Tensor& draft_tokens,
                          const Tensor& parents, const Tensor& node_indptr,
                          const OptTensor& draft_probs, const Tensor& temperature,
                          const Tensor& top_k, const Tensor& top_p, const Tensor& seed,
                          const Tensor& offset, const OptTensor& uniforms, Tensor& out_tokens,
                          Tensor& out_path, Tensor& out_num_accepted) {
  constexpr const char* op = "specrt::rejection_sample";
  check_cpu(target_logits, op, "target_logits");
  TORCH_CHECK(target_logits.dim() == 2, op, ": target_logits must be [total_nodes, V], got ",
              target_logits.sizes());
  const int64_t total = target_logits.size(0), vocab = target_logits.size(1);
  TORCH_CHECK(vocab >= 1, op, ": vocabulary must not be empty");
  TORCH_CHECK(target_logits.stride(1) == 1 || vocab == 1, op,
              ": target_logits needs a unit last stride");
  const auto dtype = logits_dtype_of(target_logits, op);
  check_cpu(node_indptr, op, "node_indptr");
  TORCH_CHECK(node_indptr.dim() == 1 && node_indptr.size(0) >= 1, op,
              ": node_indptr must be [B + 1], got ", node_indptr.sizes());
  const int64_t batch = node_indptr.size(0) - 1;
  check_vector(node_indptr, at::kInt, batch + 1, op, "node_indptr");
  check_vector(draft_tokens, at::kInt, total, op, "draft_tokens");
  check_vector(parents, at::kInt, total, op, "parents");
  const auto req = check_request_params(temperature, top_k, top_p, seed, offset, batch, op);
  const float* q = nullptr;
  int64_t q_stride = 0;
  if (draft_probs.has_value()) {
    check_matrix(*draft_probs, at::kFloat, total, vocab, op, "draft_probs");
    q = draft_probs->data_ptr<float>();
    q_stride = draft_probs->stride(0);
  }
  const float* u = nullptr;
  if (uniforms.has_value()) {
    check_vector(*uniforms, at::kFloat, total, op, "uniforms");
    u = uniforms->data_ptr<float>();
  }
  TORCH_CHECK(out_tokens.dim() == 2, op, ": out_tokens must be [B, max_T], got ",
              out_tokens.sizes());
  const int64_t max_t = out_tokens.size(1);
  check_matrix(out_tokens, at::kInt, batch, max_t, op, "out_tokens");
  check_matrix(out_path, at::kInt, batch, max_t, op, "out_path");
  check_vector(out_num_accepted, at::kInt, batch, op, "out_num_accepted");

  cpu::RejectionSampleParams p{};
  p.target_logits = target_logits.data_ptr();
  p.logits_dtype = dtype;
  p.logits_row_stride = target_logits.stride(0);
  p.vocab_size = vocab;
  p.total_nodes = total;
  p.batch_size = batch;
  p.draft_tokens = draft_tokens.data_ptr<int32_t>();
  p.parents = parents.data_ptr<int32_t>();
  p.node_indptr = node_indptr.data_ptr<int32_t>();
  p.draft_probs = q;
  p.draft_probs_row_stride = q_stride;
  p.req = req;
  p.uniforms = u;
  p.out_tokens = out_tokens.data_ptr<int32_t>();
  p.out_tokens_row_stride = out_tokens.stride(0);
  p.out_path = out_path.data_ptr<int32_t>();
  p.out_path_row_stride = out_path.stride(0);
  p.max_t = max_t;
  p.out_num_accepted = out_num_accepted.data_ptr<int32_t>();
  const std::string err = cpu::rejection_sample(p);
  TORCH_CHECK(err.empty(), op, ": ", err);
}

void sample_cpu(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
                const Tensor& top_p, const Tensor& seed, const Tensor& offset,
                const OptTensor& uniforms, Tensor& out_tokens, const OptTensor& out_probs) {
  constexpr const char* op = "specrt::sample";
  check_cpu(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, op, ": vocabulary must not be empty");
  TORCH_CHECK(logits.stride(1) == 1 || vocab == 1, op, ": logits needs a unit last stride");
  const auto dtype = logits_dtype_of(logits, op);
  const auto req = check_request_params(temperature, top_k, top_p, seed, offset, n, op);
  const float* u = nullptr;
  if (uniforms.has_value()) {
    check_vector(*uniforms, at::kFloat, n, op, "uniforms");
    u = uniforms->data_ptr<float>();
  }
  check_vector(out_tokens, at::kInt, n, op, "out_tokens");
  float* probs = nullptr;
  int64_t probs_stride = 0;
  if (out_probs.has_value()) {
    check_matrix(*out_probs, at::kFloat, n, vocab, op, "out_probs");
    probs = out_probs->data_ptr<float>();
    probs_stride = out_probs->stride(0);
  }
  cpu::SampleParams p{};
  p.logits = logits.data_ptr();
  p.logits_dtype = dtype;
  p.logits_row_stride = logits.stride(0);
  p.num_rows = n;
  p.vocab_size = vocab;
  p.req = req;
  p.uniforms = u;
  p.out_tokens = out_tokens.data_ptr<int32_t>();
  p.out_probs = probs;
  p.out_probs_row_stride = probs_stride;
  const std::string err = cpu::sample(p);
  TORCH_CHECK(err.empty(), op, ": ", err);
}

}  // namespace specrt
