// C API of the tree-attention kernel (csrc/include/specrt/attention.h): a thin, torch-free entry
// point over csrc/kernels/tree_attention.cuh for engines that embed the kernels.
#include "kernels/tree_attention.cuh"
#include "specrt/attention.h"

extern "C" cudaError_t specrt_tree_attention(TreeAttentionCudaParams params,
                                             cudaStream_t stream) {
  return specrt::kernels::attention::run(params, stream);
}
