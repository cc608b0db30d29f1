// The SIMT emulation's machine: launches, clusters, blocks, fibers, barriers, warp collectives,
// shared memory, cp.async and the tensor-core instructions. See simt.h for the model.
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fiber.h"
#include "include/cuda_bf16.h"  // the b16 conversions (and cuda_runtime.h's error storage)
#include "simt.h"

#if defined(SPECRT_SIMT_TSAN)
// The machine's orderings, told to ThreadSanitizer: every release on an object happens before
// every later acquire on it. Fibers are TSan fibers switched without implicit ordering, so two
// threads' accesses to the same bytes are ordered only through these.
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#define SIMT_RELEASE(p) __tsan_release(const_cast<void*>(static_cast<const void*>(p)))
#define SIMT_ACQUIRE(p) __tsan_acquire(const_cast<void*>(static_cast<const void*>(p)))
#define SIMT_READ(p, n) __tsan_read_range(const_cast<void*>(static_cast<const void*>(p)), n)
#define SIMT_WRITE(p, n) __tsan_write_range(const_cast<void*>(static_cast<const void*>(p)), n)
#else
#define SIMT_RELEASE(p) ((void)(p))
#define SIMT_ACQUIRE(p) ((void)(p))
#define SIMT_READ(p, n) ((void)(p), (void)(n))
#define SIMT_WRITE(p, n) ((void)(p), (void)(n))
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SIMT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SIMT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace simt {

thread_local Thread* tls_current = nullptr;

namespace {

constexpr size_t kStackSize = 512 * 1024;
constexpr size_t kGuard = 4096;
constexpr int kMaxStaticSmem = 48 * 1024;
constexpr int kMaxSmem = 227 * 1024;
constexpr int kMaxSharedVars = 64;

std::mutex g_mutex;  // last error, smem attributes
std::string g_last_error;
std::map<const void*, int> g_max_dynamic_smem;
Config g_config;

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Byte copies of the machine's own bookkeeping (collective operands and results): never a
// libc call, so ThreadSanitizer's interceptors do not attribute them to a kernel thread.
void raw_copy(void* dst, const void* src, size_t n) {
  volatile unsigned char* d = static_cast<volatile unsigned char*>(dst);
  const volatile unsigned char* s = static_cast<const volatile unsigned char*>(src);
  for (size_t i = 0; i < n; ++i) d[i] = s[i];
}

std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (kernel && dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && d ? d : info.dli_sname;
    std::free(d);
    return name;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel@%p", kernel);
  return buf;
}

// ---- stacks: mmap'ed with a guard page, recycled per OS thread ----
struct StackPool {
  std::vector<char*> free_list;
  ~StackPool() {
    for (char* s : free_list) munmap(s - kGuard, kStackSize + kGuard);
  }
  char* get() {
    if (!free_list.empty()) {
      char* s = free_list.back();
      free_list.pop_back();
      // The frames left at the top (fiber entry) may still carry AddressSanitizer redzones.
      SIMT_UNPOISON(s + kStackSize - 64 * 1024, 64 * 1024);
      return s;
    }
    void* m = mmap(nullptr, kStackSize + kGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "simt: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, kGuard, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    return static_cast<char*>(m) + kGuard;
  }
  void put(char* s) { free_list.push_back(s); }
};
thread_local StackPool tls_stacks;

}  // namespace

// ---------------------------------------------------------------------------------------------
// machine state
// ---------------------------------------------------------------------------------------------

enum class State : uint8_t { kReady, kBarrier, kClusterBarrier, kWarp, kDone, kFaulted };

struct Copy {
  void* dst;
  const void* src;
  int cp_size, src_size;
};

struct Fiber {
  Thread t;
  Context ctx;
  char* stack = nullptr;
  State state = State::kReady;
  std::vector<Copy> open_group;              // cp.async issued since the last commit
  std::deque<std::vector<Copy>> groups;      // committed, not yet waited for
  const char* wait_what = "";
};

enum class CollKind : int { kShfl, kVote, kSyncwarp, kLdmatrix, kMma };

struct CollParams {
  CollKind kind;
  unsigned mask = 0;
  // call parameters (must agree across the lanes of one call: checked)
  int bytes = 0, arg = 0, width = 32, op = 0;
  Shfl shfl = Shfl::kIdx;
  bool trans = false;
  MmaType mma = MmaType::kF16;
};

struct Collective {
  CollParams p;
  unsigned arrived = 0;
  alignas(16) unsigned char in[32][48];
};

// NOTE: a fixed pool, allocated with the block by the scheduler: no heap traffic from inside
// kernel threads for the machine's own bookkeeping (ThreadSanitizer would attribute it).
constexpr int kMaxPending = 4;  // distinct collectives in flight in one warp

struct Warp {
  Collective slot[kMaxPending];
  uint64_t seq[kMaxPending] = {};  // 0: free; else creation order
  uint64_t next_seq = 1;
  unsigned exited = 0;   // lanes that have exited
  unsigned present = 0;  // lanes that exist (block size not a multiple of 32)
};

struct SharedAlloc {
  const void* key;  // nullptr: the dynamic allocation
  unsigned char* ptr;
  size_t bytes;
};

struct Cluster;

struct Block {
  u3 idx;
  unsigned rank;
  Cluster* cluster;
  int first_fiber, nthreads, live;
  int bar_arrived = 0, bar_or = 0, bar_and = 1, bar_count = 0;
  std::vector<Warp> warps;
  std::vector<SharedAlloc> smem;
  size_t static_bytes = 0;
  bool exited = false;
};

struct LaunchState;

struct Cluster {
  LaunchState* launch;
  std::vector<Block> blocks;
  std::vector<Fiber> fibers;
  int live = 0, cl_arrived = 0;
  Context sched;
  uint64_t rng = 0;
  std::vector<uint64_t> ready;  // bitset of ready fibers
  int cursor = 0;
  bool failed = false;
};

struct LaunchState {
  LaunchSpec spec;
  KernelBody body;
  void* closure;
  std::string name;
  unsigned nthreads;
  std::mutex mu;
  std::string error;
  std::atomic<bool> failed{false};
};

thread_local Cluster* tls_cluster = nullptr;

namespace {

Fiber* self_fiber() {
  Thread* t = tls_current;
  if (!t) {
    std::fprintf(stderr, "simt: a device function was called outside an emulated kernel\n");
    std::abort();
  }
  return reinterpret_cast<Fiber*>(reinterpret_cast<char*>(t) - offsetof(Fiber, t));
}

void set_ready(Cluster& c, int i, bool r) {
  if (r)
    c.ready[i >> 6] |= 1ull << (i & 63);
  else
    c.ready[i >> 6] &= ~(1ull << (i & 63));
}

int fiber_index(Cluster& c, Fiber* f) { return static_cast<int>(f - c.fibers.data()); }

void wake(Cluster& c, Fiber& f) {
  f.state = State::kReady;
  set_ready(c, fiber_index(c, &f), true);
}

// Switches from the running fiber back to the scheduler; returns when resumed.
void block_here(Fiber* f, State s, const char* what) {
  Cluster& c = *tls_cluster;
  f->state = s;
  f->wait_what = what;
  set_ready(c, fiber_index(c, f), false);
  context_switch(f->ctx, c.sched);
}

std::string where(const Fiber* f) {
  char buf[160];
  const Block& b = *f->t.block;
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z,
                f->t.tid.x, f->t.tid.y, f->t.tid.z);
  return buf;
}

void record_failure(LaunchState& L, const std::string& msg) {
  std::lock_guard<std::mutex> g(L.mu);
  if (!L.failed.exchange(true)) L.error = msg;
}

}  // namespace

[[noreturn]] void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  Fiber* f = self_fiber();
  Cluster& c = *tls_cluster;
  record_failure(*c.launch, "SIMT emulation: kernel " + c.launch->name + ", " + where(f) + ": " +
                                buf);
  c.failed = true;
  f->state = State::kFaulted;
  set_ready(c, fiber_index(c, f), false);
  context_switch(f->ctx, c.sched, true);
  std::abort();  // never resumed
}

