// CPU glue for the sampling ops: check, cast, call the torch-free kernel in csrc/cpu.
#include <torch/library.h>
#include "torch/ops.h"

namespace specrt {
}  // namespace specrt
namespace specrt {
void rejection_sample_cpu(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&, const Tensor&, const OptTensor&, Tensor&, Tensor&,
                          Tensor&) {
  TORCH_CHECK(false, "specrt::rejection_sample (CPU): not implemented yet");
}
void sample_cpu(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const OptTensor&, Tensor&, const OptTensor&) {
  TORCH_CHECK(false, "specrt::sample (CPU): not implemented yet");
}
}  // namespace specrt
