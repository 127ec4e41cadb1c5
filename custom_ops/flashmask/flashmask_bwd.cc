// FlashMask backward: key tiles outside, query tiles inside, the same tile tests as forward.
//
//   for each (b, kv head, key chunk c)               <- one task of the only parallel loop
//     L_i = lse_i log2 e, delta_i = rowsum(dO * O)_i - d lse_i  for the G query heads of the group
//     for key tile t = c, c + NC, ...                 (round robin: balanced under causal masks)
//       K^T (scaled by scale log2 e) and V^T of tile t, packed once for all G heads
//       for each query head of the GQA group, each query tile not kSkip:
//         S  = Q K^T                       [query][key], Q read in place
//         P  = 2^(S - L)                   dV   += P^T dO
//         dP = dO V^T                      dS    = P (dP - delta)
//         dK += dS^T Q                     dQ_c += dS K
//       dK, dV of tile t are complete: written once (scaled).
//     the task that finishes a group last sums its dQ_c in the fixed order c = 0..NC-1 (NC = 1:
//     the task writes dQ directly); only the 64-row tiles some chunk reached are zeroed and summed.
// Every buffer is owned by exactly one task and NC depends only on the shapes, so the result is
// bit-identical whatever the thread count or timing. Nothing is shared between tasks but the
// inputs, so there is no barrier before the end of the call (on a busy machine every barrier
// waits for the slowest descheduled thread).
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
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

// P = 2^(S - L) in place for a [query][key] tile, L per query (L = +inf: the row sees nothing).
void probabilities(float* s, const float* lse2) {
  for (int r = 0; r < kTile; ++r) {
    const f16v L = splat(lse2[r]);
    for (int v = 0; v < kVecs; ++v) {
      float* p = s + r * kTile + v * kLanes;
      store(p, exp2v(load(p) - L));
    }
  }
}

// dS = P (dP - delta), written over dP; delta = rowsum(dO * O) - d lse per query.
void score_grad(const float* p, float* dp, const float* delta) {
  for (int r = 0; r < kTile; ++r) {
    const f16v dl = splat(delta[r]);
    for (int v = 0; v < kVecs; ++v) {
      const int64_t o = r * kTile + v * kLanes;
      store(dp + o, load(p + o) * (load(dp + o) - dl));
    }
  }
}

// sum_d a[d] b[d]: 16 partial sums then a fixed tree when n is a multiple of 16.
float dot(const float* a, const float* b, int64_t n) {
  if (n % kLanes != 0) {
    float acc = 0.0f;
    for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
    return acc;
  }
  f16v acc = load(a) * load(b);
  for (int64_t d = kLanes; d < n; d += kLanes) acc += load(a + d) * load(b + d);
  return hsum(acc);
}

}  // namespace

