// Register-blocked products over rows addressed by pointer (token rows are read in place, by index).
//
//   gemm_nn: C[i] (=|+=) sum_k A[i][k] * B[k]      A: R row pointers of length K
//   gemm_tn: C[i] (=|+=) sum_k A[k][i] * B[k]      A: K row pointers of length R (A transposed)
// B[k] and C[i] are row pointers of length N. Every operand is a pointer array, so the same kernel
// serves gathered token rows, contiguous tiles and weight matrices. A block keeps NR x NV vectors
// of C in registers (6 x 4 = 24 of the 32 AVX-512 registers) and broadcasts one A element per row;
// columns past the last multiple of 16 are done by a scalar loop.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/simd.h"

namespace moe {

using ernie5simd::f16v;
using ernie5simd::kLanes;
using ernie5simd::load;
using ernie5simd::sigmoidv;
using ernie5simd::splat;
using ernie5simd::store;

constexpr int kRows = 6;
constexpr int kVecs = 4;

template <int NR, int NV, bool TA>
inline void gemm_block(const float* const* A, int64_t i0, int64_t K, const float* const* B,
                       int64_t c0, float* const* C, bool accumulate) {
  f16v acc[NR][NV];
  if (accumulate) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = load(C[i0 + r] + c0 + v * kLanes);
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.0f);
  }
  const float* a_rows[NR];
  if (!TA)
    for (int r = 0; r < NR; ++r) a_rows[r] = A[i0 + r];
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B[k] + c0;
    f16v bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
    const float* a_col = TA ? A[k] + i0 : nullptr;
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const f16v ar = splat(TA ? a_col[r] : a_rows[r][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C[i0 + r] + c0 + v * kLanes, acc[r][v]);
}

template <int NV, bool TA>
inline void gemm_rows(const float* const* A, int64_t i0, int64_t nr, int64_t K,
                      const float* const* B, int64_t c0, float* const* C, bool accumulate) {
  switch (nr) {
    case 6: gemm_block<6, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
    case 5: gemm_block<5, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
    case 4: gemm_block<4, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
    case 3: gemm_block<3, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
    case 2: gemm_block<2, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
    default: gemm_block<1, NV, TA>(A, i0, K, B, c0, C, accumulate); break;
  }
}

// C[i][0:N] (=|+=) sum_k A(i, k) B[k][0:N] for i < R; A(i, k) = A[i][k], or A[k][i] when TA.
template <bool TA>
void gemm(const float* const* A, int64_t R, int64_t K, const float* const* B, int64_t N,
          float* const* C, bool accumulate) {
  const int64_t full = N / kLanes * kLanes;
  for (int64_t c0 = 0; c0 < full; c0 += kVecs * kLanes) {
    const int64_t nv = std::min<int64_t>(kVecs, (full - c0) / kLanes);
    for (int64_t i0 = 0; i0 < R; i0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, R - i0);
      switch (nv) {
        case 4: gemm_rows<4, TA>(A, i0, nr, K, B, c0, C, accumulate); break;
        case 3: gemm_rows<3, TA>(A, i0, nr, K, B, c0, C, accumulate); break;
        case 2: gemm_rows<2, TA>(A, i0, nr, K, B, c0, C, accumulate); break;
        default: gemm_rows<1, TA>(A, i0, nr, K, B, c0, C, accumulate); break;
      }
    }
  }
  if (full == N) return;
  for (int64_t i = 0; i < R; ++i) {
    float* c = C[i];
    for (int64_t n = full; n < N; ++n) {
      float s = accumulate ? c[n] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += (TA ? A[k][i] : A[i][k]) * B[k][n];
      c[n] = s;
    }
  }
}

inline void gemm_nn(const float* const* A, int64_t R, int64_t K, const float* const* B, int64_t N,
                    float* const* C, bool accumulate) {
  gemm<false>(A, R, K, B, N, C, accumulate);
}

inline void gemm_tn(const float* const* A, int64_t R, int64_t K, const float* const* B, int64_t N,
                    float* const* C, bool accumulate) {
  gemm<true>(A, R, K, B, N, C, accumulate);
}

}  // namespace moe
