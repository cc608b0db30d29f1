// Torch-free CPU twin of the sampling / verification kernels (docs/ops.md, section 3):
// rejection_sample (greedy, deterministic-draft trees, chains with draft probabilities) and
// sample. Same rules header and Philox stream as the CUDA kernel.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/sampling_rules.cuh"

namespace specrt::cpu {

using rules::LogitsDtype;

// Per-request sampling parameters, each an array indexed by request (sequence or row).
struct SamplingParamsView {
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
};

struct RejectionSampleParams {
  const void* target_logits;       // [total_nodes, vocab], unit stride along vocab
  LogitsDtype logits_dtype;
  int64_t logits_row_stride;       // elements
  int64_t vocab_size;
  int64_t total_nodes;
  int64_t batch_size;
  const int32_t* draft_tokens;     // [total_nodes]
  const int32_t* parents;          // [total_nodes], local indices
  const int32_t* node_indptr;      // [batch_size + 1]
  const float* draft_probs;        // [total_nodes, vocab] or nullptr (chains only)
  int64_t draft_probs_row_stride;
  SamplingParamsView req;          // [batch_size] each
  const float* uniforms;           // [total_nodes] or nullptr (then Philox)
  int32_t* out_tokens;             // [batch_size, max_t]
  int64_t out_tokens_row_stride;
  int32_t* out_path;               // [batch_size, max_t]
  int64_t out_path_row_stride;
  int64_t max_t;
  int32_t* out_num_accepted;       // [batch_size]
};

struct SampleParams {
  const void* logits;              // [num_rows, vocab], unit stride along vocab
  LogitsDtype logits_dtype;
  int64_t logits_row_stride;
  int64_t num_rows;
  int64_t vocab_size;
  SamplingParamsView req;          // [num_rows] each
  const float* uniforms;           // [num_rows] or nullptr
  int32_t* out_tokens;             // [num_rows]
  float* out_probs;                // [num_rows, vocab] or nullptr
  int64_t out_probs_row_stride;
};

// Both validate everything they index first; on bad input they return a message and write
// nothing. An empty string means success.
std::string rejection_sample(const RejectionSampleParams& p);
std::string sample(const SampleParams& p);

}  // namespace specrt::cpu
