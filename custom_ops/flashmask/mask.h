// Problem shape, the FlashMask column representation and the block selection.
//
// Every key column j carries two masked row ranges, [LTS_j, LTE_j) and [UTS_j, UTE_j); the
// causal flag adds j > i + (Sk - Sq). ColumnMask expands startend_row_indices [B, Hm, Sk, C]
// into those four vectors (padding columns past Sk mask every row) and keeps, per key tile,
// the min and max of each vector. An optional block mask [B, Hb, ceil(Sq/128), ceil(Sk/128)]
// (nonzero = keep) removes whole 128 x 128 blocks, i.e. 2 x 2 tiles. classify() turns both into
// one of three tile kinds:
//
//   kSkip     every (row, column) of the tile is masked, or its block is not kept: no K/V read,
//             no product
//   kPartial  some are: compute, then mask element-wise (apply_t / apply_rows)
//   kDense    none are: compute with no mask work
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm.h"

namespace flashmask {

struct Shape {
  int64_t B, Sq, Sk, H, Hk, D;
  int64_t Hm, C;  // mask heads (1, Hk or H) and index columns (1, 2 or 4)
  bool causal;
  float scale;
  int threads;
  int64_t Hb = 0;  // block-mask heads (1, Hk or H); 0: no block mask

  int64_t group() const { return H / Hk; }
  int64_t nqt() const { return (Sq + kTile - 1) / kTile; }
  int64_t nkt() const { return (Sk + kTile - 1) / kTile; }
  int64_t Sqp() const { return nqt() * kTile; }
  int64_t Skp() const { return nkt() * kTile; }
  int64_t Dp() const { return (D + kLanes - 1) / kLanes * kLanes; }
  int64_t causal_offset() const { return Sk - Sq; }  // bottom-right alignment
  int64_t mask_head(int64_t h) const { return Hm == 1 ? 0 : Hm == H ? h : h / group(); }
  int64_t block_head(int64_t h) const { return Hb == 1 ? 0 : Hb == H ? h : h / group(); }
  int64_t nbq() const { return (Sq + kBlock - 1) / kBlock; }
  int64_t nbk() const { return (Sk + kBlock - 1) / kBlock; }
};

enum TileKind { kSkip, kPartial, kDense };

struct TileStats {
  int32_t lts_min, lts_max, lte_min, lte_max, uts_min, uts_max, ute_min, ute_max;
};

class ColumnMask {
 public:
  // `block` is the block mask [B, Hb, nbq, nbk] or null (every block kept).
  ColumnMask(const Shape& s, const int32_t* idx, const int32_t* block) : s_(s), block_(block) {
    const int64_t skp = s.Skp(), nkt = s.nkt();
    cols_.assign(s.B * s.Hm * 4 * skp, 0);
    stats_.resize(s.B * s.Hm * nkt);
    const int32_t all_rows = static_cast<int32_t>(s.Sq + kTile);  // past every row
    for (int64_t bm = 0; bm < s.B * s.Hm; ++bm) {
      int32_t* lts = cols_.data() + bm * 4 * skp;
      int32_t *lte = lts + skp, *uts = lte + skp, *ute = uts + skp;
      const int32_t* src = idx + bm * s.Sk * s.C;
      for (int64_t j = 0; j < skp; ++j) {
        if (j >= s.Sk) {
          lts[j] = 0, lte[j] = all_rows, uts[j] = 0, ute[j] = 0;
          continue;
        }
        const int32_t* e = src + j * s.C;
        for (int64_t c = 0; c < s.C; ++c) {
          if (e[c] < 0 || e[c] > s.Sq) {
            throw std::invalid_argument(
                "startend_row_indices must lie in [0, Sq=" + std::to_string(s.Sq) +
                "], got " + std::to_string(e[c]) + " at key " + std::to_string(j));
          }
        }
        const int32_t sq = static_cast<int32_t>(s.Sq);
        if (s.causal) {
          lts[j] = e[0], lte[j] = s.C == 2 ? e[1] : sq, uts[j] = 0, ute[j] = 0;
        } else if (s.C == 2) {
          lts[j] = e[0], lte[j] = sq, uts[j] = 0, ute[j] = e[1];
        } else {
          lts[j] = e[0], lte[j] = e[1], uts[j] = e[2], ute[j] = e[3];
        }
      }
      for (int64_t t = 0; t < nkt; ++t) {
        const int64_t j0 = t * kTile, j1 = j0 + kTile;
        TileStats& st = stats_[bm * nkt + t];
        st.lts_min = *std::min_element(lts + j0, lts + j1);
        st.lts_max = *std::max_element(lts + j0, lts + j1);
        st.lte_min = *std::min_element(lte + j0, lte + j1);
        st.lte_max = *std::max_element(lte + j0, lte + j1);
        st.uts_min = *std::min_element(uts + j0, uts + j1);
        st.uts_max = *std::max_element(uts + j0, uts + j1);
        st.ute_min = *std::min_element(ute + j0, ute + j1);
        st.ute_max = *std::max_element(ute + j0, ute + j1);
      }
    }
  }

