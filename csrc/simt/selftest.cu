// Small kernels that test the SIMT emulation itself (tests/test_simt_emulator.py), and, compiled
// by nvcc on a GPU, the agreement of the emulated PTX twins with the hardware (scripts/gpu_check):
// the same source runs on both machines. Host entry points take device pointers (host pointers
// under the emulation), launch one kernel, and return its cudaError_t.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/ptx.cuh"

namespace ptx = specrt::kernels::ptx;

// Named (not anonymous) namespace: the emulator names kernels in messages via dladdr.
namespace simt_selftest {

// ---- tensor-core instructions ----

// One warp: A [16][16] and B [16][8] (row-major b16), C [16][8] f32 -> D = A B + C, fragments
// loaded element by element in the PTX ISA's documented layout.
__global__ void mma_kernel(const uint16_t* A, const uint16_t* B, const float* Cm, float* D,
                           int bf16) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pack = [](uint16_t lo, uint16_t hi) {
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  };
  uint32_t a[4];
  a[0] = pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  const uint32_t b0 = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  const uint32_t b1 = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  float c[4] = {Cm[g * 8 + 2 * t], Cm[g * 8 + 2 * t + 1], Cm[(g + 8) * 8 + 2 * t],
                Cm[(g + 8) * 8 + 2 * t + 1]};
  if (bf16)
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
  else
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  D[g * 8 + 2 * t] = c[0];
  D[g * 8 + 2 * t + 1] = c[1];
  D[(g + 8) * 8 + 2 * t] = c[2];
  D[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// One warp: four 8x8 b16 matrices M[j][r][c] = src[(j * 8 + r) * 8 + c] staged in shared memory
// with a row pitch of `pitch` elements (a multiple of 8); lane l addresses row l % 8 of matrix
// l / 8; out[l * 4 + j] = register j of lane l.
__global__ void ldmatrix_kernel(const uint16_t* src, uint32_t* out, int trans, int pitch) {
  SPECRT_DYNAMIC_SHARED(uint16_t, tile);
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 8; i += 32) tile[(i / 8) * pitch + i % 8] = src[i];
  __syncwarp();
  uint32_t r[4];
  const uint16_t* row = tile + lane * pitch;
  if (trans)
    ptx::ldmatrix_x4_trans(r, row);
  else
    ptx::ldmatrix_x4(r, row);
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

__global__ void ex2_kernel(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = ptx::ex2_approx(x[i]);
}

// ---- emulator semantics ----

// out[i] = in[n - 1 - i] through shared memory; without the barrier a thread may read a slot
// before its owner wrote it.
__global__ void reverse_kernel(const int* in, int* out, int barrier) {
  SPECRT_DYNAMIC_SHARED(int, s);
  const int n = blockDim.x, i = threadIdx.x;
  s[i] = in[blockIdx.x * n + i];
  if (barrier) __syncthreads();
  out[blockIdx.x * n + i] = s[n - 1 - i];
}

// Warp shuffles and votes: per lane, out[lane * 8 + k] for k = idx, up, down, xor, ballot,
// any, all, count; `mask` lanes take part, the others store -1.
__global__ void warp_kernel(const int* in, int* out, unsigned mask, int src, int delta,
                            int width) {
  const int lane = threadIdx.x;
  int* o = out + lane * 8;
  const int v = in[lane];
  const int count = __syncthreads_count((mask >> lane) & v & 1);  // every thread reaches it
  if (!((mask >> lane) & 1u)) {
    for (int k = 0; k < 8; ++k) o[k] = -1;
    return;
  }
  o[0] = __shfl_sync(mask, v, src + lane, width);
  o[1] = __shfl_up_sync(mask, v, delta, width);
  o[2] = __shfl_down_sync(mask, v, delta, width);
  o[3] = __shfl_xor_sync(mask, v, delta, width);
  o[4] = static_cast<int>(__ballot_sync(mask, v & 1));
  o[5] = __any_sync(mask, v > 1000);
  o[6] = __all_sync(mask, v >= 0);
  o[7] = count;
}

// 64-bit shuffles (double) down a butterfly: out[lane] = sum of in[] over the warp.
__global__ void shfl_double_kernel(const double* in, double* out) {
  double v = in[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  out[threadIdx.x] = v;
}

__global__ void sync_reduce_kernel(const int* pred, int* out) {
  const int p = pred[threadIdx.x];
  const int a = __syncthreads_or(p), b = __syncthreads_and(p), c = __syncthreads_count(p);
  out[threadIdx.x * 3 + 0] = a;
  out[threadIdx.x * 3 + 1] = b;
  out[threadIdx.x * 3 + 2] = c;
}

// Clusters: each block publishes (rank, blockIdx.x) in static shared memory; after a cluster
// barrier thread t of every block reads the slot of rank (rank + 1 + t) % size.
struct Slot {
  int rank, block;
  int values[4];
};
__global__ void cluster_kernel(int* out) {
  namespace cg = cooperative_groups;
  SPECRT_SHARED(Slot, slot);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  if (threadIdx.x == 0) {
    slot.rank = static_cast<int>(rank);
    slot.block = static_cast<int>(blockIdx.x);
  }
  if (threadIdx.x < 4) slot.values[threadIdx.x] = static_cast<int>(blockIdx.x * 10 + threadIdx.x);
  cluster.sync();
  const unsigned other = (rank + 1 + threadIdx.x) % size;
  const Slot* s = cluster.map_shared_rank(&slot, other);
  int* o = out + (blockIdx.x * blockDim.x + threadIdx.x) * 4;
  o[0] = static_cast<int>(size);
  o[1] = s->rank;
  o[2] = s->block;
  o[3] = s->values[threadIdx.x % 4];
  cluster.sync();  // nobody exits while a peer may still read its shared memory
}

// A block reads its neighbour's shared memory after that neighbour exited (a bug).
__global__ void dsmem_after_exit_kernel(int* out) {
  namespace cg = cooperative_groups;
  SPECRT_SHARED(int, v);
  cg::cluster_group cluster = cg::this_cluster();
  v = 1;
  cluster.sync();
  if (cluster.block_rank() == 0) return;
  for (int i = 0; i < 1000; ++i) __syncthreads();  // let rank 0 finish first
  out[0] = *cluster.map_shared_rank(&v, 0);
}

// Thread 0 skips a barrier that the others wait at.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = 1;
}

// Lane 5 exits; the rest of the warp shuffles with a full mask.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 1);
}

// cp.async: out[0..3] = the destination before the wait (the staged pattern), out[4..7] after.
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* out) {
  SPECRT_DYNAMIC_SHARED(uint32_t, s);
  if (threadIdx.x == 0) {
    for (int i = 0; i < 8; ++i) s[i] = 0xA0A0A0A0u + i;
    ptx::cp_async16(s, src, true);
    ptx::cp_async16(s + 4, src, false);  // zero-fill
    ptx::cp_async_commit();
    for (int i = 0; i < 4; ++i) out[i] = s[i];
    ptx::cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) out[4 + i] = s[i];
    for (int i = 0; i < 4; ++i) out[8 + i] = s[4 + i];
  }
}

