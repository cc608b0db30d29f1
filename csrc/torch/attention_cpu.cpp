// CPU glue for the attention ops: check, cast, call the torch-free kernel in csrc/cpu.
#include <torch/library.h>
#include "torch/ops.h"

namespace specrt {
}  // namespace specrt
namespace specrt {
void tree_attention_cpu(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const OptTensor&, Tensor&, const OptTensor&, double,
                        const OptTensor&, const OptTensor&) {
  TORCH_CHECK(false, "specrt::tree_attention (CPU): not implemented yet");
}
}  // namespace specrt
