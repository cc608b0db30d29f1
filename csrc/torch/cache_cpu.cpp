// CPU glue for the cache ops: check, cast, call the torch-free kernel in csrc/cpu.
#include <torch/library.h>
#include "torch/ops.h"

namespace specrt {
}  // namespace specrt
namespace specrt {
void append_kv_cpu(const Tensor&, const Tensor&, Tensor&, Tensor&, const Tensor&) {
  TORCH_CHECK(false, "specrt::append_kv (CPU): not implemented yet");
}
void kv_rollback_cpu(Tensor&, const Tensor&, Tensor&, const Tensor&, const Tensor&) {
  TORCH_CHECK(false, "specrt::kv_rollback (CPU): not implemented yet");
}
}  // namespace specrt
