// Row-wise operations of a decoder layer on the CPU, fused so that a decode or verify step
// makes one call where the reference makes five to ten small tensor ops: RMSNorm, rotary
// embedding (rotate-half), SiLU-and-multiply. Torch-free.
//
// Numerics follow the reference model (transformers' Llama) op for op: RMSNorm's variance in
// fp32 and its weight applied in the model dtype, RoPE's products and sums each rounded to the
// model dtype, SiLU rounded before the multiply. Only the summation order of the variance and
// the exp inside SiLU differ from torch's (round-off level). Each row is computed on its own in
// a fixed order, so its result never depends on the other rows or on how rows are split among
// threads (a token verified in a draft tree gets the values it would get decoded alone).
//
// All pointers address row-major matrices with unit last stride and a free row stride. A
// function handles rows [r0, r1) so callers can split rows among threads.
#pragma once
#include <cstdint>

#include "cpu/attention.h"  // DType

namespace specrt::cpu {

// y[r] = weight * dtype(x[r] * rsqrt(mean(x[r]^2) + eps)), x / weight / y [*, h].
// y may alias x (same rows, same stride).
void rms_norm_rows(DType dtype, const void* x, int64_t x_stride, const void* weight, float eps,
                   void* y, int64_t y_stride, int64_t h, int64_t r0, int64_t r1);

// In place on the first `heads` heads of each row of qk (head h occupies columns
// [h * head_dim, (h + 1) * head_dim)): with x1 / x2 the head's first / second halves,
//   x1' = x1 * cos - x2 * sin,  x2' = x2 * cos + x1 * sin,
// cos / sin [*, head_dim / 2] holding row r's angles (row stride cs_stride). head_dim even.
void rope_rows(DType dtype, void* qk, int64_t qk_stride, int64_t heads, int64_t head_dim,
               const void* cos, const void* sin, int64_t cs_stride, int64_t r0, int64_t r1);

// y[r] = silu(gate_up[r, :inter]) * gate_up[r, inter:2 * inter], y [*, inter].
void silu_mul_rows(DType dtype, const void* gate_up, int64_t gu_stride, int64_t inter, void* y,
                   int64_t y_stride, int64_t r0, int64_t r1);

}  // namespace specrt::cpu