const u3& block_idx() { return self_fiber()->t.block->idx; }
const u3& block_dim() { return tls_cluster->launch->spec.block; }
const u3& grid_dim() { return tls_cluster->launch->spec.grid; }

// ---------------------------------------------------------------------------------------------
// barriers
// ---------------------------------------------------------------------------------------------

namespace {
void release_block_barrier(Block& b) {
  Cluster& c = *b.cluster;
  const int result = b.bar_count;
  const int r_or = b.bar_or, r_and = b.bar_and;
  for (int i = 0; i < b.nthreads; ++i) {
    Fiber& f = c.fibers[b.first_fiber + i];
    if (f.state == State::kBarrier) {
      f.t.sync_result = f.t.sync_result == 0 ? r_or : f.t.sync_result == 1 ? r_and : result;
      wake(c, f);
    }
  }
  b.bar_arrived = 0;
  b.bar_or = 0;
  b.bar_and = 1;
  b.bar_count = 0;
}

void release_cluster_barrier(Cluster& c) {
  for (Fiber& f : c.fibers)
    if (f.state == State::kClusterBarrier) wake(c, f);
  c.cl_arrived = 0;
}
}  // namespace

int syncthreads_reduce(int pred, int op) {
  Fiber* f = self_fiber();
  Block& b = *f->t.block;
  b.bar_or |= pred != 0;
  b.bar_and &= pred != 0;
  b.bar_count += pred != 0;
  SIMT_RELEASE(&b);
  f->t.sync_result = op;  // which result this thread wants, replaced at release
  if (b.live < b.nthreads)
    fail("deadlock: __syncthreads reached after %d thread(s) of the block exited; a thread "
         "that never reaches a barrier its block waits at hangs the device",
         b.nthreads - b.live);
  if (++b.bar_arrived == b.live) {
    const int r = op == 0 ? b.bar_or : op == 1 ? b.bar_and : b.bar_count;
    release_block_barrier(b);
    SIMT_ACQUIRE(&b);
    return r;
  }
  block_here(f, State::kBarrier, "__syncthreads");
  SIMT_ACQUIRE(&b);
  return f->t.sync_result;
}

void syncthreads() { (void)syncthreads_reduce(0, 0); }

