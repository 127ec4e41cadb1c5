// FlashMask backward: key tiles outside, query tiles inside, the same tile tests as forward.
//
//   for each (b, kv head, key chunk c)               <- one OpenMP task
//     for key tile t = c, c + NC, ...                 (round robin: balanced under causal masks)
//       for each query head of the GQA group, each query tile not kSkip:
//         P^T  = 2^(S^T - lse log2 e)     dV   += P^T dO
//         dP^T = V dO^T                    dS^T  = P^T (dP^T - rowsum(dO * O) + d lse)
//         dK  += dS^T Q scale              dQ_c += dS K scale
//     dK, dV of tile t are complete: written once.
//   dQ = sum_c dQ_c in the fixed order c = 0..NC-1.
// Tiles are transposed ([key][query]) as in the forward pass. Every buffer is owned by exactly one
// task and NC depends only on the shapes, so the result is bit-identical whatever the thread
// count or timing.
#include <cmath>
#include <limits>
#include <vector>

#include "flashmask_kernel.h"
#include "pack.h"

namespace flashmask {

namespace {

// Number of key-tile chunks: enough independent tasks to spread over threads, bounded memory.
int64_t num_chunks(const Shape& s) {
  const int64_t want = (16 + s.B * s.Hk - 1) / (s.B * s.Hk);
  return std::max<int64_t>(1, std::min<int64_t>({want, s.nkt(), 8}));
}

constexpr int kVecs = kTile / kLanes;

// P^T = 2^(S^T - L) in place, L per query (rows with L = +inf see nothing: P = 0).
void probabilities(float* sT, const float* lse2) {
  f16v L[kVecs];
  for (int v = 0; v < kVecs; ++v) L[v] = load(lse2 + v * kLanes);
  for (int j = 0; j < kTile; ++j)
    for (int v = 0; v < kVecs; ++v) {
      float* p = sT + j * kTile + v * kLanes;
      store(p, exp2v(load(p) - L[v]));
    }
}

// dS^T = P^T (dP^T - delta), written over dP^T; delta = rowsum(dO * O) - d lse.
void score_grad(const float* pT, float* dpT, const float* delta) {
  f16v dl[kVecs];
  for (int v = 0; v < kVecs; ++v) dl[v] = load(delta + v * kLanes);
  for (int j = 0; j < kTile; ++j)
    for (int v = 0; v < kVecs; ++v) {
      const int64_t o = j * kTile + v * kLanes;
      store(dpT + o, load(pT + o) * (load(dpT + o) - dl[v]));
    }
}

}  // namespace

void backward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* idx,
              const float* out, const float* lse, const float* dout, const float* dlse,
              float* dq, float* dk, float* dv) {
  const ColumnMask mask(s, idx);
  const int64_t nqt = s.nqt(), nkt = s.nkt(), D = s.D, Dp = s.Dp();
  const int64_t Sqp = s.Sqp(), BH = s.B * s.H, G = s.group();
  const int64_t NC = num_chunks(s);
  const float qscale = s.scale * kLog2e;

  const RowTiles keys(k, s.B, s.Sk, s.Hk, D, s.threads), values(v, s.B, s.Sk, s.Hk, D, s.threads);
  // A loss that does not use `out` gives no d out: it is zero.
  std::vector<float> zeros(dout == nullptr ? s.B * s.Sq * s.H * D : 0, 0.0f);
  if (dout == nullptr) dout = zeros.data();
  const RowTiles queries(q, s.B, s.Sq, s.H, D, s.threads), grads(dout, s.B, s.Sq, s.H, D, s.threads);
  Buffer qT(BH * nqt * D * kTile), doT(BH * nqt * D * kTile);
  Buffer lse2(BH * Sqp), delta(BH * Sqp), dq_parts(NC * BH * Sqp * Dp);
  pack_tiles_t(q, s.B, s.Sq, s.H, D, qscale, qT.data(), s.threads);
  pack_tiles_t(dout, s.B, s.Sq, s.H, D, 1.0f, doT.data(), s.threads);

#pragma omp parallel for num_threads(s.threads) schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t b = bh / s.H, h = bh % s.H;
    for (int64_t i = 0; i < Sqp; ++i) {
      float acc = 0.0f, L = std::numeric_limits<float>::infinity();
      if (i < s.Sq) {
        const float* o = out + ((b * s.Sq + i) * s.H + h) * D;
        const float* g = dout + ((b * s.Sq + i) * s.H + h) * D;
        for (int64_t d = 0; d < D; ++d) acc += o[d] * g[d];
        if (dlse != nullptr) acc -= dlse[bh * s.Sq + i];  // d lse_i / d S_ij = P_ij
        L = lse[bh * s.Sq + i] * kLog2e;
      }
      delta.data()[bh * Sqp + i] = acc;
      lse2.data()[bh * Sqp + i] = L;
    }
  }

  const int64_t ntasks = s.B * s.Hk * NC;
