// Register-blocked tile products used by the FlashMask kernels.
//
// Two shapes cover every product of the forward and backward pass:
//   gemm_nt: C[M][64]  = A[M][K] . Bt[K][64]      (scores Q K^T and dP = dO V^T; Bt is a packed
//                                                   K^T or V^T tile, so a row of C is 4 vectors)
//   gemm_nn: C[M][N]  += A[M][K] . B[K][N]         (P V, P^T dO, dS^T Q, dS K; A may be read
//                                                   transposed through its strides, N = 16 * nv)
// Each block keeps NR x NV accumulators in registers (24 of the 32 AVX-512 registers) and
// broadcasts one A element per row.
#pragma once

#include "simd.h"

namespace flashmask {

constexpr int kTile = 64;  // query rows per query tile == key columns per key tile
constexpr int kBlock = 128;  // block-mask granularity (rows and columns)
constexpr int kBlockTiles = kBlock / kTile;
constexpr int kRowBlock = 4;  // M must be a multiple of this
constexpr int kWideRows = 6;  // 6 x 4 accumulators + 4 B vectors fit the 32 AVX-512 registers

template <int NR>
inline void gemm_nt_block(const float* A, int64_t lda, int K, const float* Bt, float* C) {
  f16v acc[NR][4];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = splat(0.0f);
  for (int k = 0; k < K; ++k) {
    const float* b = Bt + k * kTile;
    const f16v b0 = load(b), b1 = load(b + 16), b2 = load(b + 32), b3 = load(b + 48);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const f16v a = splat(A[r * lda + k]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
      acc[r][2] += a * b2;
      acc[r][3] += a * b3;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < 4; ++v) store(C + r * kTile + v * kLanes, acc[r][v]);
}

// C[M][64] = A[M][K] . Bt[K][64]; M is a multiple of kRowBlock, C has row stride 64.
inline void gemm_nt(const float* A, int64_t lda, int M, int K, const float* Bt, float* C) {
  int r0 = 0;
  for (; r0 + kWideRows <= M; r0 += kWideRows)
    gemm_nt_block<kWideRows>(A + r0 * lda, lda, K, Bt, C + r0 * kTile);
  for (; r0 < M; r0 += kRowBlock)
    gemm_nt_block<kRowBlock>(A + r0 * lda, lda, K, Bt, C + r0 * kTile);
}

template <int NR, int NV>
inline void gemm_nn_block(const float* A, int64_t a_rs, int64_t a_cs, int K, const float* B,
                          int64_t ldb, float* C, int64_t ldc) {
  f16v acc[NR][NV];
#pragma GCC unroll 24
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = load(C + r * ldc + v * kLanes);
  for (int k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    f16v bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
    const float* a = A + k * a_cs;
#pragma GCC unroll 24
    for (int r = 0; r < NR; ++r) {
      const f16v ar = splat(a[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kLanes, acc[r][v]);
}

// Rows of an NV-vector-wide block: 24 accumulators (+ NV B vectors and a broadcast) of the 32
// AVX-512 registers.
template <int NV>
inline void gemm_nn_cols(const float* A, int64_t a_rs, int64_t a_cs, int M, int K, const float* B,
                         int64_t ldb, float* C, int64_t ldc) {
  constexpr int NR = 24 / NV;
  int r0 = 0;
  for (; r0 + NR <= M; r0 += NR)
    gemm_nn_block<NR, NV>(A + r0 * a_rs, a_rs, a_cs, K, B, ldb, C + r0 * ldc, ldc);
  for (; r0 < M; r0 += kRowBlock)
    gemm_nn_block<kRowBlock, NV>(A + r0 * a_rs, a_rs, a_cs, K, B, ldb, C + r0 * ldc, ldc);
}

// C[M][N] += A[M][K] . B[K][N], A(r, k) = A[r * a_rs + k * a_cs]; M % kRowBlock == 0, N % 16 == 0.
inline void gemm_nn(const float* A, int64_t a_rs, int64_t a_cs, int M, int K, const float* B,
                    int64_t ldb, float* C, int64_t ldc, int N) {
  for (int c0 = 0; c0 < N; c0 += 4 * kLanes) {
    const int nv = (N - c0) / kLanes < 4 ? (N - c0) / kLanes : 4;
    switch (nv) {
      case 4: gemm_nn_cols<4>(A, a_rs, a_cs, M, K, B + c0, ldb, C + c0, ldc); break;
      case 3: gemm_nn_cols<3>(A, a_rs, a_cs, M, K, B + c0, ldb, C + c0, ldc); break;
      case 2: gemm_nn_cols<2>(A, a_rs, a_cs, M, K, B + c0, ldb, C + c0, ldc); break;
      default: gemm_nn_cols<1>(A, a_rs, a_cs, M, K, B + c0, ldb, C + c0, ldc); break;
    }
  }
}

}  // namespace flashmask
