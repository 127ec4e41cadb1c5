// Access to [B, S, heads, D] tensors in 64-row tiles.
//
//   RowTiles:     tile t of (b, head) as (pointer, row stride). Read in place when D is a multiple
//                 of 16; only the tail tile past S is a zero-padded copy. Otherwise every tile is
//                 a copy padded to Dp lanes, so vector loads over D never cross a row.
//   pack_tiles_t: per (b, head, tile) the transposed block X^T [D][64], optionally scaled: the
//                 B operand of gemm_nt.
// Padding rows and lanes are zero so that padded work never produces NaN.
#pragma once

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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * heads; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      for (int64_t i = first * kTile; i < S; ++i) {
        const float* src = x + ((b * S + i) * heads + h) * D;
        float* dst = copy_.data() + (bh * copied * kTile + i - first * kTile) * Dp_;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d];
      }
    }
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

// dst[d][r] = scale * src[r][d] for r < rows (row stride ld), 0 for rows..63: a [D][64] block.
inline void transpose_tile(const float* src, int64_t ld, int64_t rows, int64_t D, float scale,
                           float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[d * kTile + r] = src[r * ld + d] * scale;
  for (int64_t r = rows; r < kTile; ++r)
    for (int64_t d = 0; d < D; ++d) dst[d * kTile + r] = 0.0f;
}

// out[(b * heads + h) * nt + t] = scale * X^T of rows t*64 .. t*64+63, a [D][64] block.
inline void pack_tiles_t(const float* x, int64_t B, int64_t S, int64_t heads, int64_t D,
                         float scale, float* out, int threads) {
  const int64_t nt = (S + kTile - 1) / kTile;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < B * heads * nt; ++task) {
    const int64_t t = task % nt, bh = task / nt, b = bh / heads, h = bh % heads;
    transpose_tile(x + ((b * S + t * kTile) * heads + h) * D, heads * D,
                   std::min<int64_t>(kTile, S - t * kTile), D, scale, out + task * D * kTile);
  }
}

}  // namespace flashmask
