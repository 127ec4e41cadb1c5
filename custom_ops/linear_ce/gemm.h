// Register-blocked products of strided row-major matrices for the output projection + CE kernels.
//
//   gemm<false>: C (=|+=) A . B      A [R, K] (row stride lda)
//   gemm<true>:  C (=|+=) A^T . B    A [K, R] (row stride lda), read transposed in place
//   B [K, N] (row stride ldb), C [R, N] (row stride ldc).
//
// A block keeps NR x NV 16-float vectors of C in registers (6 x 4 = 24 of the 32 AVX-512 registers)
// and broadcasts one A element per row. The kernel walks 64-column stripes of B and, inside a
// stripe, blocks of 6 rows, so a stripe (K x 64 floats) is reused from L1 by every row block.
// Columns past the last multiple of 16 are done by the same kernel on a zero-padded copy of those
// columns of B, so odd widths (V = 17, M = 100) stay vectorised.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/simd.h"

namespace lce {

using ernie5simd::f16v;
using ernie5simd::kLanes;
using ernie5simd::load;
using ernie5simd::splat;
using ernie5simd::store;

constexpr int kBlockRows = 6;
constexpr int kBlockVecs = 4;

template <int NR, int NV, bool TA>
inline void gemm_block(const float* A, int64_t lda, int64_t K, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
  f16v acc[NR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? load(C + r * ldc + v * kLanes) : splat(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    f16v bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const f16v a = splat(TA ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kLanes, acc[r][v]);
}

// Rows [0, R) of one stripe of NV vectors; A, B and C point at the stripe's first row / column.
template <int NV, bool TA>
inline void gemm_stripe(int64_t R, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i0 = 0; i0 < R; i0 += kBlockRows) {
    const float* a = TA ? A + i0 : A + i0 * lda;
    float* c = C + i0 * ldc;
    switch (std::min<int64_t>(kBlockRows, R - i0)) {
      case 6: gemm_block<6, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
      case 5: gemm_block<5, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
      case 4: gemm_block<4, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
      case 3: gemm_block<3, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
      case 2: gemm_block<2, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
      default: gemm_block<1, NV, TA>(a, lda, K, B, ldb, c, ldc, accumulate); break;
    }
  }
}

// The last N % 16 columns: B's columns copied into a [K, 16] zero-padded panel, C's through a
// [6, 16] buffer per row block.
template <bool TA>
void gemm_tail(int64_t R, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  thread_local std::vector<float> panel;
  panel.assign(static_cast<size_t>(K) * kLanes, 0.0f);
  for (int64_t k = 0; k < K; ++k) std::memcpy(&panel[k * kLanes], B + k * ldb, N * sizeof(float));
  float out[kBlockRows * kLanes];
  for (int64_t i0 = 0; i0 < R; i0 += kBlockRows) {
    const int64_t nr = std::min<int64_t>(kBlockRows, R - i0);
    std::fill(out, out + kBlockRows * kLanes, 0.0f);
    if (accumulate)
      for (int64_t r = 0; r < nr; ++r)
        std::memcpy(out + r * kLanes, C + (i0 + r) * ldc, N * sizeof(float));
    gemm_stripe<1, TA>(nr, K, TA ? A + i0 : A + i0 * lda, lda, panel.data(), kLanes, out, kLanes,
                       accumulate);
    for (int64_t r = 0; r < nr; ++r)
      std::memcpy(C + (i0 + r) * ldc, out + r * kLanes, N * sizeof(float));
  }
}

// C (=|+=) op(A) . B with op(A) = A [R, K] or, when TA, A^T for A [K, R]; see the file comment.
template <bool TA>
void gemm(int64_t R, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  if (R <= 0 || N <= 0) return;
  const int64_t full = N / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < full; c0 += kBlockVecs * kLanes) {
    const float* b = B + c0;
    float* c = C + c0;
    switch (std::min<int64_t>(kBlockVecs, (full - c0) / kLanes)) {
      case 4: gemm_stripe<4, TA>(R, K, A, lda, b, ldb, c, ldc, accumulate); break;
      case 3: gemm_stripe<3, TA>(R, K, A, lda, b, ldb, c, ldc, accumulate); break;
      case 2: gemm_stripe<2, TA>(R, K, A, lda, b, ldb, c, ldc, accumulate); break;
      default: gemm_stripe<1, TA>(R, K, A, lda, b, ldb, c, ldc, accumulate); break;
    }
  }
  if (full < N) gemm_tail<TA>(R, N - full, K, A, lda, B + full, ldb, C + full, ldc, accumulate);
}

inline void gemm_nn(int64_t R, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm<false>(R, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

inline void gemm_tn(int64_t R, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm<true>(R, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace lce
