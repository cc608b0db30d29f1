// CPU skinny GEMM for the decode / verify step: y = x @ w^T + bias with few rows of x (one
// decode token per sequence, or a small draft tree) against a large weight. Torch-free.
//
// Why: at 1-16 rows the step is bound by reading w from memory, and the library GEMMs we
// measured reach a third to a half of this machine's streaming bandwidth at those shapes
// (docs/cpu_linear.md). The kernel reads w once per call with AVX-512 FMAs (fp32) or AVX-512
// BF16 dot products (bf16, fp32 accumulation), 4 weight rows x up to 6 rows of x per register
// tile.
//
// Two weight layouts:
//   - plain: w [n, k], row stride free, unit last stride;
//   - packed (linear_pack): tiles of 4 weight rows interleaved by 64-byte vector steps, zero
//     padded to whole tiles and steps, so that a tile is one sequential stream (the hardware
//     prefetchers follow one stream at full speed, four interleaved rows at half of it). A
//     model packs each weight once and reuses it every step.
//
// Numerics: every output element is one dot product in a fixed order (16 fp32 lanes, k
// ascending, then a fixed reduction of the lanes), plus the bias, rounded once to the output
// dtype (then plus the residual, rounded again, when there is one). A row's result therefore depends only on that row of x: never on m, on the column
// range a thread computes, on the layout of w, or on the other rows (batch invariance: a token
// verified in a tree gets bit-identical logits to the same token decoded alone).
//
// Layout of x [m, k] and y [m, n]: unit last stride, row strides free; bias [n] or null.
#pragma once
#include <cstdint>
#include <string>

#include "cpu/attention.h"  // DType

namespace specrt::cpu {

struct LinearParams {
  DType dtype = DType::kFloat32;  // of x, w, bias and y alike: kFloat32 or kBFloat16
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  int64_t w_stride = 0;  // plain layout only
  bool packed = false;   // w is linear_pack's output for (n, k)
  const void* bias = nullptr;  // optional
  // Optional residual [m, n] added to the result: y = residual + (x @ w^T + bias), the sum
  // rounded separately as in `residual + linear(x)` (y may alias the residual).
  const void* residual = nullptr;
  int64_t r_stride = 0;
  void* y = nullptr;
  int64_t y_stride = 0;
  int64_t m = 0, n = 0, k = 0;
};

// The instruction set this CPU runs the kernel with for `dtype`: "avx512" (fp32; bf16 widened
// to fp32), "avx512_bf16" (bf16 dot products), or "" when the kernel cannot run here (no
// AVX-512, or a dtype it does not handle): callers then use another GEMM.
const char* linear_isa(DType dtype);

// Elements of the packed layout of an [n, k] weight on this CPU (0 when linear_isa is "").
int64_t linear_packed_size(DType dtype, int64_t n, int64_t k);

// Writes the packed layout of w [n, k] (row stride w_stride) to `packed`
// (linear_packed_size elements).
void linear_pack(DType dtype, const void* w, int64_t w_stride, int64_t n, int64_t k,
                 void* packed);

// "" when the parameters are usable, else what is wrong.
std::string validate_linear(const LinearParams& p);

// y[:, n0:n1] for 0 <= n0 <= n1 <= n with n0 a multiple of 4. Does not validate (callers
// validate once and split the columns among threads). Requires linear_isa(p.dtype) != "".
void linear_columns(const LinearParams& p, int64_t n0, int64_t n1);

}  // namespace specrt::cpu
