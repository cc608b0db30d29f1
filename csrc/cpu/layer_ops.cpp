// Row-wise decoder-layer operations (see layer_ops.h). Built with -ffp-contract=off
// (CMakeLists.txt): a product followed by a sum stays two roundings, as in the reference, and an
// element gets the same result in a vectorized loop body as in its remainder.
#include "cpu/layer_ops.h"

#include <cmath>

#include "cpu/bf16.h"
#include "cpu/vmath.h"

namespace specrt::cpu {
namespace {

#define SPECRT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

SPECRT_CLONES float sum_squares_f32(const float* x, int64_t h) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < h; ++i) s += x[i] * x[i];
  return s;
}

SPECRT_CLONES float sum_squares_bf16(const uint16_t* x, int64_t h) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < h; ++i) {
    const float v = bf16_to_float(x[i]);
    s += v * v;
  }
  return s;
}

SPECRT_CLONES void scale_f32(const float* x, const float* w, float inv, float* y, int64_t h) {
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) y[i] = w[i] * (x[i] * inv);
}

SPECRT_CLONES void scale_bf16(const uint16_t* x, const uint16_t* w, float inv, uint16_t* y,
                              int64_t h) {
#pragma omp simd
  for (int64_t i = 0; i < h; ++i)
    y[i] = float_to_bf16(bf16_to_float(w[i]) * bf16_round(bf16_to_float(x[i]) * inv));
}

SPECRT_CLONES void rope_head_f32(float* x, const float* c, const float* s, int64_t half) {
  float* x2 = x + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x2[i];
    x[i] = a * c[i] - b * s[i];
    x2[i] = b * c[i] + a * s[i];
  }
}

SPECRT_CLONES void rope_head_bf16(uint16_t* x, const uint16_t* c, const uint16_t* s,
                                  int64_t half) {
  uint16_t* x2 = x + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = bf16_to_float(x[i]), b = bf16_to_float(x2[i]);
    const float ci = bf16_to_float(c[i]), si = bf16_to_float(s[i]);
    x[i] = float_to_bf16(bf16_round(a * ci) - bf16_round(b * si));
    x2[i] = float_to_bf16(bf16_round(b * ci) + bf16_round(a * si));
  }
}

SPECRT_CLONES void silu_mul_f32(const float* g, const float* u, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = silu(g[i]) * u[i];
}

SPECRT_CLONES void silu_mul_bf16(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    y[i] = float_to_bf16(bf16_round(silu(bf16_to_float(g[i]))) * bf16_to_float(u[i]));
}

#undef SPECRT_CLONES

}  // namespace

void rms_norm_rows(DType dtype, const void* x, int64_t x_stride, const void* weight, float eps,
                   void* y, int64_t y_stride, int64_t h, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (dtype == DType::kFloat32) {
      const float* xr = static_cast<const float*>(x) + r * x_stride;
      const float inv = 1.0f / std::sqrt(sum_squares_f32(xr, h) / float(h) + eps);
      scale_f32(xr, static_cast<const float*>(weight), inv, static_cast<float*>(y) + r * y_stride,
                h);
    } else {
      const uint16_t* xr = static_cast<const uint16_t*>(x) + r * x_stride;
      const float inv = 1.0f / std::sqrt(sum_squares_bf16(xr, h) / float(h) + eps);
      scale_bf16(xr, static_cast<const uint16_t*>(weight), inv,
                 static_cast<uint16_t*>(y) + r * y_stride, h);
    }
  }
}

void rope_rows(DType dtype, void* qk, int64_t qk_stride, int64_t heads, int64_t head_dim,
               const void* cos, const void* sin, int64_t cs_stride, int64_t r0, int64_t r1) {
  const int64_t half = head_dim / 2;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t hd = 0; hd < heads; ++hd) {
      if (dtype == DType::kFloat32) {
        rope_head_f32(static_cast<float*>(qk) + r * qk_stride + hd * head_dim,
                      static_cast<const float*>(cos) + r * cs_stride,
                      static_cast<const float*>(sin) + r * cs_stride, half);
      } else {
        rope_head_bf16(static_cast<uint16_t*>(qk) + r * qk_stride + hd * head_dim,
                       static_cast<const uint16_t*>(cos) + r * cs_stride,
                       static_cast<const uint16_t*>(sin) + r * cs_stride, half);
      }
    }
  }
}

void silu_mul_rows(DType dtype, const void* gate_up, int64_t gu_stride, int64_t inter, void* y,
                   int64_t y_stride, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (dtype == DType::kFloat32) {
      const float* g = static_cast<const float*>(gate_up) + r * gu_stride;
      silu_mul_f32(g, g + inter, static_cast<float*>(y) + r * y_stride, inter);
    } else {
      const uint16_t* g = static_cast<const uint16_t*>(gate_up) + r * gu_stride;
      silu_mul_bf16(g, g + inter, static_cast<uint16_t*>(y) + r * y_stride, inter);
    }
  }
}

}  // namespace specrt::cpu
