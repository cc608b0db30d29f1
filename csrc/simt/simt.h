// SIMT emulation of the CUDA machine on the CPU: the runtime interface the emulated kernels see.
//
// The kernel headers in csrc/kernels are compiled unchanged by the host compiler, with
// csrc/simt/include first on the include path (its cuda_runtime.h, cuda_fp16.h, cuda_bf16.h and
// cooperative_groups.h replace the toolkit's) and csrc/simt/prelude.h force-included. Every
// CUDA thread of a launch is a fiber (a user-level context with its own stack); the fibers of
// one thread-block cluster run on one OS thread under a scheduler that switches only where a
// thread must wait: block / cluster barriers, warp collectives (shuffles, votes, ldmatrix,
// mma), and, under the random schedule, a few extra yield points. Shared memory is allocated
// per block (static variables per declaration, dynamic memory per launch size), filled with
// garbage, and mapped between the blocks of a cluster for distributed shared memory. Misuse
// that would hang or corrupt a GPU (a deadlocked barrier, a collective whose mask names an
// exited lane, a misaligned ldmatrix) aborts the launch with a message naming the kernel.
//
// Everything here is plain C++17; nothing knows about torch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace simt {

struct u3 {
  unsigned int x, y, z;
};

struct Launch;
struct Block;

// One emulated CUDA thread.
struct Thread {
  u3 tid;                 // threadIdx
  int linear;             // linear index in the block
  int lane, warp;         // lane and warp within the block
  Block* block;
  // private result slot of the last collective (written by the lane that completed it)
  alignas(16) unsigned char coll_result[64];
  int sync_result;        // __syncthreads_or / _and / _count result
};

// The thread currently running on this OS thread (nullptr outside a kernel).
extern thread_local Thread* tls_current;
inline Thread* cur() { return tls_current; }

// ---- what kernel code calls (implemented in runtime.cpp) ----
const u3& block_idx();
const u3& block_dim();
const u3& grid_dim();

void syncthreads();
int syncthreads_reduce(int pred, int op);  // op: 0 or, 1 and, 2 count

enum class Shfl : int { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };
// Warp shuffle of `bytes` (4 or 8) bytes at `value` into `out`.
void shfl(unsigned mask, const void* value, int bytes, int src, int width, Shfl kind, void* out);
unsigned vote(unsigned mask, int pred, int op);  // op: 0 ballot, 1 any, 2 all
void syncwarp(unsigned mask);

// Cluster (thread-block cluster) services.
void cluster_sync();
unsigned cluster_block_rank();
unsigned cluster_num_blocks();
void* map_shared_rank(const void* addr, unsigned rank);

// Shared memory.
void* static_shared(const void* key, size_t bytes, size_t align);
void* dynamic_shared();
bool is_shared(const void* p, size_t bytes);

// PTX twins (ptx.cpp).
void cp_async(void* dst, const void* src, int cp_size, int src_size);
void cp_async_commit();
void cp_async_wait(int n);
void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans);
enum class MmaType : int { kF16 = 0, kBF16 = 1 };
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType t);
float ex2_approx_ftz(float x);

// A yield point for the random schedule (no-op otherwise).
void maybe_yield();

// Raises an emulation error in the current kernel (the launch fails with the message).
[[noreturn]] void fail(const char* fmt, ...);

// ---- launching ----
struct LaunchSpec {
  u3 grid, block, cluster;
  size_t dynamic_smem;
  const void* kernel;  // for the name in messages and the per-kernel smem attribute
};
using KernelBody = void (*)(void* closure);
// Runs a launch to completion. Returns 0 on success; on failure an error code (cudaError_t
// value) and the message is kept for simt_last_error().
int run_launch(const LaunchSpec& spec, KernelBody body, void* closure);
// The configuration of the most recent launch (tests check which path a launcher chose).
LaunchSpec last_launch();

// Emulator configuration (process-wide; set from the C API before a launch).
struct Config {
  int schedule = 0;         // 0 in order, 1 reversed, 2 seeded random
  uint64_t seed = 1;        // random schedule + garbage fill
  int num_sms = 132;        // what cudaDevAttrMultiProcessorCount reports
  int workers = 1;          // OS threads running clusters in parallel
};
Config& config();
const char* last_error();
void set_last_error(const char* msg);
void record_max_dynamic_smem(const void* kernel, int bytes);

}  // namespace simt
