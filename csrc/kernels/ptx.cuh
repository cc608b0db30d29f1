// The inline-PTX instructions the kernels use, in one place. Under the SIMT emulation
// (csrc/simt, SPECRT_SIMT_EMULATION) each one is an emulated twin implemented from the PTX ISA's
// documented semantics; on the device it is the instruction itself.
//   cp.async.cg.shared.global 16 (+ commit_group / wait_group)   16-byte async global->shared
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16              four 8x8 b16 tiles per warp
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.f32          tensor-core MMA, fp32 accumulate
//   ex2.approx.ftz.f32                                            2^x
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace specrt::kernels::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; with !valid nothing is read and the 16 destination bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::cp_async(dst, src, 16, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
#endif
}

// D = A B + C with A 16x16 (row), B 16x8 (col), fp32 C / D, in the documented fragment layout.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::mma_m16n8k16(c, a, b0, b1, ::simt::MmaType::kF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
#ifdef SPECRT_SIMT_EMULATION
  ::simt::mma_m16n8k16(c, a, b0, b1, ::simt::MmaType::kBF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ float ex2_approx(float x) {
#ifdef SPECRT_SIMT_EMULATION
  return ::simt::ex2_approx_ftz(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#endif
}

}  // namespace specrt::kernels::ptx

// Shared-memory declarations that the SIMT emulation can give per-block storage:
//   SPECRT_SHARED(Type, name);          a statically sized __shared__ variable
//   SPECRT_DYNAMIC_SHARED(Type, name);  the launch's dynamic shared memory as Type name[]
#ifdef SPECRT_SIMT_EMULATION
#define SPECRT_SHARED(Type, name)                                                  \
  using specrt_shared_##name##_t = Type;                                           \
  static const char specrt_shared_key_##name = 0;                                  \
  specrt_shared_##name##_t& name = *static_cast<specrt_shared_##name##_t*>(        \
      ::simt::static_shared(&specrt_shared_key_##name, sizeof(specrt_shared_##name##_t), \
                            alignof(specrt_shared_##name##_t)))
#define SPECRT_DYNAMIC_SHARED(Type, name) \
  Type* const name = static_cast<Type*>(::simt::dynamic_shared())
#else
#define SPECRT_SHARED(Type, name)                \
  using specrt_shared_##name##_t = Type;         \
  __shared__ specrt_shared_##name##_t name
#define SPECRT_DYNAMIC_SHARED(Type, name) extern __shared__ __align__(16) Type name[]
#endif
