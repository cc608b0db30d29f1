// SIMT emulation: the cooperative_groups API the kernels use (thread block, cluster).
#pragma once
#include "cuda_runtime.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { ::simt::syncthreads(); }
  unsigned thread_rank() const { return static_cast<unsigned>(::simt::cur()->linear); }
  unsigned size() const { return blockDim.x * blockDim.y * blockDim.z; }
  unsigned num_threads() const { return size(); }
};

class cluster_group {
 public:
  void sync() const { ::simt::cluster_sync(); }
  unsigned block_rank() const { return ::simt::cluster_block_rank(); }
  unsigned num_blocks() const { return ::simt::cluster_num_blocks(); }
  unsigned num_threads() const { return num_blocks() * blockDim.x * blockDim.y * blockDim.z; }
  template <typename T>
  T* map_shared_rank(T* addr, unsigned rank) const {
    return static_cast<T*>(::simt::map_shared_rank(addr, rank));
  }
};

inline thread_block this_thread_block() { return thread_block{}; }
inline cluster_group this_cluster() { return cluster_group{}; }

}  // namespace cooperative_groups
