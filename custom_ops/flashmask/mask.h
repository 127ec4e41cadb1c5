// Problem shape and the FlashMask column representation.
//
// Every key column j carries two masked row ranges, [LTS_j, LTE_j) and [UTS_j, UTE_j); the
// causal flag adds j > i + (Sk - Sq). ColumnMask expands startend_row_indices [B, Hm, Sk, C]
// into those four vectors (padding columns past Sk mask every row) and keeps, per key tile,
// the min and max of each vector. classify() turns them into one of three tile kinds:
//
//   kSkip     every (row, column) of the tile is masked: no K/V read, no product
//   kPartial  some are: compute, then mask element-wise (apply)
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

  int64_t group() const { return H / Hk; }
  int64_t nqt() const { return (Sq + kTile - 1) / kTile; }
  int64_t nkt() const { return (Sk + kTile - 1) / kTile; }
  int64_t Sqp() const { return nqt() * kTile; }
  int64_t Skp() const { return nkt() * kTile; }
  int64_t Dp() const { return (D + kLanes - 1) / kLanes * kLanes; }
  int64_t causal_offset() const { return Sk - Sq; }  // bottom-right alignment
  int64_t mask_head(int64_t h) const { return Hm == 1 ? 0 : Hm == H ? h : h / group(); }
};

enum TileKind { kSkip, kPartial, kDense };

struct TileStats {
  int32_t lts_min, lts_max, lte_min, lte_max, uts_min, uts_max, ute_min, ute_max;
};

class ColumnMask {
 public:
  ColumnMask(const Shape& s, const int32_t* idx) : s_(s) {
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

  // bm = b * Hm + mask head.
  TileKind classify(int64_t bm, int64_t qt, int64_t kt) const {
    const int64_t r0 = qt * kTile, r1 = std::min(r0 + kTile, s_.Sq);
    const int64_t j0 = kt * kTile, j1 = j0 + kTile;
    const int64_t off = s_.causal_offset();
    if (s_.causal && j0 > r1 - 1 + off) return kSkip;
    const TileStats& t = stats_[bm * s_.nkt() + kt];
    if (t.lts_max <= r0 && t.lte_min >= r1) return kSkip;
    if (t.uts_max <= r0 && t.ute_min >= r1) return kSkip;
    const bool lt_clear = r1 <= t.lts_min || r0 >= t.lte_max;
    const bool ut_clear = r1 <= t.uts_min || r0 >= t.ute_max;
    const bool causal_clear = !s_.causal || j1 - 1 <= r0 + off;
    return lt_clear && ut_clear && causal_clear ? kDense : kPartial;
  }

  // Sets the masked entries of a transposed score tile sT[key][query] (row stride kTile) to -inf.
  void apply(int64_t bm, int64_t qt, int64_t kt, float* sT) const {
    const int64_t skp = s_.Skp();
    const int32_t* lts = cols_.data() + bm * 4 * skp + kt * kTile;
    const int32_t *lte = lts + skp, *uts = lte + skp, *ute = uts + skp;
    const int32_t off = static_cast<int32_t>(s_.causal_offset());
    const i16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const f16v ninf = splat(kNegInf);
    for (int jj = 0; jj < kTile; ++jj) {
      const int32_t j = static_cast<int32_t>(kt * kTile + jj);
      const i16v a = splat_i(lts[jj]), b = splat_i(lte[jj]), c = splat_i(uts[jj]),
                 d = splat_i(ute[jj]), last_visible = splat_i(j - off);
      for (int v = 0; v < kTile / kLanes; ++v) {
        const i16v i = lane + static_cast<int32_t>(qt * kTile + v * kLanes);
        i16v masked = ((i >= a) & (i < b)) | ((i >= c) & (i < d));
        if (s_.causal) masked |= i < last_visible;  // j > i + off
        float* p = sT + jj * kTile + v * kLanes;
        store(p, masked ? ninf : load(p));
      }
    }
  }

 private:
  Shape s_;
  std::vector<int32_t> cols_;    // [B * Hm][4][Skp]: LTS, LTE, UTS, UTE
  std::vector<TileStats> stats_;  // [B * Hm][nkt]
};

}  // namespace flashmask
