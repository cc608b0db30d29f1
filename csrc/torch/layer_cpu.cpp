// CPU glue for the fused row-wise decoder-layer ops (csrc/cpu/layer_ops.h): check, cast, split
// rows among torch's intra-op threads, call the torch-free kernels. A row's result does not
// depend on the split.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/layer_ops.h"
#include "torch/cpu_rows.h"
#include "torch/ops.h"

namespace specrt {

using glue::check_rows;
using glue::row_stride;

namespace {

// Rows per thread chunk: at least ~16K elements of work, so small steps stay on one thread.
int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

}  // namespace

void rms_norm_cpu(const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  const cpu::DType dt = glue::float_rows_dtype("rms_norm", "x", x);
  check_rows("rms_norm", "x", x);
  const int64_t m = x.size(0), h = x.size(1);
  check_rows("rms_norm", "out", out, x.scalar_type(), m, h);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == x.scalar_type() &&
                  weight.dim() == 1 && weight.size(0) == h && (h <= 1 || weight.stride(0) == 1),
              "rms_norm: weight must be a contiguous [", h, "] CPU tensor of x's dtype, got ",
              weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(eps >= 0, "rms_norm: eps must be >= 0, got ", eps);
  if (m == 0 || h == 0) return;
  const void* xp = x.data_ptr();
  void* yp = out.data_ptr();
  const int64_t xs = row_stride(x), ys = row_stride(out);
  at::parallel_for(0, m, grain(h), [&](int64_t r0, int64_t r1) {
    cpu::rms_norm_rows(dt, xp, xs, weight.data_ptr(), static_cast<float>(eps), yp, ys, h, r0, r1);
  });
}

void rope_cpu(Tensor& qk, const Tensor& cos, const Tensor& sin, int64_t heads,
              int64_t head_dim) {
  const cpu::DType dt = glue::float_rows_dtype("rope", "qk", qk);
  check_rows("rope", "qk", qk);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even and positive, got ",
              head_dim);
  TORCH_CHECK(heads >= 0 && heads * head_dim <= qk.size(1), "rope: ", heads, " heads of ",
              head_dim, " do not fit in rows of ", qk.size(1));
  const int64_t m = qk.size(0);
  check_rows("rope", "cos", cos, qk.scalar_type(), m, head_dim / 2);
  check_rows("rope", "sin", sin, qk.scalar_type(), m, head_dim / 2);
  TORCH_CHECK(row_stride(cos) == row_stride(sin), "rope: cos and sin must share a row stride");
  if (m == 0 || heads == 0) return;
  const int64_t qs = row_stride(qk), cs = row_stride(cos);
  void* qp = qk.data_ptr();
  at::parallel_for(0, m, grain(heads * head_dim), [&](int64_t r0, int64_t r1) {
    cpu::rope_rows(dt, qp, qs, heads, head_dim, cos.data_ptr(), sin.data_ptr(), cs, r0, r1);
  });
}

void silu_mul_cpu(const Tensor& gate_up, Tensor& out) {
  const cpu::DType dt = glue::float_rows_dtype("silu_mul", "gate_up", gate_up);
  check_rows("silu_mul", "gate_up", gate_up);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up must have an even number of columns ",
              "([gate, up]), got ", gate_up.size(1));
  const int64_t m = gate_up.size(0), inter = gate_up.size(1) / 2;
  check_rows("silu_mul", "out", out, gate_up.scalar_type(), m, inter);
  if (m == 0 || inter == 0) return;
  const int64_t gs = row_stride(gate_up), ys = row_stride(out);
  const void* gp = gate_up.data_ptr();
  void* yp = out.data_ptr();
  at::parallel_for(0, m, grain(3 * inter), [&](int64_t r0, int64_t r1) {
    cpu::silu_mul_rows(dt, gp, gs, inter, yp, ys, r0, r1);
  });
}

}  // namespace specrt
