// C API of the cache-writing kernels (csrc/include/specrt/cache.h): thin wrappers over the
// launchers in csrc/kernels, compiled once here so that embedders link instead of including.
#include "kernels/append_kv.cuh"
#include "kernels/kv_rollback.cuh"
#include "specrt/cache.h"

namespace specrt {

cudaError_t append_kv(AppendKvParams params, cudaStream_t stream) {
  return kernels::launch_append_kv(params, stream);
}

cudaError_t kv_rollback(KvRollbackParams params, cudaStream_t stream) {
  return kernels::launch_kv_rollback(params, stream);
}

}  // namespace specrt