#pragma omp parallel num_threads(s.threads)
  {
    Buffer pT(kTile * kTile), dsT(kTile * kTile), dk_acc(kTile * Dp), dv_acc(kTile * Dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      const int64_t c = task % NC, bhk = task / NC, b = bhk / s.Hk, hk = bhk % s.Hk;
      for (int64_t t = c; t < nkt; t += NC) {
        std::fill(dk_acc.data(), dk_acc.data() + kTile * Dp, 0.0f);
        std::fill(dv_acc.data(), dv_acc.data() + kTile * Dp, 0.0f);
        const TileRef kt = keys.tile(b, hk, t), vt = values.tile(b, hk, t);
        for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const int64_t bh = b * s.H + h, bm = b * s.Hm + s.mask_head(h);
          for (int64_t qt = 0; qt < nqt; ++qt) {
            const TileKind kind = mask.classify(bm, qt, t);
            if (kind == kSkip) continue;
            const int64_t row0 = bh * Sqp + qt * kTile;
            const TileRef qr = queries.tile(b, h, qt), gr = grads.tile(b, h, qt);
            gemm_nt(kt.ptr, kt.ld, kTile, D, qT.data() + (bh * nqt + qt) * D * kTile, pT.data());
            if (kind == kPartial) mask.apply(bm, qt, t, pT.data());
            probabilities(pT.data(), lse2.data() + row0);
            gemm_nn(pT.data(), kTile, 1, kTile, kTile, gr.ptr, gr.ld, dv_acc.data(), Dp, Dp);
            gemm_nt(vt.ptr, vt.ld, kTile, D, doT.data() + (bh * nqt + qt) * D * kTile,
                    dsT.data());
            score_grad(pT.data(), dsT.data(), delta.data() + row0);
            gemm_nn(dsT.data(), kTile, 1, kTile, kTile, qr.ptr, qr.ld, dk_acc.data(), Dp, Dp);
            float* dq_t = dq_parts.data() + (c * BH * Sqp + row0) * Dp;
            gemm_nn(dsT.data(), 1, kTile, kTile, kTile, kt.ptr, kt.ld, dq_t, Dp, Dp);
          }
        }
        const int64_t cols = std::min<int64_t>(kTile, s.Sk - t * kTile);
        for (int64_t jj = 0; jj < cols; ++jj) {
          const int64_t o = ((b * s.Sk + t * kTile + jj) * s.Hk + hk) * D;
          for (int64_t d = 0; d < D; ++d) {
            dk[o + d] = dk_acc.data()[jj * Dp + d] * s.scale;
            dv[o + d] = dv_acc.data()[jj * Dp + d];
          }
        }
      }
    }
  }

#pragma omp parallel for num_threads(s.threads) schedule(static)
  for (int64_t bi = 0; bi < s.B * s.Sq; ++bi) {
    const int64_t b = bi / s.Sq, i = bi % s.Sq;
    for (int64_t h = 0; h < s.H; ++h) {
      float* dst = dq + (bi * s.H + h) * D;
      const int64_t row = (b * s.H + h) * Sqp + i;
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int64_t c = 0; c < NC; ++c) acc += dq_parts.data()[(c * BH * Sqp + row) * Dp + d];
        dst[d] = acc * s.scale;
      }
    }
  }
}

}  // namespace flashmask