void backward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* idx,
              const int32_t* block, const float* out, const float* lse, const float* dout,
              const float* dlse, float* dq, float* dk, float* dv) {
  const ColumnMask mask(s, idx, block);
  const int64_t nqt = s.nqt(), nkt = s.nkt(), D = s.D, Dp = s.Dp(), Sqp = s.Sqp(), G = s.group();
  const int64_t NC = num_chunks(s), BH = s.B * s.H, groups = s.B * s.Hk;
  const float qscale = s.scale * kLog2e;
  // A loss that does not use `out` gives no d out: it is zero.
  std::vector<float> zeros(dout == nullptr ? s.B * s.Sq * s.H * D : 0, 0.0f);
  if (dout == nullptr) dout = zeros.data();
  const RowTiles queries(q, s.B, s.Sq, s.H, D, s.threads);
  const RowTiles grads(dout, s.B, s.Sq, s.H, D, s.threads);
  const RowTiles keys(k, s.B, s.Sk, s.Hk, D, s.threads);
  // dQ partials [NC][B * H][Sqp][Dp]. A task zeroes a 64-row tile of its part when it first adds
  // to it and marks it in `touched` [NC][B * H][nqt]: tiles no key of the chunk reaches are
  // neither written nor summed (and their pages never touched).
  Buffer dq_parts(NC * BH * Sqp * Dp, false);
  std::vector<uint8_t> touched(NC * BH * nqt, 0);
  std::unique_ptr<std::atomic<int>[]> finished(new std::atomic<int>[groups]);
  for (int64_t g = 0; g < groups; ++g) finished[g].store(0, std::memory_order_relaxed);

  // dq rows of the G heads of group (b, hk) = sum over chunks (in chunk order) of the touched
  // partials, scaled; 0 where no chunk touched a tile.
  auto write_dq = [&](int64_t b, int64_t hk) {
    std::vector<const float*> parts(NC);
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      const int64_t bh = b * s.H + h;
      for (int64_t qt = 0; qt < nqt; ++qt) {
        int64_t n = 0;
        for (int64_t c = 0; c < NC; ++c)
          if (touched[(c * BH + bh) * nqt + qt])
            parts[n++] = dq_parts.data() + ((c * BH + bh) * Sqp + qt * kTile) * Dp;
        const int64_t rows = std::min<int64_t>(kTile, s.Sq - qt * kTile);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = dq + ((b * s.Sq + qt * kTile + r) * s.H + h) * D;
          if (n <= 1) {
            if (n == 0) std::fill(dst, dst + D, 0.0f);
            if (n == 1) scaled_copy(dst, parts[0] + r * Dp, D, s.scale);
            continue;
          }
          for (int64_t d = 0; d < D; ++d) {
            float acc = 0.0f;
            for (int64_t c = 0; c < n; ++c) acc += parts[c][r * Dp + d];
            dst[d] = acc * s.scale;
          }
        }
      }
    }
  };

  const int64_t ntasks = groups * NC;
  ernie5par::TaskQueue tasks(ntasks);
  auto worker = [&] {
    Buffer kT(D * kTile), vT(D * kTile), pt(kTile * kTile), dst(kTile * kTile);
    Buffer dk_acc(kTile * Dp), dv_acc(kTile * Dp), stats(2 * G * Sqp);
    float *lse2 = stats.data(), *delta = stats.data() + G * Sqp;
    for (int64_t task; tasks.next(task);) {
      const int64_t c = task % NC, bhk = task / NC, b = bhk / s.Hk, hk = bhk % s.Hk;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g, bh = b * s.H + h;
        for (int64_t i = 0; i < Sqp; ++i) {
          float acc = 0.0f, L = std::numeric_limits<float>::infinity();
          if (i < s.Sq) {
            const int64_t o = ((b * s.Sq + i) * s.H + h) * D;
            acc = dot(out + o, dout + o, D);
            if (dlse != nullptr) acc -= dlse[bh * s.Sq + i];  // d lse_i / d S_ij = P_ij
            L = lse[bh * s.Sq + i] * kLog2e;
          }
          delta[g * Sqp + i] = acc;
          lse2[g * Sqp + i] = L;
        }
      }

      for (int64_t t = c; t < nkt; t += NC) {
        const int64_t j0 = t * kTile, cols = std::min<int64_t>(kTile, s.Sk - j0);
        bool packed = false;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g, bh = b * s.H + h;
          for (int64_t qt = 0; qt < nqt; ++qt) {
            const TileKind kind = mask.classify(b, h, qt, t);
            if (kind == kSkip) continue;
            if (!packed) {
              const float* k0 = k + ((b * s.Sk + j0) * s.Hk + hk) * D;
              const float* v0 = v + ((b * s.Sk + j0) * s.Hk + hk) * D;
              transpose_tile(k0, s.Hk * D, cols, D, qscale, kT.data());
              transpose_tile(v0, s.Hk * D, cols, D, 1.0f, vT.data());
              std::fill(dk_acc.data(), dk_acc.data() + kTile * Dp, 0.0f);
              std::fill(dv_acc.data(), dv_acc.data() + kTile * Dp, 0.0f);
              packed = true;
            }
            const TileRef qr = queries.tile(b, h, qt), gr = grads.tile(b, h, qt);
            const TileRef kr = keys.tile(b, hk, t);
            float *p = pt.data(), *ds = dst.data();
            gemm_nt(qr.ptr, qr.ld, kTile, D, kT.data(), p);
            if (kind == kPartial) mask.apply_rows(b, h, qt, t, p);
            probabilities(p, lse2 + g * Sqp + qt * kTile);
            gemm_nn(p, 1, kTile, kTile, kTile, gr.ptr, gr.ld, dv_acc.data(), Dp, Dp);
            gemm_nt(gr.ptr, gr.ld, kTile, D, vT.data(), ds);
            score_grad(p, ds, delta + g * Sqp + qt * kTile);
            gemm_nn(ds, 1, kTile, kTile, kTile, qr.ptr, qr.ld, dk_acc.data(), Dp, Dp);
            float* dq_t = dq_parts.data() + ((c * BH + bh) * Sqp + qt * kTile) * Dp;
            uint8_t& first = touched[(c * BH + bh) * nqt + qt];
            if (first == 0) {
              std::fill(dq_t, dq_t + kTile * Dp, 0.0f);
              first = 1;
            }
            gemm_nn(ds, kTile, 1, kTile, kTile, kr.ptr, kr.ld, dq_t, Dp, Dp);
          }
        }
        for (int64_t jj = 0; jj < cols; ++jj) {
          const int64_t o = ((b * s.Sk + j0 + jj) * s.Hk + hk) * D;
          if (!packed) {  // no query sees these keys
            std::fill(dk + o, dk + o + D, 0.0f);
            std::fill(dv + o, dv + o + D, 0.0f);
            continue;
          }
          scaled_copy(dk + o, dk_acc.data() + jj * Dp, D, s.scale);
          std::copy(dv_acc.data() + jj * Dp, dv_acc.data() + jj * Dp + D, dv + o);
        }
      }
      // The last chunk of the group to finish sums the partials (acq_rel: it sees their writes).
      if (NC == 1 || finished[bhk].fetch_add(1, std::memory_order_acq_rel) == NC - 1)
        write_dq(b, hk);
    }
  };
  ernie5par::parallel(ernie5par::team_size(s.threads, ntasks), worker);
}

}  // namespace flashmask
