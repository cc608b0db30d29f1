#include "fiber.h"

#include <cstdint>
#include <cstdlib>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif

#if defined(SPECRT_SIMT_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if defined(__x86_64__)
extern "C" void simt_context_swap(void** save_sp, void* new_sp);
extern "C" void simt_context_trampoline();
// Saves rbp, rbx, r12-r15, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, loads new_sp and restores the same set from there.
asm(R"(
  .text
  .globl simt_context_swap
  .type simt_context_swap, @function
simt_context_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_context_swap, .-simt_context_swap

  .globl simt_context_trampoline
  .type simt_context_trampoline, @function
simt_context_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_context_trampoline, .-simt_context_trampoline
)");
#endif

namespace simt {

void context_init(Context& ctx, char* stack, size_t size, void (*entry)(void*), void* arg) {
  ctx.stack_bottom = stack;
  ctx.stack_size = size;
  ctx.fake_stack = nullptr;
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = reinterpret_cast<uint64_t>(&simt_context_trampoline);  // return address
  *--sp = 0;                                                     // rbp
  *--sp = 0;                                                     // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);                       // r12
  *--sp = reinterpret_cast<uint64_t>(entry);                     // r13
  *--sp = 0;                                                     // r14
  *--sp = 0;                                                     // r15
  *--sp = 0x1F80ull | (0x037Full << 32);  // MXCSR default, x87 control word default
  ctx.sp = sp;
#else
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(entry), 1, arg);
#endif
}

void context_switch(Context& from, Context& to, bool from_finished) {
#ifdef SIMT_ASAN
  __sanitizer_start_switch_fiber(from_finished ? nullptr : &from.fake_stack, to.stack_bottom,
                                 to.stack_size);
#else
  (void)from_finished;
#endif
#if defined(SPECRT_SIMT_TSAN)
  // no_sync: a switch is not an ordering; the machine annotates the real ones (barriers).
  if (to.tsan) __tsan_switch_to_fiber(to.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  simt_context_swap(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

void context_started(Context& parent) {
#ifdef SIMT_ASAN
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  parent.stack_bottom = bottom;
  parent.stack_size = size;
#else
  (void)parent;
#endif
}

}  // namespace simt