void cluster_sync() {
  Fiber* f = self_fiber();
  Cluster& c = *tls_cluster;
  if (c.live < static_cast<int>(c.fibers.size()))
    fail("deadlock: cluster.sync() reached after %d thread(s) of the cluster exited",
         static_cast<int>(c.fibers.size()) - c.live);
  SIMT_RELEASE(&c.cl_arrived);
  if (++c.cl_arrived == c.live) {
    release_cluster_barrier(c);
    SIMT_ACQUIRE(&c.cl_arrived);
    return;
  }
  block_here(f, State::kClusterBarrier, "cluster.sync()");
  SIMT_ACQUIRE(&c.cl_arrived);
}

unsigned cluster_block_rank() { return self_fiber()->t.block->rank; }
unsigned cluster_num_blocks() { return static_cast<unsigned>(tls_cluster->blocks.size()); }

// ---------------------------------------------------------------------------------------------
// warp collectives
// ---------------------------------------------------------------------------------------------

namespace {

const char* coll_name(CollKind k) {
  switch (k) {
    case CollKind::kShfl: return "__shfl_sync";
    case CollKind::kVote: return "__ballot_sync/__any_sync/__all_sync";
    case CollKind::kSyncwarp: return "__syncwarp";
    case CollKind::kLdmatrix: return "ldmatrix";
    case CollKind::kMma: return "mma.sync";
  }
  return "?";
}

uint32_t poison32(int lane) { return 0xDEAD0000u | static_cast<uint32_t>(lane); }

void complete(Cluster& c, Block& b, int warp, Collective& k);

// Deposits this lane's input and waits for the lanes of the mask; afterwards the result is in
// f->t.coll_result.
void arrive(Fiber* f, const CollParams& proto, const void* in, size_t in_bytes) {
  Cluster& c = *tls_cluster;
  Block& b = *f->t.block;
  Warp& w = b.warps[f->t.warp];
  const unsigned bit = 1u << f->t.lane;
  if (!(proto.mask & bit))
    fail("%s with mask 0x%08x does not name the calling lane %d", coll_name(proto.kind),
         proto.mask, f->t.lane);
  if (proto.mask & ~w.present)
    fail("%s mask 0x%08x names lanes that do not exist (warp has 0x%08x)", coll_name(proto.kind),
         proto.mask, w.present);
  if (proto.mask & w.exited)
    fail("%s mask 0x%08x names lanes that have exited (0x%08x)", coll_name(proto.kind),
         proto.mask, w.exited & proto.mask);
  Collective* k = nullptr;
  int ki = -1;
  for (int i = 0; i < kMaxPending; ++i) {
    const Collective& p = w.slot[i];
    if (w.seq[i] && p.p.kind == proto.kind && p.p.mask == proto.mask && !(p.arrived & bit) &&
        (ki < 0 || w.seq[i] < w.seq[ki]))
      ki = i;
  }
  if (ki >= 0) k = &w.slot[ki];
  if (!k) {
    for (int i = 0; i < kMaxPending && ki < 0; ++i)
      if (!w.seq[i]) ki = i;
    if (ki < 0) fail("more than %d distinct warp collectives in flight in one warp", kMaxPending);
    w.seq[ki] = w.next_seq++;
    k = &w.slot[ki];
    k->p = proto;
    k->arrived = 0;
  } else {
    const CollParams& q = k->p;
    if (q.bytes != proto.bytes || q.width != proto.width || q.shfl != proto.shfl ||
        q.trans != proto.trans || q.mma != proto.mma || q.op != proto.op ||
        (q.kind == CollKind::kShfl && q.shfl != Shfl::kIdx && q.arg != proto.arg))
      fail("%s: lanes of one call disagree on its operands", coll_name(proto.kind));
  }
  if (in_bytes) raw_copy(k->in[f->t.lane], in, in_bytes);
  if (proto.kind == CollKind::kShfl && proto.shfl == Shfl::kIdx)
    raw_copy(k->in[f->t.lane] + 8, &proto.arg, sizeof(int));  // per-lane source lane
  k->arrived |= bit;
  if (k->arrived == k->p.mask) {
    complete(c, b, f->t.warp, *k);
    w.seq[ki] = 0;
    return;
  }
  block_here(f, State::kWarp, coll_name(proto.kind));
}

Fiber& lane_fiber(Cluster& c, Block& b, int warp, int lane) {
  return c.fibers[b.first_fiber + warp * 32 + lane];
}

float b16_to_float(uint16_t h, MmaType t) {
  return t == MmaType::kBF16 ? bf16_to_float(h) : half_to_float(h);
}

void complete(Cluster& c, Block& b, int warp, Collective& k) {
  Fiber* self = self_fiber();
  switch (k.p.kind) {
    case CollKind::kShfl: {
      for (int l = 0; l < 32; ++l) {
        if (!(k.p.mask & (1u << l))) continue;
        const int w = k.p.width;
        if (w <= 0 || w > 32 || (w & (w - 1))) fail("shuffle width %d is not a power of two <= 32", w);
        const int seg = l & ~(w - 1);
        int src = l;
        switch (k.p.shfl) {
          case Shfl::kIdx: {
            int s;
            std::memcpy(&s, k.in[l] + 8, sizeof s);
            src = seg + (s & (w - 1));
            break;
          }
          case Shfl::kUp: src = (l - seg) >= k.p.arg ? l - k.p.arg : l; break;
          case Shfl::kDown: src = (l - seg) + k.p.arg < w ? l + k.p.arg : l; break;
          case Shfl::kXor: src = l ^ k.p.arg; if (src >= seg + w) src = l; break;
        }
        Fiber& dst = lane_fiber(c, b, warp, l);
        if (src < 0 || src > 31 || !(k.p.mask & (1u << src))) {
          const uint32_t p = poison32(l);  // reading a lane outside the mask is undefined
          raw_copy(dst.t.coll_result, &p, 4);
          raw_copy(dst.t.coll_result + 4, &p, 4);
        } else {
          raw_copy(dst.t.coll_result, k.in[src], k.p.bytes);
        }
      }
      break;
    }
    case CollKind::kVote: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if ((k.p.mask & (1u << l)) && k.in[l][0]) ballot |= 1u << l;
      const unsigned r = k.p.op == 0 ? ballot : k.p.op == 1 ? (ballot != 0) : (ballot == k.p.mask);
      for (int l = 0; l < 32; ++l)
        if (k.p.mask & (1u << l)) raw_copy(lane_fiber(c, b, warp, l).t.coll_result, &r, 4);
      break;
    }
    case CollKind::kSyncwarp: break;
    case CollKind::kLdmatrix: {
      // Lane 8 * j + i gives the address of row i of matrix j. Without .trans lane l receives,
      // for every matrix j, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1; with .trans,
      // column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1 (PTX ISA, "ldmatrix").
      const unsigned char* row[32];
      for (int l = 0; l < 32; ++l) {
        std::memcpy(&row[l], k.in[l], sizeof(void*));
        if (reinterpret_cast<uintptr_t>(row[l]) % 16 != 0)
          fail("ldmatrix: lane %d row address %p is not 16-byte aligned", l,
               static_cast<const void*>(row[l]));
        if (!is_shared(row[l], 16))
          fail("ldmatrix: lane %d row address %p is not in this block's shared memory", l,
               static_cast<const void*>(row[l]));
      }
      for (int l = 0; l < 32; ++l) {
        uint32_t out[4];
        for (int j = 0; j < 4; ++j) {
          uint16_t lo, hi;
          if (!k.p.trans) {
            const unsigned char* r = row[8 * j + l / 4];
            std::memcpy(&lo, r + 4 * (l % 4), 2);
            std::memcpy(&hi, r + 4 * (l % 4) + 2, 2);
          } else {
            std::memcpy(&lo, row[8 * j + 2 * (l % 4)] + 2 * (l / 4), 2);
            std::memcpy(&hi, row[8 * j + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
          }
          out[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
        raw_copy(lane_fiber(c, b, warp, l).t.coll_result, out, sizeof out);
      }
      break;
    }
    case CollKind::kMma: {
      // Fragments (PTX ISA, "mma.m16n8k16", f16 / bf16 inputs, f32 accumulators), with
      // g = lane / 4, t = lane % 4:
      //   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
      //                   a3 = A[g+8][2t+8..]  (low half = lower column)
      //   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
      //   C, D (16x8):    c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        uint32_t a[4], bb[2];
        float cc[4];
        std::memcpy(a, k.in[l], 16);
        std::memcpy(bb, k.in[l] + 16, 8);
        std::memcpy(cc, k.in[l] + 24, 16);
        const int g = l / 4, t = l % 4;
        auto lo = [&](uint32_t v) { return b16_to_float(static_cast<uint16_t>(v), k.p.mma); };
        auto hi = [&](uint32_t v) { return b16_to_float(static_cast<uint16_t>(v >> 16), k.p.mma); };
        A[g][2 * t] = lo(a[0]);
        A[g][2 * t + 1] = hi(a[0]);
        A[g + 8][2 * t] = lo(a[1]);
        A[g + 8][2 * t + 1] = hi(a[1]);
        A[g][2 * t + 8] = lo(a[2]);
        A[g][2 * t + 9] = hi(a[2]);
        A[g + 8][2 * t + 8] = lo(a[3]);
        A[g + 8][2 * t + 9] = hi(a[3]);
        B[2 * t][g] = lo(bb[0]);
        B[2 * t + 1][g] = hi(bb[0]);
        B[2 * t + 8][g] = lo(bb[1]);
        B[2 * t + 9][g] = hi(bb[1]);
        C[g][2 * t] = cc[0];
        C[g][2 * t + 1] = cc[1];
        C[g + 8][2 * t] = cc[2];
        C[g + 8][2 * t + 1] = cc[3];
      }
      // Products of 16-bit floats are exact in fp64; the sum is rounded to fp32 once.
      float D[16][8];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
          double s = 0.0;
          for (int kk = 0; kk < 16; ++kk) s += static_cast<double>(A[i][kk]) * B[kk][j];
          D[i][j] = static_cast<float>(s + static_cast<double>(C[i][j]));
        }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
        raw_copy(lane_fiber(c, b, warp, l).t.coll_result, d, sizeof d);
      }
      break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!(k.p.mask & (1u << l))) continue;
    Fiber& f = lane_fiber(c, b, warp, l);
    if (&f != self) wake(c, f);
  }
}

}  // namespace

