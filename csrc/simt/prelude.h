// Force-included (-include) into every emulated translation unit: the CUDA language as the host
// compiler sees it. Keywords become attributes or nothing, the built-in variables read the
// running fiber, and device intrinsics become host functions with the device's semantics.
#pragma once
#define SPECRT_SIMT_EMULATION 1
// Device compilation for sm_90 is what is emulated.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <strings.h>

#include "simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static

// threadIdx / blockIdx / blockDim / gridDim: empty objects whose .x / .y / .z read the running
// fiber when converted to unsigned int (macros would clash with cudaLaunchConfig_t's members).
namespace simt {
enum class Builtin { kThreadIdx, kBlockIdx, kBlockDim, kGridDim };
template <Builtin B, int C>
struct BuiltinCoord {
  operator unsigned int() const {
    const u3& v = B == Builtin::kThreadIdx ? cur()->tid
                  : B == Builtin::kBlockIdx ? block_idx()
                  : B == Builtin::kBlockDim ? block_dim()
                                            : grid_dim();
    return C == 0 ? v.x : C == 1 ? v.y : v.z;
  }
};
template <Builtin B>
struct BuiltinVar {
  BuiltinCoord<B, 0> x;
  BuiltinCoord<B, 1> y;
  BuiltinCoord<B, 2> z;
};
}  // namespace simt
inline constexpr ::simt::BuiltinVar<::simt::Builtin::kThreadIdx> threadIdx{};
inline constexpr ::simt::BuiltinVar<::simt::Builtin::kBlockIdx> blockIdx{};
inline constexpr ::simt::BuiltinVar<::simt::Builtin::kBlockDim> blockDim{};
inline constexpr ::simt::BuiltinVar<::simt::Builtin::kGridDim> gridDim{};
inline constexpr int warpSize = 32;

// ---- vector types (the device's sizes and alignments) ----
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
using uint3 = ::simt::u3;
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ---- min / max overloads of the CUDA math headers ----
#define SIMT_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }      \
  inline T max(T a, T b) { return a < b ? b : a; }
SIMT_MINMAX(int)
SIMT_MINMAX(unsigned int)
SIMT_MINMAX(long)
SIMT_MINMAX(unsigned long)
SIMT_MINMAX(long long)
SIMT_MINMAX(unsigned long long)
SIMT_MINMAX(float)
SIMT_MINMAX(double)
#undef SIMT_MINMAX

// ---- synchronisation ----
inline void __syncthreads() { ::simt::syncthreads(); }
inline int __syncthreads_or(int p) { return ::simt::syncthreads_reduce(p, 0); }
inline int __syncthreads_and(int p) { return ::simt::syncthreads_reduce(p, 1); }
inline int __syncthreads_count(int p) { return ::simt::syncthreads_reduce(p, 2); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) { ::simt::syncwarp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
inline T simt_shfl_(unsigned mask, T v, int src, int width, ::simt::Shfl kind) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 4 or 8 bytes");
  static_assert(std::is_trivially_copyable<T>::value, "shuffled type must be trivially copyable");
  T out;
  ::simt::shfl(mask, &v, sizeof(T), src, width, kind, &out);
  return out;
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt_shfl_(mask, v, src, width, ::simt::Shfl::kIdx);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt_shfl_(mask, v, static_cast<int>(delta), width, ::simt::Shfl::kUp);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt_shfl_(mask, v, static_cast<int>(delta), width, ::simt::Shfl::kDown);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt_shfl_(mask, v, lane_mask, width, ::simt::Shfl::kXor);
}
inline unsigned __ballot_sync(unsigned mask, int p) { return ::simt::vote(mask, p, 0); }
inline int __any_sync(unsigned mask, int p) { return static_cast<int>(::simt::vote(mask, p, 1)); }
inline int __all_sync(unsigned mask, int p) { return static_cast<int>(::simt::vote(mask, p, 2)); }

// ---- loads with cache hints: plain loads here ----
template <typename T>
inline T __ldg(const T* p) { ::simt::maybe_yield(); return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }
template <typename T>
inline T __ldca(const T* p) { return *p; }
template <typename T>
inline T __ldcs(const T* p) { return *p; }
template <typename T>
inline T __ldlu(const T* p) { return *p; }
template <typename T>
inline void __stcs(T* p, T v) { *p = v; }
template <typename T>
inline void __stcg(T* p, T v) { *p = v; }

// ---- atomics (fibers of a cluster share one OS thread; clusters may run in parallel) ----
template <typename T>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float* p, float v) {
  uint32_t expected = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_RELAXED);
  while (true) {
    float old;
    std::memcpy(&old, &expected, 4);
    const float n = old + v;
    uint32_t desired;
    std::memcpy(&desired, &n, 4);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &expected, desired, false,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old;
  }
}
template <typename T>
inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <typename T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
// Stores v where better(v, old) holds, by compare-and-swap; returns the old value.
template <typename T, typename Better>
inline T simt_atomic_replace_if(T* p, T v, Better better) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (better(v, old) && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED,
                                                        __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  return simt_atomic_replace_if(p, v, [](T a, T b) { return a < b; });
}
template <typename T>
inline T atomicMax(T* p, T v) {
  return simt_atomic_replace_if(p, v, [](T a, T b) { return b < a; });
}
template <typename T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
template <typename T>
inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }

// ---- integer and bit intrinsics ----
inline int __ffs(int x) { return ::ffs(x); }
inline int __ffsll(long long x) { return ::ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; std::memcpy(&x, &d, 8); return x; }

// ---- fast math intrinsics (approximate on the device; within their documented error here) ----
inline float __expf(float x) { return ::simt::ex2_approx_ftz(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return ::simt::ex2_approx_ftz(x * 3.3219280948873623f); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __double2float_rn(double d) { return static_cast<float>(d); }

// ---- address spaces ----
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(reinterpret_cast<uintptr_t>(p));
}
inline unsigned __isShared(const void* p) { return ::simt::is_shared(p, 1) ? 1u : 0u; }