// Reads shared memory nobody wrote (shows the garbage fill) into out[0 .. n).
__global__ void garbage_kernel(uint32_t* out, int n) {
  SPECRT_DYNAMIC_SHARED(uint32_t, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[i];
}

// Writes one element past the dynamic shared memory (AddressSanitizer must report it).
__global__ void smem_overflow_kernel(int n) {
  SPECRT_DYNAMIC_SHARED(int, s);
  if (threadIdx.x == 0) s[n] = 1;
}

template <typename... P, typename... A>
int launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, unsigned cluster, A... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  return static_cast<int>(cudaLaunchKernelEx(&cfg, k, args...));
}

}  // namespace simt_selftest

using namespace simt_selftest;

extern "C" {
int simt_test_mma(const uint16_t* A, const uint16_t* B, const float* C, float* D, int bf16) {
  return launch(mma_kernel, dim3(1), dim3(32), 0, 1, A, B, C, D, bf16);
}
int simt_test_ldmatrix(const uint16_t* src, uint32_t* out, int trans, int pitch) {
  return launch(ldmatrix_kernel, dim3(1), dim3(32), 32 * pitch * 2, 1, src, out, trans, pitch);
}
int simt_test_ex2(const float* x, float* y, int n) {
  return launch(ex2_kernel, dim3((n + 127) / 128), dim3(128), 0, 1, x, y, n);
}
int simt_test_reverse(const int* in, int* out, int blocks, int threads, int barrier) {
  return launch(reverse_kernel, dim3(blocks), dim3(threads), threads * sizeof(int), 1, in, out,
                barrier);
}
int simt_test_warp(const int* in, int* out, unsigned mask, int src, int delta, int width) {
  return launch(warp_kernel, dim3(1), dim3(32), 0, 1, in, out, mask, src, delta, width);
}
int simt_test_shfl_double(const double* in, double* out) {
  return launch(shfl_double_kernel, dim3(1), dim3(32), 0, 1, in, out);
}
int simt_test_sync_reduce(const int* pred, int* out, int threads) {
  return launch(sync_reduce_kernel, dim3(1), dim3(threads), 0, 1, pred, out);
}
int simt_test_cluster(int* out, int blocks, int threads, int cluster) {
  return launch(cluster_kernel, dim3(blocks), dim3(threads), 0, cluster, out);
}
int simt_test_dsmem_after_exit(int* out) {
  return launch(dsmem_after_exit_kernel, dim3(2), dim3(32), 0, 2, out);
}
int simt_test_deadlock(int* out) { return launch(deadlock_kernel, dim3(1), dim3(64), 0, 1, out); }
int simt_test_exited_lane(int* out) {
  return launch(exited_lane_kernel, dim3(1), dim3(32), 0, 1, out);
}
int simt_test_cp_async(const uint32_t* src, uint32_t* out) {
  return launch(cp_async_kernel, dim3(1), dim3(32), 64, 1, src, out);
}
int simt_test_garbage(uint32_t* out, int n) {
  return launch(garbage_kernel, dim3(1), dim3(32), n * 4, 1, out, n);
}
int simt_test_smem_overflow(int n) {
  return launch(smem_overflow_kernel, dim3(1), dim3(32), n * 4, 1, n);
}
int simt_test_big_smem(int bytes, int set_attribute) {
  if (set_attribute) {
    const cudaError_t e = cudaFuncSetAttribute(garbage_kernel,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  static uint32_t sink[16];
  return launch(garbage_kernel, dim3(1), dim3(32), bytes, 1, sink, 16);
}
}  // extern "C"