void shfl(unsigned mask, const void* value, int bytes, int src, int width, Shfl kind, void* out) {
  Fiber* f = self_fiber();
  CollParams proto{CollKind::kShfl};
  proto.mask = mask;
  proto.bytes = bytes;
  proto.arg = src;
  proto.width = width;
  proto.shfl = kind;
  arrive(f, proto, value, static_cast<size_t>(bytes));
  raw_copy(out, f->t.coll_result, static_cast<size_t>(bytes));
}

unsigned vote(unsigned mask, int pred, int op) {
  Fiber* f = self_fiber();
  CollParams proto{CollKind::kVote};
  proto.mask = mask;
  proto.op = op;
  const unsigned char p = pred != 0;
  arrive(f, proto, &p, 1);
  unsigned r;
  raw_copy(&r, f->t.coll_result, 4);
  return r;
}

void syncwarp(unsigned mask) {
  Fiber* f = self_fiber();
  CollParams proto{CollKind::kSyncwarp};
  proto.mask = mask;
  Warp& w = f->t.block->warps[f->t.warp];
  SIMT_RELEASE(&w);  // __syncwarp orders memory among the lanes it names
  arrive(f, proto, nullptr, 0);
  SIMT_ACQUIRE(&w);
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  Fiber* f = self_fiber();
  CollParams proto{CollKind::kLdmatrix};
  proto.mask = 0xFFFFFFFFu;  // .sync.aligned: every lane of the warp
  proto.trans = trans;
  SIMT_READ(row_addr, 16);  // this lane's row: the read a race check must see
  arrive(f, proto, &row_addr, sizeof(void*));
  raw_copy(r, f->t.coll_result, sizeof r);
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType t) {
  Fiber* f = self_fiber();
  CollParams proto{CollKind::kMma};
  proto.mask = 0xFFFFFFFFu;
  proto.mma = t;
  unsigned char in[40];
  raw_copy(in, a, 16);
  raw_copy(in + 16, &b0, 4);
  raw_copy(in + 20, &b1, 4);
  raw_copy(in + 24, c, 16);
  arrive(f, proto, in, sizeof in);
  raw_copy(c, f->t.coll_result, 16);
}

