// extern "C" entry points of the SIMT emulation library for ctypes (tests/simt_backend.py): the
// emulator's configuration and last error, and the C API calls (csrc/include/specrt/*.h) with
// their parameter structs passed by pointer. Layout checks let the Python side refuse a build
// whose structs it would misread.
#include <cstddef>
#include <cstring>

#include "simt.h"
#include "specrt/attention.h"
#include "specrt/cache.h"
#include "specrt/sampling.h"

extern "C" {

void simt_configure(int schedule, unsigned long long seed, int num_sms, int workers) {
  simt::Config& c = simt::config();
  c.schedule = schedule;
  c.seed = seed;
  c.num_sms = num_sms;
  c.workers = workers;
}

const char* simt_last_error() { return simt::last_error(); }

// The most recent launch: grid[3], block[3], cluster[3], dynamic shared memory bytes.
void simt_last_launch(unsigned* grid, unsigned* block, unsigned* cluster, long long* smem) {
  const simt::LaunchSpec s = simt::last_launch();
  const simt::u3* src[3] = {&s.grid, &s.block, &s.cluster};
  unsigned* dst[3] = {grid, block, cluster};
  for (int i = 0; i < 3; ++i) {
    dst[i][0] = src[i]->x;
    dst[i][1] = src[i]->y;
    dst[i][2] = src[i]->z;
  }
  *smem = static_cast<long long>(s.dynamic_smem);
}
void simt_clear_error() { simt::set_last_error(""); }

int simt_tree_attention(const TreeAttentionCudaParams* p) {
  return static_cast<int>(specrt_tree_attention(*p, nullptr));
}
int simt_append_kv(const specrt::AppendKvParams* p) {
  return static_cast<int>(specrt::append_kv(*p, nullptr));
}
int simt_kv_rollback(const specrt::KvRollbackParams* p) {
  return static_cast<int>(specrt::kv_rollback(*p, nullptr));
}
int simt_rejection_sample(const specrt::RejectionSampleCudaParams* p) {
  return static_cast<int>(specrt::rejection_sample(*p, nullptr));
}
int simt_sample(const specrt::SampleCudaParams* p) {
  return static_cast<int>(specrt::sample(*p, nullptr));
}

// sizeof of each params struct, and the offset of its last member (layout check).
long long simt_layout(const char* name, int what) {
#define SIMT_LAYOUT(S, last)                                                \
  if (std::strcmp(name, #S) == 0) return what == 0 ? sizeof(S) : offsetof(S, last);
  SIMT_LAYOUT(TreeAttentionCudaParams, path)
  SIMT_LAYOUT(specrt::AppendKvParams, elem_size)
  SIMT_LAYOUT(specrt::KvRollbackParams, batch)
  SIMT_LAYOUT(specrt::RejectionSampleCudaParams, out_num_accepted)
  SIMT_LAYOUT(specrt::SampleCudaParams, out_probs_row_stride)
#undef SIMT_LAYOUT
  return -1;
}

}  // extern "C"
