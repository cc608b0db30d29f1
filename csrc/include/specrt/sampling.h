// specrt C API: fused sampling / verification on CUDA (docs/ops.md, section 3). Plain C++ with
// raw pointers; no torch. Both calls enqueue a fixed number of launches on `stream`, never
// allocate and never synchronise with the host, so they can be captured in a CUDA graph.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace specrt {

// Same values as specrt::rules::LogitsDtype.
enum class SamplingLogitsDtype : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RejectionSampleCudaParams {
  const void* target_logits;      // [total_nodes, vocab_size], unit stride along the vocab
  SamplingLogitsDtype logits_dtype;
  int64_t logits_row_stride;      // in elements
  int64_t vocab_size;
  int64_t batch_size;
  const int32_t* draft_tokens;    // [total_nodes]
  const int32_t* parents;         // [total_nodes], local parent index, -1 for the root
  const int32_t* node_indptr;     // [batch_size + 1]
  const float* draft_probs;       // [total_nodes, vocab_size] or nullptr (chains only)
  int64_t draft_probs_row_stride;
  const float* temperature;       // [batch_size]
  const int32_t* top_k;           // [batch_size]
  const float* top_p;             // [batch_size]
  const int64_t* seed;            // [batch_size]
  const int64_t* offset;          // [batch_size]
  const float* uniforms;          // [total_nodes] or nullptr (Philox)
  int32_t* out_tokens;            // [batch_size, max_t]
  int64_t out_tokens_row_stride;
  int32_t* out_path;              // [batch_size, max_t]
  int64_t out_path_row_stride;
  int64_t max_t;                  // >= every sequence's node count (not checked on device)
  int32_t* out_num_accepted;      // [batch_size]
};

struct SampleCudaParams {
  const void* logits;             // [num_rows, vocab_size], unit stride along the vocab
  SamplingLogitsDtype logits_dtype;
  int64_t logits_row_stride;
  int64_t num_rows;
  int64_t vocab_size;
  const float* temperature;       // [num_rows] each
  const int32_t* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
  const float* uniforms;          // [num_rows] or nullptr
  int32_t* out_tokens;            // [num_rows]
  float* out_probs;               // [num_rows, vocab_size] or nullptr
  int64_t out_probs_row_stride;
};

// The device kernels trust their indices (the tree shape, token ranges and max_t): callers
// validate them where they can (the torch wrapper checks shapes and dtypes; the CPU op
// validates contents). Invalid logits rows are not an error: they yield -1 outputs.
cudaError_t rejection_sample(RejectionSampleCudaParams params, cudaStream_t stream);
cudaError_t sample(SampleCudaParams params, cudaStream_t stream);

}  // namespace specrt
