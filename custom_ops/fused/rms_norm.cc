// RMSNorm forward and backward (see fused_kernel.h).
//
//   forward   r = 1 / sqrt(sum(x^2) / M + eps),  y = (x * r) * w
//   backward  g = dy * w,  dx = r * g - x * (r^3 * <g, x> / M),  dw = sum over rows of dy * (x * r)
#include <algorithm>
#include <cmath>

#include "fused_kernel.h"
#include "rows.h"
#include "vec.h"

namespace fused {

namespace {

using ernie5simd::hsum;
using ernie5simd::splat;

float sum_of_squares(const float* x, int64_t M) {
  f16v acc = splat(0.0f);
  for (int64_t i = 0; i < M; i += kLanes) {
    const f16v v = load_at(x, i, M);
    acc += v * v;
  }
  return hsum(acc);
}

// Rows per block of the weight gradient: at least 32, and at most 256 blocks, so the scratch and
// the final reduction stay small for any row count.
int64_t block_rows(int64_t rows) { return std::max<int64_t>(32, (rows + 255) / 256); }

}  // namespace

void rms_norm_forward(int64_t rows, int64_t M, const float* x, const float* w, float eps, float* y,
                      float* inv_rms, int threads) {
  for_rows(threads, rows, 2 * M, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * M;
      float* yr = y + r * M;
      const float mean = sum_of_squares(xr, M) / static_cast<float>(M);
      const float inv = 1.0f / std::sqrt(mean + eps);
      inv_rms[r] = inv;
      const f16v vi = splat(inv);
      for (int64_t i = 0; i < M; i += kLanes) {
        store_at(yr, i, M, (load_at(xr, i, M) * vi) * load_at(w, i, M));
      }
    }
  });
}

int64_t rms_norm_grad_blocks(int64_t rows) {
  const int64_t b = block_rows(rows);
  return std::max<int64_t>(1, (rows + b - 1) / b);
}

void rms_norm_backward(int64_t rows, int64_t M, const float* x, const float* w,
                       const float* inv_rms, const float* dy, float* dx, float* dw, float* partial,
                       int threads) {
  const int64_t per_block = block_rows(rows);
  const int64_t blocks = rms_norm_grad_blocks(rows);
  const float inv_m = 1.0f / static_cast<float>(M);
  // A task is a block of rows: it writes their dx rows and its own partial row of dw.
  ernie5par::parallel_for(threads, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* part = partial + blk * M;
      std::fill(part, part + M, 0.0f);
      const int64_t end = std::min(rows, (blk + 1) * per_block);
      for (int64_t r = blk * per_block; r < end; ++r) {
        const float* xr = x + r * M;
        const float* dyr = dy + r * M;
        float* dxr = dx + r * M;
        f16v acc = splat(0.0f);
        for (int64_t i = 0; i < M; i += kLanes) {
          acc += (load_at(dyr, i, M) * load_at(w, i, M)) * load_at(xr, i, M);
        }
        const float inv = inv_rms[r];
        const f16v vi = splat(inv);
        const f16v c = splat(inv * inv * inv * hsum(acc) * inv_m);
        for (int64_t i = 0; i < M; i += kLanes) {
          const f16v xv = load_at(xr, i, M), dyv = load_at(dyr, i, M);
          store_at(dxr, i, M, vi * (dyv * load_at(w, i, M)) - xv * c);
          store_at(part, i, M, load_at(part, i, M) + dyv * (xv * vi));
        }
      }
    }
  });
  // Blocks are added in block order, whichever thread computed them; tasks of 256 vectors of
  // columns, one thread below 4096 columns.
  const int64_t vectors = (M + kLanes - 1) / kLanes;
  ernie5par::parallel_for(M >= 4096 ? threads : 1, vectors, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * kLanes; i < std::min(M, v1 * kLanes); i += kLanes) {
      f16v acc = load_at(partial, i, M);
      for (int64_t blk = 1; blk < blocks; ++blk) acc += load_at(partial + blk * M, i, M);
      store_at(dw, i, M, acc);
    }
  });
}

}  // namespace fused
