// Fibers for the SIMT emulation: a user-level context with its own stack, switched by a few
// instructions (x86-64: callee-saved registers, MXCSR and the x87 control word; elsewhere
// ucontext). AddressSanitizer is told about every switch so that it tracks the right stack.
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt {

struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  // ThreadSanitizer fiber of this context (SPECRT_SIMT_TSAN builds), or nullptr.
  void* tsan = nullptr;
  // AddressSanitizer bookkeeping of the stack this context runs on.
  void* fake_stack = nullptr;
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
};

// Prepares `ctx` to run entry(arg) on [stack, stack + size) at its first switch-in.
void context_init(Context& ctx, char* stack, size_t size, void (*entry)(void*), void* arg);
// Saves the running context in `from` and resumes `to`. `from_finished`: `from` never runs
// again.
void context_switch(Context& from, Context& to, bool from_finished = false);
// First thing a fiber's entry does: completes the switch that started it and records the
// stack it came from in `parent` (for the way back).
void context_started(Context& parent);

}  // namespace simt
