// FlashMask forward: FlashAttention-2 loop with an online softmax and tile skipping.
//
//   for each (b, h, query tile)                   <- one task of the parallel loop
//     for each key tile not kSkip:
//       S^T = K (scale log2 e Q)^T                 [key][query], gemm_nt on the packed Q^T tile
//       kPartial: masked entries of S^T = -inf
//       m' = max(m, colmax S^T); P^T = 2^(S^T - m'); l = l 2^(m - m') + colsum P^T
//       O = O 2^(m - m') + P V
//     out = O / l, lse = (m + log2 l) ln 2        (l = 0: out = 0, lse = +inf)
// Scores are kept transposed so that the softmax statistics of 16 query rows sit in one vector
// (no horizontal reductions) and K, V are read in place. Scores live in the log2 domain so every
// exponential is a cheap exp2.
#include <cmath>
#include <limits>

#include "flashmask_kernel.h"
#include "pack.h"

namespace flashmask {

namespace {

constexpr int kVecs = kTile / kLanes;  // vectors per 64 query rows

// Online-softmax update with one transposed score tile; sT becomes P^T in place.
void online_softmax(float* sT, float* m, float* l, float* ob, int64_t Dp) {
  f16v m_use[kVecs], alpha[kVecs], sum[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    f16v mx = splat(kNegInf);
    for (int j = 0; j < kTile; ++j) mx = vmax(mx, load(sT + j * kTile + v * kLanes));
    const f16v m_old = load(m + v * kLanes);
    const f16v m_new = vmax(m_old, mx);
    // A row that has seen nothing keeps m = -inf; subtracting 0 keeps its P at exactly 0.
    m_use[v] = m_new == splat(kNegInf) ? splat(0.0f) : m_new;
    alpha[v] = exp2v(m_old - m_use[v]);
    store(m + v * kLanes, m_new);
    sum[v] = splat(0.0f);
  }
  for (int j = 0; j < kTile; ++j) {
    float* row = sT + j * kTile;
    for (int v = 0; v < kVecs; ++v) {
      const f16v p = exp2v(load(row + v * kLanes) - m_use[v]);
      store(row + v * kLanes, p);
      sum[v] += p;
    }
  }
  for (int v = 0; v < kVecs; ++v) {
    store(l + v * kLanes, load(l + v * kLanes) * alpha[v] + sum[v]);
    for (int i = 0; i < kLanes; ++i) {
      const float a = alpha[v][i];
      if (a == 1.0f) continue;
      float* orow = ob + (v * kLanes + i) * Dp;
      const f16v av = splat(a);
      for (int64_t d = 0; d < Dp; d += kLanes) store(orow + d, load(orow + d) * av);
    }
  }
}

}  // namespace

void forward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* idx,
             const int32_t* block, float* out, float* lse) {
  const ColumnMask mask(s, idx, block);
  const int64_t nqt = s.nqt(), nkt = s.nkt(), D = s.D, Dp = s.Dp();
  const RowTiles keys(k, s.B, s.Sk, s.Hk, D, s.threads);
  const RowTiles values(v, s.B, s.Sk, s.Hk, D, s.threads);
  const float qscale = s.scale * kLog2e;
  const int64_t ntasks = s.B * s.H * nqt;

  ernie5par::TaskQueue tasks(ntasks);
  auto worker = [&] {
    Buffer qT(D * kTile), sT(kTile * kTile), ob(kTile * Dp), ml(2 * kTile);
    float *m = ml.data(), *l = ml.data() + kTile;
    for (int64_t task; tasks.next(task);) {
      // Last query tiles first: under a causal mask they carry the most work.
      const int64_t qt = nqt - 1 - task % nqt, bh = task / nqt;
      const int64_t b = bh / s.H, h = bh % s.H, hk = h / s.group();
      const int64_t r0 = qt * kTile, rows = std::min<int64_t>(kTile, s.Sq - r0);
      transpose_tile(q + ((b * s.Sq + r0) * s.H + h) * D, s.H * D, rows, D, qscale, qT.data());
      std::fill(ob.data(), ob.data() + kTile * Dp, 0.0f);
      std::fill(m, m + kTile, kNegInf);
      std::fill(l, l + kTile, 0.0f);

      for (int64_t t = 0; t < nkt; ++t) {
        const TileKind kind = mask.classify(b, h, qt, t);
        if (kind == kSkip) continue;
        const TileRef kt = keys.tile(b, hk, t), vt = values.tile(b, hk, t);
        gemm_nt(kt.ptr, kt.ld, kTile, D, qT.data(), sT.data());
        if (kind == kPartial) mask.apply_t(b, h, qt, t, sT.data());
        online_softmax(sT.data(), m, l, ob.data(), Dp);
        gemm_nn(sT.data(), 1, kTile, kTile, kTile, vt.ptr, vt.ld, ob.data(), Dp, Dp);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float* dst = out + ((b * s.Sq + r0 + r) * s.H + h) * D;
        scaled_copy(dst, ob.data() + r * Dp, D, inv);
        lse[bh * s.Sq + r0 + r] = l[r] > 0.0f ? (m[r] + std::log2(l[r])) * kLn2
                                              : std::numeric_limits<float>::infinity();
      }
    }
  };
  ernie5par::parallel(ernie5par::team_size(s.threads, ntasks), worker);
}

}  // namespace flashmask