float ex2_approx_ftz(float x) {
  // ex2.approx.ftz.f32: subnormal inputs and results flush to sign-preserving zero.
  if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.f, x);
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

// ---------------------------------------------------------------------------------------------
// shared memory
// ---------------------------------------------------------------------------------------------

namespace {
void fill_garbage(Cluster& c, unsigned char* p, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint64_t r = splitmix(c.rng);
    std::memcpy(p + i, &r, 8);
  }
  for (; i < n; ++i) p[i] = static_cast<unsigned char>(splitmix(c.rng));
}

SharedAlloc* find_alloc(Block& b, const void* p, size_t bytes) {
  const unsigned char* q = static_cast<const unsigned char*>(p);
  for (SharedAlloc& a : b.smem)
    if (q >= a.ptr && q + bytes <= a.ptr + a.bytes && (bytes > 0 || q < a.ptr + a.bytes))
      return &a;
  return nullptr;
}

SharedAlloc& alloc_static(Block& b, const void* key, size_t bytes, size_t align) {
  for (SharedAlloc& a : b.smem)
    if (a.key == key) return a;
  if (b.smem.size() > static_cast<size_t>(kMaxSharedVars))
    fail("more than %d static shared variables", kMaxSharedVars);
  b.static_bytes += (bytes + align - 1) / align * align;
  const size_t dyn = b.smem.empty() ? 0 : b.smem[0].bytes;
  if (b.static_bytes > static_cast<size_t>(kMaxStaticSmem) ||
      b.static_bytes + dyn > static_cast<size_t>(kMaxSmem))
    fail("static shared memory %zu B (+ %zu B dynamic) exceeds the device limit", b.static_bytes,
         dyn);
  // One exact-size heap block per variable: AddressSanitizer sees any access past its end.
  void* mem = nullptr;
  if (posix_memalign(&mem, std::max<size_t>(align, 16), bytes ? bytes : 1) != 0) std::abort();
  unsigned char* p = static_cast<unsigned char*>(mem);
  fill_garbage(*b.cluster, p, bytes);
  SIMT_RELEASE(p);  // the allocation happens before any thread's use (static_shared acquires)
  b.smem.push_back(SharedAlloc{key, p, bytes});
  return b.smem.back();
}
}  // namespace

void* static_shared(const void* key, size_t bytes, size_t align) {
  Fiber* f = self_fiber();
  unsigned char* p = alloc_static(*f->t.block, key, bytes, align).ptr;
  SIMT_ACQUIRE(p);
  return p;
}

void* dynamic_shared() { return self_fiber()->t.block->smem[0].ptr; }

bool is_shared(const void* p, size_t bytes) {
  if (!tls_current) return false;
  return find_alloc(*self_fiber()->t.block, p, bytes) != nullptr;
}

