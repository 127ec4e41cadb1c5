// Access to [B, S, heads, D] tensors in 64-row tiles.
//
//   RowTiles:     tile t of (b, head) as (pointer, row stride). Read in place when D is a multiple
//                 of 16; only the tail tile past S is a zero-padded copy (made by the calling
//                 thread: it is small). Otherwise every tile is a copy padded to Dp lanes, so
//                 vector loads over D never cross a row.
//   transpose_tile: one 64-row block as X^T [D][64], optionally scaled: the B operand of gemm_nt.
// Padding rows and lanes are zero so that padded work never produces NaN.
#pragma once

#include "../common/parallel.h"
#include "mask.h"

namespace flashmask {

struct TileRef {
  const float* ptr;
  int64_t ld;
};

class RowTiles {
 public:
  RowTiles(const float* x, int64_t B, int64_t S, int64_t heads, int64_t D, int threads)
      : x_(x), S_(S), heads_(heads), D_(D), Dp_((D + kLanes - 1) / kLanes * kLanes) {
    const int64_t nt = (S + kTile - 1) / kTile;
    const bool in_place = D % kLanes == 0;
    const int64_t copied = in_place ? (S % kTile ? 1 : 0) : nt;  // tiles copied per (b, head)
    if (copied == 0) return;
    copy_.reset(B * heads * copied * kTile * Dp_);
    const int64_t first = nt - copied;
    ernie5par::TaskQueue rows(B * heads);
    auto copy_rows = [&] {
      for (int64_t bh; rows.next(bh);) {
        const int64_t b = bh / heads, h = bh % heads;
        for (int64_t i = first * kTile; i < S; ++i) {
          const float* src = x + ((b * S + i) * heads + h) * D;
          float* dst = copy_.data() + (bh * copied * kTile + i - first * kTile) * Dp_;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
        }
      }
    };
    ernie5par::parallel(copied > 1 ? ernie5par::team_size(threads, B * heads) : 1, copy_rows);
    first_copied_ = first;
    copied_ = copied;
  }

  TileRef tile(int64_t b, int64_t h, int64_t t) const {
    if (t < first_copied_)
      return {x_ + ((b * S_ + t * kTile) * heads_ + h) * D_, heads_ * D_};
    const int64_t bh = b * heads_ + h;
    return {copy_.data() + (bh * copied_ + t - first_copied_) * kTile * Dp_, Dp_};
  }

 private:
  const float* x_;
  int64_t S_, heads_, D_, Dp_;
  int64_t first_copied_ = 1 << 30, copied_ = 0;
  Buffer copy_;
};

// 16 x 16 transpose in registers: four stages, stage k swapping bit k of the row and column
// indices with two-source shuffles.
inline void transpose16(f16v* r) {
  static const i16v lo[4] = {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                             {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                             {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                             {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
  static const i16v hi[4] = {{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
                             {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                             {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                             {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
  for (int k = 0; k < 4; ++k) {
    const int m = 1 << k;
    for (int a = 0; a < kLanes; ++a) {
      if (a & m) continue;
      const f16v x = r[a], y = r[a | m];
      r[a] = __builtin_shuffle(x, y, lo[k]);
      r[a | m] = __builtin_shuffle(x, y, hi[k]);
    }
  }
}

// dst[d][r] = scale * src[r][d] for r < rows (row stride ld), 0 for rows..63: a [D][64] block.
inline void transpose_tile(const float* src, int64_t ld, int64_t rows, int64_t D, float scale,
                           float* dst) {
  if (D % kLanes != 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) dst[d * kTile + r] = src[r * ld + d] * scale;
    for (int64_t r = rows; r < kTile; ++r)
      for (int64_t d = 0; d < D; ++d) dst[d * kTile + r] = 0.0f;
    return;
  }
  const f16v sc = splat(scale);
  f16v blk[kLanes];
  for (int64_t r0 = 0; r0 < kTile; r0 += kLanes) {
    for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
      for (int i = 0; i < kLanes; ++i)
        blk[i] = r0 + i < rows ? load(src + (r0 + i) * ld + d0) * sc : splat(0.0f);
      transpose16(blk);
      for (int i = 0; i < kLanes; ++i) store(dst + (d0 + i) * kTile + r0, blk[i]);
    }
  }
}

}  // namespace flashmask
