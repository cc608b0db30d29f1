// Checks shared by the CPU glue of the row-wise ops (the skinny GEMM, linear_cpu.cpp; the fused
// layer ops, layer_cpu.cpp): fp32 / bf16 matrices on the CPU with a unit last stride and a
// free row stride.
#pragma once
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/attention.h"  // DType

namespace specrt::glue {

// The kernels' dtype of `t` (float32 or bfloat16; anything else is refused).
inline cpu::DType float_rows_dtype(const char* op, const char* name, const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return cpu::DType::kFloat32;
  if (t.scalar_type() == at::kBFloat16) return cpu::DType::kBFloat16;
  TORCH_CHECK(false, op, ": ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

// A 2-D CPU tensor with unit last stride; of `dtype` and shape [rows, cols] where given
// (-1: any).
inline void check_rows(const char* op, const char* name, const at::Tensor& t,
                       std::optional<at::ScalarType> dtype = std::nullopt, int64_t rows = -1,
                       int64_t cols = -1) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
  TORCH_CHECK(!dtype || t.scalar_type() == *dtype, op, ": ", name, " must be ", *dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK((rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols), op, ": ",
              name, " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " needs a unit last stride (strides ", t.strides(), ")");
}

// Elements between rows (the row length for a single row, whose stride is meaningless).
inline int64_t row_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.size(1);
}

}  // namespace specrt::glue
