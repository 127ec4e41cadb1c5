// Fused elementwise kernels of the transformer block on the CPU, fp32, plain pointers (no framework
// types): RMSNorm, rotate-half RoPE on q and k straight from the qkv projection, SwiGLU.
//
// Every kernel spreads rows over `threads` threads (../common/parallel.h) and walks a row in
// 16-float vectors (ernie5simd::f16v) with a masked tail, so any width works. Results never depend
// on the thread count: each row is computed by one thread in a fixed order, and the one cross-row
// reduction (the RMSNorm weight gradient) adds the rows in row order.
#pragma once

#include <cstdint>

namespace fused {

// ---- RMSNorm over rows of width M:  y = (x * r) * w,  r = 1 / sqrt(mean(x^2) + eps) ----------

// y [rows, M]; inv_rms [rows] receives r (kept for backward).
void rms_norm_forward(int64_t rows, int64_t M, const float* x, const float* w, float eps, float* y,
                      float* inv_rms, int threads);

// dx [rows, M], dw [M] from dy, in the reference's order of operations (rms_norm.cc).
void rms_norm_backward(int64_t rows, int64_t M, const float* x, const float* w,
                       const float* inv_rms, const float* dy, float* dx, float* dw, int threads);

// ---- RoPE on the fused projection:  qkv [T, H + 2K, D] -> q [T, H, D], k [T, K, D], v [T, K, D]
// T = B * S tokens; cos, sin [T, D] (one table row per token, shared by every head). Rotate-half:
// for pairs (i, i + D/2), out = x * cos + rot(x) * sin with rot(x) = [-x_hi, x_lo].

struct RopeDims {
  int64_t T, H, K, D;
};

void rope_qkv_forward(const RopeDims& d, const float* qkv, const float* cos, const float* sin,
                      float* q, float* k, float* v, int threads);

// dqkv [T, H + 2K, D] from dq, dk, dv (any of them null = zero): the inverse rotation
// dx = dy * cos + rot^T(dy * sin), rot^T(z) = [z_hi, -z_lo]; dv is copied through.
void rope_qkv_backward(const RopeDims& d, const float* dq, const float* dk, const float* dv,
                       const float* cos, const float* sin, float* dqkv, int threads);

// ---- SwiGLU over rows of width 2F = [a | b]:  y = silu(a) * b = a * sigmoid(a) * b ----------

void swiglu_forward(int64_t rows, int64_t F, const float* x, float* y, int threads);

// dx = [dy * b * s * (1 + a * (1 - s)) | dy * a * s], s = sigmoid(a).
void swiglu_backward(int64_t rows, int64_t F, const float* x, const float* dy, float* dx,
                     int threads);

}  // namespace fused
