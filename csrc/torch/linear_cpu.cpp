// CPU glue for the skinny GEMM (csrc/cpu/linear.h): check, cast, split the output columns
// among torch's intra-op threads (at::parallel_for), call the torch-free kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "cpu/linear.h"
#include "torch/cpu_rows.h"
#include "torch/ops.h"

namespace specrt {

using glue::check_rows;
using glue::row_stride;

std::string linear_isa_cpu(at::ScalarType dtype) {
  if (dtype == at::kFloat) return cpu::linear_isa(cpu::DType::kFloat32);
  if (dtype == at::kBFloat16) return cpu::linear_isa(cpu::DType::kBFloat16);
  return "";
}

int64_t linear_packed_size_cpu(at::ScalarType dtype, int64_t n, int64_t k) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return 0;
  return cpu::linear_packed_size(
      dtype == at::kFloat ? cpu::DType::kFloat32 : cpu::DType::kBFloat16, n, k);
}

void linear_pack_cpu(const Tensor& weight, Tensor& packed) {
  check_rows("linear", "weight", weight);
  const cpu::DType dtype = glue::float_rows_dtype("linear", "weight", weight);
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t size = cpu::linear_packed_size(dtype, n, k);
  TORCH_CHECK(size > 0 || n * k == 0, "linear_pack: this CPU lacks AVX-512");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == weight.scalar_type() &&
                  packed.dim() == 1 && packed.numel() == size && packed.is_contiguous(),
              "linear_pack: packed must be a contiguous 1-D CPU tensor of the weight's dtype ",
              "with ", size, " elements, got ", packed.sizes(), " ", packed.scalar_type());
  if (size == 0) return;
  cpu::linear_pack(dtype, weight.data_ptr(), n > 1 ? weight.stride(0) : k, n, k,
                   packed.data_ptr());
}

void linear_cpu(const Tensor& x, const Tensor& weight, const OptTensor& bias, Tensor& out,
                bool packed, const OptTensor& residual) {
  check_rows("linear", "x", x);
  check_rows("linear", "out", out);
  const cpu::DType dtype = glue::float_rows_dtype("linear", "x", x);
  TORCH_CHECK(weight.device().is_cpu(), "linear: weight must be a CPU tensor, got one on ",
              weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "linear: x, weight and out must share one dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(), ", ", out.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1);
  TORCH_CHECK(out.size(0) == m, "linear: out has ", out.size(0), " rows for ", m, " rows of x");
  cpu::LinearParams p;
  if (packed) {
    const int64_t size = cpu::linear_packed_size(dtype, n, k);
    TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.numel() == size,
                "linear: a packed weight for [", n, ", ", k, "] is a contiguous 1-D tensor of ",
                size, " elements, got ", weight.sizes());
    p.w_stride = 0;
  } else {
    check_rows("linear", "weight", weight);
    TORCH_CHECK(weight.size(1) == k, "linear: weight is ", weight.sizes(), " for x of ", k,
                " columns");
    TORCH_CHECK(weight.size(0) == n, "linear: out must be [", m, ", ", weight.size(0),
                "], got ", out.sizes());
    p.w_stride = row_stride(weight);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type(),
                "linear: bias must be a CPU tensor of x's dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "linear: bias must be [", n, "], got ",
                bias->sizes());
    TORCH_CHECK(n <= 1 || bias->stride(0) == 1, "linear: bias must be contiguous");
    p.bias = bias->data_ptr();
  }
  if (residual.has_value()) {
    check_rows("linear", "residual", *residual);
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(),
                "linear: residual must have x's dtype, got ", residual->scalar_type());
    TORCH_CHECK(residual->size(0) == m && residual->size(1) == n, "linear: residual must be [",
                m, ", ", n, "], got ", residual->sizes());
    // Same element or disjoint: y[i, j] may overwrite residual[i, j] only.
    TORCH_CHECK(!residual->is_alias_of(out) ||
                    (residual->data_ptr() == out.data_ptr() &&
                     (m <= 1 || residual->stride(0) == out.stride(0))),
                "linear: residual may alias out only as the same view");
    p.residual = residual->data_ptr();
    p.r_stride = row_stride(*residual);
  }
  p.dtype = dtype;
  p.packed = packed;
  p.x = x.data_ptr();
  p.x_stride = row_stride(x);
  p.w = weight.data_ptr();
  p.y = out.data_ptr();
  p.y_stride = row_stride(out);
  p.m = m;
  p.n = n;
  p.k = k;
  const std::string err = cpu::validate_linear(p);
  TORCH_CHECK(err.empty(), "linear: ", err);
  // Tiles of 4 columns; a thread gets at least 16 tiles (one 64-column block) so tiny layers
  // are not split into slivers. The result does not depend on the split (linear.h).
  const int64_t tiles = (n + 3) / 4;
  at::parallel_for(0, tiles, 16, [&](int64_t b, int64_t e) {
    cpu::linear_columns(p, b * 4, std::min(n, e * 4));
  });
}

}  // namespace specrt
