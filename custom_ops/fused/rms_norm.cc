// RMSNorm forward and backward (see fused_kernel.h).
//
//   forward   r = 1 / sqrt(sum(x^2) / M + eps),  y = (x * r) * w
//   backward  g = dy * w,  dx = g * r + c * x,  c = (((-0.5 * <g, x>) * r) * r * r) / M * 2,
//             dw = sum over rows of dy * (x * r)
//
// The sums and the rounding steps follow the reference's chain of Paddle kernels (ops/fused.py
// `rms_norm_reference`): Paddle reduces the last axis by adding the M values one after another
// (its mean, and the gradient of the broadcast multiply by r), reduces rows in row order (the
// weight gradient), and rounds after every multiply (rsqrt' = -0.5 * d * r * r * r, mean' = / M,
// pow' = * 2 * x). The backward then gives the reference's bits exactly, and the forward differs
// from it only where Paddle's pow(x, 2) and rsqrt are not correctly rounded. The fewer bits the
// two paths differ in, the later a rounding difference flips an MoE routing choice in training.
//
// No FMA contraction in this file: a fused multiply-add rounds once where the reference rounds
// twice.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>

#include "fused_kernel.h"
#include "rows.h"
#include "vec.h"

namespace fused {

namespace {

using ernie5simd::splat;

// Rows summed side by side: independent chains hide the latency of the in-order adds.
constexpr int kChains = 8;

// out[j] = sum over i = 0 .. M-1, in order, of term(j, i), for rows j < n <= kChains.
template <class Term>
void ordered_row_sums(int n, int64_t M, Term&& term, float* out) {
  float s[kChains] = {};
  if (n == kChains) {
    for (int64_t i = 0; i < M; ++i) {
      for (int j = 0; j < kChains; ++j) s[j] += term(j, i);
    }
  } else {
    for (int64_t i = 0; i < M; ++i) {
      for (int j = 0; j < n; ++j) s[j] += term(j, i);
    }
  }
  std::copy(s, s + n, out);
}

}  // namespace

void rms_norm_forward(int64_t rows, int64_t M, const float* x, const float* w, float eps, float* y,
                      float* inv_rms, int threads) {
  const float m = static_cast<float>(M);
  for_rows(threads, rows, 2 * M, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kChains) {
      const int n = static_cast<int>(std::min<int64_t>(kChains, r1 - r));
      const float* xr = x + r * M;
      float sums[kChains];
      ordered_row_sums(
          n, M, [&](int j, int64_t i) { return xr[j * M + i] * xr[j * M + i]; }, sums);
      for (int j = 0; j < n; ++j) {
        const float inv = 1.0f / std::sqrt(sums[j] / m + eps);
        inv_rms[r + j] = inv;
        const f16v vi = splat(inv);
        const float* xj = xr + j * M;
        float* yj = y + (r + j) * M;
        for (int64_t i = 0; i < M; i += kLanes) {
          store_at(yj, i, M, (load_at(xj, i, M) * vi) * load_at(w, i, M));
        }
      }
    }
  });
}

void rms_norm_backward(int64_t rows, int64_t M, const float* x, const float* w,
                       const float* inv_rms, const float* dy, float* dx, float* dw, int threads) {
  const float m = static_cast<float>(M);
  for_rows(threads, rows, 3 * M, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kChains) {
      const int n = static_cast<int>(std::min<int64_t>(kChains, r1 - r));
      const float* xr = x + r * M;
      const float* dyr = dy + r * M;
      float dots[kChains];
      ordered_row_sums(
          n, M, [&](int j, int64_t i) { return (dyr[j * M + i] * w[i]) * xr[j * M + i]; }, dots);
      for (int j = 0; j < n; ++j) {
        const float inv = inv_rms[r + j];
        const float c = ((((-0.5f * dots[j]) * inv) * inv) * inv) / m * 2.0f;
        const f16v vi = splat(inv), vc = splat(c);
        const float *xj = xr + j * M, *dyj = dyr + j * M;
        float* dxj = dx + (r + j) * M;
        for (int64_t i = 0; i < M; i += kLanes) {
          const f16v g = load_at(dyj, i, M) * load_at(w, i, M);
          store_at(dxj, i, M, g * vi + vc * load_at(xj, i, M));
        }
      }
    }
  });
  // The weight gradient: each task owns a range of columns and adds the rows in order.
  const int64_t vectors = (M + kLanes - 1) / kLanes;
  ernie5par::parallel_for(threads, vectors, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * kLanes; i < std::min(M, v1 * kLanes); i += kLanes) {
      f16v acc = splat(0.0f);
      for (int64_t r = 0; r < rows; ++r) {
        acc += load_at(dy + r * M, i, M) * (load_at(x + r * M, i, M) * splat(inv_rms[r]));
      }
      store_at(dw, i, M, acc);
    }
  });
}

}  // namespace fused