  // Kind of tile (query tile qt, key tile kt) for batch b, query head h.
  TileKind classify(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
    if (block_ != nullptr) {
      const int64_t bb = b * s_.Hb + s_.block_head(h);
      if (block_[(bb * s_.nbq() + qt / kBlockTiles) * s_.nbk() + kt / kBlockTiles] == 0)
        return kSkip;
    }
    const int64_t r0 = qt * kTile, r1 = std::min(r0 + kTile, s_.Sq);
    const int64_t j0 = kt * kTile, j1 = j0 + kTile;
    const int64_t off = s_.causal_offset();
    if (s_.causal && j0 > r1 - 1 + off) return kSkip;
    const TileStats& t = stats_[(b * s_.Hm + s_.mask_head(h)) * s_.nkt() + kt];
    if (t.lts_max <= r0 && t.lte_min >= r1) return kSkip;
    if (t.uts_max <= r0 && t.ute_min >= r1) return kSkip;
    const bool lt_clear = r1 <= t.lts_min || r0 >= t.lte_max;
    const bool ut_clear = r1 <= t.uts_min || r0 >= t.ute_max;
    const bool causal_clear = !s_.causal || j1 - 1 <= r0 + off;
    return lt_clear && ut_clear && causal_clear ? kDense : kPartial;
  }

  // Sets the masked entries of a transposed score tile sT[key][query] (row stride kTile) to -inf.
  void apply_t(int64_t b, int64_t h, int64_t qt, int64_t kt, float* sT) const {
    const Columns c = columns(b, h, kt);
    const int32_t off = static_cast<int32_t>(s_.causal_offset());
    const f16v ninf = splat(kNegInf);
    for (int jj = 0; jj < kTile; ++jj) {
      const int32_t j = static_cast<int32_t>(kt * kTile + jj);
      const i16v a = splat_i(c.lts[jj]), e = splat_i(c.lte[jj]), u = splat_i(c.uts[jj]),
                 w = splat_i(c.ute[jj]), last_visible = splat_i(j - off);
      for (int v = 0; v < kTile / kLanes; ++v) {
        const i16v i = lanes() + static_cast<int32_t>(qt * kTile + v * kLanes);
        i16v masked = ((i >= a) & (i < e)) | ((i >= u) & (i < w));
        if (s_.causal) masked |= i < last_visible;  // j > i + off
        float* p = sT + jj * kTile + v * kLanes;
        store(p, masked ? ninf : load(p));
      }
    }
  }

  // The same for a score tile s[query][key] (row stride kTile).
  void apply_rows(int64_t b, int64_t h, int64_t qt, int64_t kt, float* s) const {
    constexpr int kVecs = kTile / kLanes;
    const Columns c = columns(b, h, kt);
    const int32_t off = static_cast<int32_t>(s_.causal_offset());
    const f16v ninf = splat(kNegInf);
    i16v a[kVecs], e[kVecs], u[kVecs], w[kVecs], j_off[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      a[v] = load_i(c.lts + v * kLanes), e[v] = load_i(c.lte + v * kLanes);
      u[v] = load_i(c.uts + v * kLanes), w[v] = load_i(c.ute + v * kLanes);
      j_off[v] = lanes() + static_cast<int32_t>(kt * kTile + v * kLanes - off);
    }
    for (int r = 0; r < kTile; ++r) {
      const i16v i = splat_i(static_cast<int32_t>(qt * kTile + r));
      for (int v = 0; v < kVecs; ++v) {
        i16v masked = ((i >= a[v]) & (i < e[v])) | ((i >= u[v]) & (i < w[v]));
        if (s_.causal) masked |= j_off[v] > i;  // j > i + off
        float* p = s + r * kTile + v * kLanes;
        store(p, masked ? ninf : load(p));
      }
    }
  }

 private:
  struct Columns {
    const int32_t *lts, *lte, *uts, *ute;
  };

  // The four column vectors of key tile kt for batch b, query head h.
  Columns columns(int64_t b, int64_t h, int64_t kt) const {
    const int64_t skp = s_.Skp();
    const int32_t* lts = cols_.data() + (b * s_.Hm + s_.mask_head(h)) * 4 * skp + kt * kTile;
    return {lts, lts + skp, lts + 2 * skp, lts + 3 * skp};
  }

  static i16v lanes() { return i16v{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

  Shape s_;
  const int32_t* block_;
  std::vector<int32_t> cols_;    // [B * Hm][4][Skp]: LTS, LTE, UTS, UTE
  std::vector<TileStats> stats_;  // [B * Hm][nkt]
};

}  // namespace flashmask
