// Rotate-half RoPE on q and k read straight from the fused qkv projection (see fused_kernel.h).
//
//   token t, head j of qkv [T, H + 2K, D], P = D / 2, tables c = cos[t], s = sin[t]:
//     out[i]     = x[i] * c[i]         - x[i + P] * s[i]          i < P
//     out[i + P] = x[i + P] * c[i + P] + x[i] * s[i + P]
//   heads j < H go to q, the next K to k, the last K are copied to v. Backward applies the
//   transposed rotation (dx[i] = dy[i] c[i] + dy[i + P] s[i + P], dx[i + P] = dy[i + P] c[i + P]
//   - dy[i] s[i]) and copies dv back.
//
// No FMA contraction: the reference rounds each product before the add (x * cos, then
// rotate_half(x) * sin, then their sum), and so does this file, so q and k are the reference's bit
// for bit.
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cstring>

#include "fused_kernel.h"
#include "rows.h"
#include "vec.h"

namespace fused {

namespace {

struct Tables {
  f16v c_lo, c_hi, s_lo, s_hi;
};

Tables tables_at(const float* cos, const float* sin, int64_t i, int64_t P) {
  return {load_at(cos, i, P), load_at(cos + P, i, P), load_at(sin, i, P), load_at(sin + P, i, P)};
}

// Rotate `heads` consecutive heads of width D from src into dst (lanes [i, i + 16) of each half).
void rotate(const Tables& tb, const float* src, float* dst, int64_t heads, int64_t i, int64_t D) {
  const int64_t P = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* x = src + h * D;
    float* y = dst + h * D;
    const f16v lo = load_at(x, i, P), hi = load_at(x + P, i, P);
    store_at(y, i, P, lo * tb.c_lo - hi * tb.s_lo);
    store_at(y + P, i, P, hi * tb.c_hi + lo * tb.s_hi);
  }
}

// The transposed rotation; a null src (no gradient) writes zeros.
void unrotate(const Tables& tb, const float* src, float* dst, int64_t heads, int64_t i,
              int64_t D) {
  const int64_t P = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* y = dst + h * D;
    if (src == nullptr) {
      store_at(y, i, P, ernie5simd::splat(0.0f));
      store_at(y + P, i, P, ernie5simd::splat(0.0f));
      continue;
    }
    const float* x = src + h * D;
    const f16v lo = load_at(x, i, P), hi = load_at(x + P, i, P);
    store_at(y, i, P, lo * tb.c_lo + hi * tb.s_hi);
    store_at(y + P, i, P, hi * tb.c_hi - lo * tb.s_lo);
  }
}

}  // namespace

void rope_qkv_forward(const RopeDims& d, const float* qkv, const float* cos, const float* sin,
                      float* q, float* k, float* v, int threads) {
  const int64_t N = d.H + 2 * d.K, P = d.D / 2;
  for_rows(threads, d.T, 2 * N * d.D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = qkv + t * N * d.D;
      const float* ct = cos + t * d.D;
      const float* st = sin + t * d.D;
      for (int64_t i = 0; i < P; i += kLanes) {
        const Tables tb = tables_at(ct, st, i, P);
        rotate(tb, row, q + t * d.H * d.D, d.H, i, d.D);
        rotate(tb, row + d.H * d.D, k + t * d.K * d.D, d.K, i, d.D);
      }
      std::memcpy(v + t * d.K * d.D, row + (d.H + d.K) * d.D, sizeof(float) * d.K * d.D);
    }
  });
}

void rope_qkv_backward(const RopeDims& d, const float* dq, const float* dk, const float* dv,
                       const float* cos, const float* sin, float* dqkv, int threads) {
  const int64_t N = d.H + 2 * d.K, P = d.D / 2;
  for_rows(threads, d.T, 2 * N * d.D, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = dqkv + t * N * d.D;
      const float* ct = cos + t * d.D;
      const float* st = sin + t * d.D;
      for (int64_t i = 0; i < P; i += kLanes) {
        const Tables tb = tables_at(ct, st, i, P);
        unrotate(tb, dq == nullptr ? nullptr : dq + t * d.H * d.D, row, d.H, i, d.D);
        unrotate(tb, dk == nullptr ? nullptr : dk + t * d.K * d.D, row + d.H * d.D, d.K, i, d.D);
      }
      float* dv_row = row + (d.H + d.K) * d.D;
      if (dv == nullptr) {
        std::fill(dv_row, dv_row + d.K * d.D, 0.0f);
      } else {
        std::memcpy(dv_row, dv + t * d.K * d.D, sizeof(float) * d.K * d.D);
      }
    }
  });
}

}  // namespace fused