void* map_shared_rank(const void* addr, unsigned rank) {
  Fiber* f = self_fiber();
  Cluster& c = *tls_cluster;
  Block& b = *f->t.block;
  if (rank >= c.blocks.size())
    fail("map_shared_rank: rank %u outside the cluster of %zu blocks", rank, c.blocks.size());
  SharedAlloc* a = find_alloc(b, addr, 0);
  if (!a) fail("map_shared_rank: %p is not in this block's shared memory", addr);
  Block& o = c.blocks[rank];
  if (o.exited)
    fail("map_shared_rank: block rank %u of the cluster has exited; its shared memory is gone",
         rank);
  const size_t off = static_cast<const unsigned char*>(addr) - a->ptr;
  if (a->key == nullptr) return o.smem[0].ptr + off;
  unsigned char* p = alloc_static(o, a->key, a->bytes, 16).ptr;
  SIMT_ACQUIRE(p);
  return p + off;
}

// ---------------------------------------------------------------------------------------------
// cp.async
// ---------------------------------------------------------------------------------------------

void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  Fiber* f = self_fiber();
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async size %d", cp_size);
  if (src_size < 0 || src_size > cp_size) fail("cp.async src-size %d > cp-size %d", src_size, cp_size);
  if (reinterpret_cast<uintptr_t>(dst) % cp_size)
    fail("cp.async destination %p not aligned to %d bytes", dst, cp_size);
  if (src_size > 0 && reinterpret_cast<uintptr_t>(src) % cp_size)
    fail("cp.async source %p not aligned to %d bytes", src, cp_size);
  if (!is_shared(dst, static_cast<size_t>(cp_size)))
    fail("cp.async destination %p is not in this block's shared memory", dst);
  f->open_group.push_back(Copy{dst, src, cp_size, src_size});
  maybe_yield();
}

void cp_async_commit() {
  Fiber* f = self_fiber();
  f->groups.push_back(std::move(f->open_group));
  f->open_group.clear();
}

void cp_async_wait(int n) {
  Fiber* f = self_fiber();
  // The copies land only now: a read of the destination before this wait sees stale data.
  while (static_cast<int>(f->groups.size()) > n) {
    for (const Copy& c : f->groups.front()) {
      if (c.src_size > 0) {
        SIMT_READ(c.src, static_cast<unsigned long>(c.src_size));
        raw_copy(c.dst, c.src, static_cast<size_t>(c.src_size));
      }
      SIMT_WRITE(c.dst, static_cast<unsigned long>(c.cp_size));  // lands now, by this thread
      unsigned char* z = static_cast<unsigned char*>(c.dst);
      for (int i = c.src_size; i < c.cp_size; ++i) z[i] = 0;
    }
    f->groups.pop_front();
  }
  maybe_yield();
}

void maybe_yield() {
  if (g_config.schedule != 2 || !tls_current) return;
  Cluster& c = *tls_cluster;
  if ((splitmix(c.rng) & 3u) != 0) return;
  Fiber* f = self_fiber();
  context_switch(f->ctx, c.sched);  // stays ready: the scheduler may pick another first
}

// ---------------------------------------------------------------------------------------------
// scheduling
// ---------------------------------------------------------------------------------------------

namespace {

void thread_exit(Cluster& c, Fiber& f) {
  Block& b = *f.t.block;
  f.state = State::kDone;
  f.open_group.clear();
  f.groups.clear();  // copies never waited for never land
  Warp& w = b.warps[f.t.warp];
  w.exited |= 1u << f.t.lane;
  for (int i = 0; i < kMaxPending; ++i)
    if (w.seq[i] && (w.slot[i].p.mask & (1u << f.t.lane))) {
      record_failure(*c.launch, "SIMT emulation: kernel " + c.launch->name + ", " + where(&f) +
                                    ": exited while named in the mask of a pending " +
                                    coll_name(w.slot[i].p.kind));
      c.failed = true;
    }
  --b.live;
  --c.live;
  // CUDA leaves a barrier that some threads never reach undefined (it hangs in practice):
  // exiting while peers wait is reported as the deadlock it is.
  if (b.bar_arrived > 0 || c.cl_arrived > 0) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  ": deadlock: exited while %d thread(s) of its block wait at __syncthreads "
                  "and %d of its cluster at cluster.sync()",
                  b.bar_arrived, c.cl_arrived);
    record_failure(*c.launch, "SIMT emulation: kernel " + c.launch->name + ", " + where(&f) + buf);
    c.failed = true;
  }
  SIMT_RELEASE(&b.exited);
  if (b.live == 0) {
    // The block is gone: its shared memory too (a later DSMEM access is a use after free).
    SIMT_ACQUIRE(&b.exited);
    b.exited = true;
    for (SharedAlloc& a : b.smem) std::free(a.ptr);
    b.smem.clear();
  }
}

void fiber_main(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
  Cluster& c = *tls_cluster;
  context_started(c.sched);
  SIMT_ACQUIRE(&c.launch);  // the launch's arguments and earlier launches' results
  c.launch->body(c.launch->closure);
  SIMT_RELEASE(&c.live);    // this thread's writes, for whoever reads them after the launch
  thread_exit(c, *f);
  set_ready(c, fiber_index(c, f), false);
  context_switch(f->ctx, c.sched, true);
  std::abort();
}

int pick(Cluster& c) {
  const int n = static_cast<int>(c.fibers.size());
  const int words = static_cast<int>(c.ready.size());
  const int mode = g_config.schedule;
  int start = mode == 2 ? static_cast<int>(splitmix(c.rng) % static_cast<uint64_t>(n)) : c.cursor;
  if (mode == 1) {
    // reversed: the highest ready index at or below the cursor, wrapping
    for (int k = 0; k < n; ++k) {
      const int i = ((start - k) % n + n) % n;
      if (c.ready[i >> 6] >> (i & 63) & 1ull) return i;
    }
    return -1;
  }
  for (int wi = 0; wi <= words; ++wi) {
    const int word = ((start >> 6) + wi) % words;
    uint64_t bits = c.ready[word];
    if (wi == 0) bits &= ~0ull << (start & 63);
    if (bits) return word * 64 + __builtin_ctzll(bits);
  }
  return -1;
}

std::string deadlock_report(Cluster& c) {
  std::string s = "SIMT emulation: deadlock in kernel " + c.launch->name + ":";
  for (Block& b : c.blocks) {
    std::map<std::string, std::vector<int>> by;
    for (int i = 0; i < b.nthreads; ++i) {
      const Fiber& f = c.fibers[b.first_fiber + i];
      if (f.state == State::kDone) by["exited"].push_back(i);
      else if (f.state != State::kReady) by[std::string("waiting at ") + f.wait_what].push_back(i);
    }
    char buf[96];
    std::snprintf(buf, sizeof buf, " block (%u,%u,%u):", b.idx.x, b.idx.y, b.idx.z);
    s += buf;
    for (auto& [what, ids] : by) {
      std::snprintf(buf, sizeof buf, " %zu thread(s) %s (e.g. thread %d);", ids.size(),
                    what.c_str(), ids.front());
      s += buf;
    }
  }
  s += " a thread that never reaches a barrier or collective its peers wait at";
  return s;
}

void run_cluster(LaunchState& L, u3 first_block, uint64_t seed) {
  const LaunchSpec& sp = L.spec;
  Cluster c;
  c.launch = &L;
  c.rng = seed;
  const unsigned nb = sp.cluster.x * sp.cluster.y * sp.cluster.z;
  const unsigned nt = L.nthreads;
  c.blocks.resize(nb);
  c.fibers.resize(static_cast<size_t>(nb) * nt);
  c.ready.assign((c.fibers.size() + 63) / 64, 0);
  tls_cluster = &c;
  for (unsigned r = 0; r < nb; ++r) {
    Block& b = c.blocks[r];
    b.rank = r;
    b.cluster = &c;
    b.idx = u3{first_block.x + r % sp.cluster.x, first_block.y + (r / sp.cluster.x) % sp.cluster.y,
               first_block.z + r / (sp.cluster.x * sp.cluster.y)};
    b.first_fiber = static_cast<int>(r * nt);
    b.nthreads = static_cast<int>(nt);
    b.live = static_cast<int>(nt);
    b.warps.resize((nt + 31) / 32);
    b.smem.reserve(kMaxSharedVars + 1);  // no reallocation from inside kernel threads
    for (unsigned i = 0; i < nt; ++i) b.warps[i / 32].present |= 1u << (i % 32);
    // dynamic shared memory first (smem[0]), exact size, garbage-filled
    void* mem = nullptr;
    if (posix_memalign(&mem, 16, sp.dynamic_smem ? sp.dynamic_smem : 1) != 0) std::abort();
    unsigned char* dyn = static_cast<unsigned char*>(mem);
    fill_garbage(c, dyn, sp.dynamic_smem);
    b.smem.push_back(SharedAlloc{nullptr, dyn, sp.dynamic_smem});
    for (unsigned i = 0; i < nt; ++i) {
      Fiber& f = c.fibers[b.first_fiber + i];
      f.t.tid = u3{i % sp.block.x, (i / sp.block.x) % sp.block.y, i / (sp.block.x * sp.block.y)};
      f.t.linear = static_cast<int>(i);
      f.t.lane = static_cast<int>(i % 32);
      f.t.warp = static_cast<int>(i / 32);
      f.t.block = &b;
      f.stack = tls_stacks.get();
      context_init(f.ctx, f.stack, kStackSize, &fiber_main, &f);
      set_ready(c, b.first_fiber + static_cast<int>(i), true);
    }
  }
  c.live = static_cast<int>(c.fibers.size());
  c.cursor = g_config.schedule == 1 ? static_cast<int>(c.fibers.size()) - 1 : 0;
#if defined(SPECRT_SIMT_TSAN)
  c.sched.tsan = __tsan_get_current_fiber();
  for (Fiber& f : c.fibers) f.ctx.tsan = __tsan_create_fiber(0);
#endif
  SIMT_RELEASE(&c.launch);

  while (!c.failed && !L.failed.load(std::memory_order_relaxed)) {
    const int i = pick(c);
    if (i < 0) {
      if (c.live > 0) {
        record_failure(L, deadlock_report(c));
        c.failed = true;
      }
      break;
    }
    c.cursor = i;
    Fiber& f = c.fibers[i];
    tls_current = &f.t;
    context_switch(c.sched, f.ctx);
    tls_current = nullptr;
  }
  SIMT_ACQUIRE(&c.live);
#if defined(SPECRT_SIMT_TSAN)
  for (Fiber& f : c.fibers) __tsan_destroy_fiber(f.ctx.tsan);
#endif
  for (Fiber& f : c.fibers) {
    if (f.state != State::kDone) SIMT_UNPOISON(f.stack, kStackSize);  // abandoned mid-kernel
    tls_stacks.put(f.stack);
  }
  for (Block& b : c.blocks)
    for (SharedAlloc& a : b.smem) std::free(a.ptr);
  tls_cluster = nullptr;
}

}  // namespace

namespace {
std::mutex g_last_launch_mu;
LaunchSpec g_last_launch{};
}  // namespace

LaunchSpec last_launch() {
  std::lock_guard<std::mutex> g(g_last_launch_mu);
  return g_last_launch;
}

int run_launch(const LaunchSpec& spec, KernelBody body, void* closure) {
  {
    std::lock_guard<std::mutex> g(g_last_launch_mu);
    g_last_launch = spec;
  }
  LaunchState L;
  L.spec = spec;
  L.body = body;
  L.closure = closure;
  L.name = kernel_name(spec.kernel);
  const uint64_t nthreads = uint64_t{spec.block.x} * spec.block.y * spec.block.z;
  auto bad = [&](const char* why) {
    set_last_error(("SIMT emulation: launch of " + L.name + " rejected: " + why).c_str());
    return 1;  // cudaErrorInvalidValue
  };
  if (nthreads == 0 || nthreads > 1024) return bad("block size must be 1..1024 threads");
  if (spec.grid.x == 0 || spec.grid.y == 0 || spec.grid.z == 0) return bad("empty grid");
  if (spec.grid.y > 65535 || spec.grid.z > 65535) return bad("grid.y / grid.z above 65535");
  const unsigned cl = spec.cluster.x * spec.cluster.y * spec.cluster.z;
  if (cl == 0 || cl > 8) return bad("cluster size must be 1..8 (portable limit)");
  if (spec.grid.x % spec.cluster.x || spec.grid.y % spec.cluster.y ||
      spec.grid.z % spec.cluster.z)
    return bad("grid is not a multiple of the cluster shape");
  int max_dyn = 48 * 1024;
  {
    std::lock_guard<std::mutex> g(g_mutex);
    auto it = g_max_dynamic_smem.find(spec.kernel);
    if (it != g_max_dynamic_smem.end()) max_dyn = it->second;
  }
  if (spec.dynamic_smem > static_cast<size_t>(max_dyn)) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "%zu B of dynamic shared memory requested, %d B allowed "
                  "(cudaFuncAttributeMaxDynamicSharedMemorySize)",
                  spec.dynamic_smem, max_dyn);
    return bad(buf);
  }
  L.nthreads = static_cast<unsigned>(nthreads);

  // clusters, in the schedule's order
  const unsigned ncx = spec.grid.x / spec.cluster.x, ncy = spec.grid.y / spec.cluster.y,
                 ncz = spec.grid.z / spec.cluster.z;
  const uint64_t nclusters = uint64_t{ncx} * ncy * ncz;
  std::vector<uint64_t> order(nclusters);
  for (uint64_t i = 0; i < nclusters; ++i) order[i] = i;
  uint64_t rng = g_config.seed * 0x9E3779B97F4A7C15ull + 12345;
  if (g_config.schedule == 1) std::reverse(order.begin(), order.end());
  if (g_config.schedule == 2)
    for (uint64_t i = nclusters; i > 1; --i) std::swap(order[i - 1], order[splitmix(rng) % i]);
  std::atomic<uint64_t> next{0};
  auto worker = [&] {
    while (!L.failed.load()) {
      const uint64_t k = next.fetch_add(1);
      if (k >= nclusters) break;
      const uint64_t ci = order[k];
      const u3 first{static_cast<unsigned>(ci % ncx) * spec.cluster.x,
                     static_cast<unsigned>((ci / ncx) % ncy) * spec.cluster.y,
                     static_cast<unsigned>(ci / (uint64_t{ncx} * ncy)) * spec.cluster.z};
      uint64_t s = g_config.seed ^ (ci * 0xD1B54A32D192ED03ull);
      run_cluster(L, first, splitmix(s));
    }
  };
  const int workers = std::max(1, std::min<int>(g_config.workers, static_cast<int>(nclusters)));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  if (L.failed) {
    set_last_error(L.error.c_str());
    return 719;  // cudaErrorLaunchFailure
  }
  return 0;
}

Config& config() { return g_config; }

const char* last_error() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> g(g_mutex);
  copy = g_last_error;
  return copy.c_str();
}

void set_last_error(const char* msg) {
  std::lock_guard<std::mutex> g(g_mutex);
  g_last_error = msg;
}

void record_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> g(g_mutex);
  g_max_dynamic_smem[kernel] = bytes;
}

}  // namespace simt

// cudaError_t storage for cudaGetLastError (declared in include/cuda_runtime.h).
namespace simt {
cudaError_t& last_runtime_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}
}  // namespace simt
