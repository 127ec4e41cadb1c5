// Per-key-block log-sum-exp of a few query rows: the estimator of RRAttention's block selection
// (paddle_ernie5/ops/rr_attention.py), registered as `flashmask_block_lse_cpu`.
//
//   flashmask_block_lse_cpu(q [B, H, N, D], k [B, T, Hk, D], limit [H, N] int32;
//                           block, softmax_scale) -> lse [B, H, J, N], J = ceil(T / block)
//
//   lse[b, h, j, n] = log sum over the key columns c of block j with c <= limit[h, n] of
//                     exp(softmax_scale * q[b, h, n] . k[b, c, h / (H / Hk)])
//                   = -inf when no such column exists (also for limit < 0).
//
// Scores only, no values: FlashMask's forward would also multiply by V and repeat each row once
// per key block. Tasks are (b, h, tile of 16 rows); a tile's rows are the 16 lanes of a vector, its
// query tile is transposed once, and K is read in place, 8 keys at a time (8 independent FMA
// chains). Blocks past the tile's largest limit are not visited (their lse is -inf), and the
// per-lane limit test runs only on blocks that reach past the tile's smallest limit. The result of
// a lane depends on its own row only, so it does not change with the tiling or the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/parallel.h"
#include "paddle/extension.h"
#include "simd.h"

namespace {

using flashmask::f16v;
using flashmask::i16v;
using flashmask::kLanes;
using flashmask::kLn2;
using flashmask::kLog2e;
using flashmask::kNegInf;
using flashmask::splat;

constexpr int kKeys = 8;  // keys scored together (independent accumulators)

struct Dims {
  int64_t B, H, N, D, T, Hk, block, J;
  float scale;  // softmax_scale * log2(e): scores in base 2
};

// One task: rows n0 .. n0 + 16 of head h of batch b.
void tile(const Dims& s, const float* q, const float* k, const int32_t* limit, float* lse,
          int64_t b, int64_t h, int64_t n0, float* qt, float* scores) {
  const int64_t rows = std::min<int64_t>(kLanes, s.N - n0);
  const int64_t hk = h / (s.H / s.Hk);
  int32_t lim[kLanes];
  for (int r = 0; r < kLanes; ++r) lim[r] = limit[h * s.N + n0 + std::min<int64_t>(r, rows - 1)];
  const int32_t lo = *std::min_element(lim, lim + kLanes);
  const int32_t hi = *std::max_element(lim, lim + kLanes);
  i16v lim_v;
  std::memcpy(&lim_v, lim, sizeof(lim_v));
  const float* qrow = q + ((b * s.H + h) * s.N + n0) * s.D;
  for (int64_t d = 0; d < s.D; ++d) {
    for (int r = 0; r < kLanes; ++r) {
      qt[d * kLanes + r] = qrow[std::min<int64_t>(r, rows - 1) * s.D + d] * s.scale;
    }
  }
  const int64_t row_stride = s.Hk * s.D;
  const float* kbase = k + (b * s.T * s.Hk + hk) * s.D;
  float* out = lse + (b * s.H + h) * s.J * s.N + n0;
  const int64_t j_end = hi < 0 ? 0 : std::min<int64_t>(s.J, hi / s.block + 1);
  for (int64_t j = 0; j < s.J; ++j) {
    float res[kLanes];
    if (j >= j_end) {
      std::fill(res, res + kLanes, kNegInf);
    } else {
      const int64_t c0 = j * s.block;
      const int64_t c1 = std::min<int64_t>(std::min<int64_t>(c0 + s.block, s.T), int64_t{hi} + 1);
      int64_t c = c0;
      for (; c + kKeys <= c1; c += kKeys) {
        f16v acc[kKeys] = {};
        const float* kc = kbase + c * row_stride;
        for (int64_t d = 0; d < s.D; ++d) {
          const f16v qd = flashmask::load(qt + d * kLanes);
          for (int i = 0; i < kKeys; ++i) acc[i] += splat(kc[i * row_stride + d]) * qd;
        }
        for (int i = 0; i < kKeys; ++i) flashmask::store(scores + (c - c0 + i) * kLanes, acc[i]);
      }
      for (; c < c1; ++c) {
        f16v acc = {};
        const float* kc = kbase + c * row_stride;
        for (int64_t d = 0; d < s.D; ++d) acc += splat(kc[d]) * flashmask::load(qt + d * kLanes);
        flashmask::store(scores + (c - c0) * kLanes, acc);
      }
      const int64_t n = c1 - c0;
      if (c1 - 1 > lo) {  // some lane's limit falls inside the block: mask columns past it
        for (int64_t i = 0; i < n; ++i) {
          const f16v v = flashmask::load(scores + i * kLanes);
          const i16v col = flashmask::splat_i(static_cast<int32_t>(c0 + i));
          flashmask::store(scores + i * kLanes, col > lim_v ? splat(kNegInf) : v);
        }
      }
      f16v m = splat(kNegInf);
      for (int64_t i = 0; i < n; ++i) {
        m = flashmask::vmax(m, flashmask::load(scores + i * kLanes));
      }
      const f16v m_safe = m == splat(kNegInf) ? splat(0.0f) : m;
      f16v sum = splat(0.0f);
      for (int64_t i = 0; i < n; ++i) {
        sum += flashmask::exp2v(flashmask::load(scores + i * kLanes) - m_safe);
      }
      for (int r = 0; r < kLanes; ++r) {
        res[r] = sum[r] > 0.0f ? (m_safe[r] + std::log2(sum[r])) * kLn2 : kNegInf;
      }
    }
    for (int r = 0; r < rows; ++r) out[j * s.N + r] = res[r];
  }
}

std::vector<paddle::Tensor> BlockLseForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                            const paddle::Tensor& limit, int block,
                                            float softmax_scale) {
  PD_CHECK(q.is_cpu() && k.is_cpu() && limit.is_cpu(), "flashmask_block_lse_cpu: CPU tensors");
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && k.dtype() == paddle::DataType::FLOAT32,
           "flashmask_block_lse_cpu: q and k must be float32");
  PD_CHECK(limit.dtype() == paddle::DataType::INT32, "flashmask_block_lse_cpu: limit is int32");
  const auto qs = q.shape(), ks = k.shape(), ls = limit.shape();
  PD_CHECK(qs.size() == 4 && ks.size() == 4 && ls.size() == 2,
           "flashmask_block_lse_cpu: q [B, H, N, D], k [B, T, Hk, D], limit [H, N]");
  Dims s{qs[0], qs[1], qs[2], qs[3], ks[1], ks[2], block, 0, softmax_scale * kLog2e};
  PD_CHECK(ks[0] == s.B && ks[3] == s.D, "flashmask_block_lse_cpu: q and k disagree on B or D");
  PD_CHECK(s.Hk > 0 && s.H % s.Hk == 0, "flashmask_block_lse_cpu: H must be a multiple of Hk");
  PD_CHECK(ls[0] == s.H && ls[1] == s.N, "flashmask_block_lse_cpu: limit must be [H, N]");
  PD_CHECK(block > 0, "flashmask_block_lse_cpu: block must be positive");
  s.J = (s.T + block - 1) / block;
  auto lse = paddle::empty({s.B, s.H, s.J, s.N}, paddle::DataType::FLOAT32, q.place());
  if (s.N == 0 || s.J == 0) return {lse};
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const int32_t* lp = limit.data<int32_t>();
  float* out = lse.data<float>();
  const int64_t tiles = (s.N + kLanes - 1) / kLanes;
  const int64_t ntasks = s.B * s.H * tiles;
  ernie5par::TaskQueue tasks(ntasks);
  auto worker = [&] {
    std::vector<float> qt(s.D * kLanes), scores(s.block * kLanes);
    for (int64_t t; tasks.next(t);) {
      const int64_t n0 = (t % tiles) * kLanes;
      const int64_t bh = t / tiles;
      tile(s, qp, kp, lp, out, bh / s.H, bh % s.H, n0, qt.data(), scores.data());
    }
  };
  ernie5par::parallel(ernie5par::team_size(ernie5par::env_threads(), ntasks), worker);
  return {lse};
}

std::vector<std::vector<int64_t>> BlockLseShape(const std::vector<int64_t>& q,
                                                const std::vector<int64_t>& k,
                                                const std::vector<int64_t>& limit, int block,
                                                float softmax_scale) {
  return {{q[0], q[1], (k[1] + block - 1) / block, q[2]}};
}

std::vector<paddle::DataType> BlockLseDtype(const paddle::DataType& q, const paddle::DataType& k,
                                            const paddle::DataType& limit) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace

PD_BUILD_OP(flashmask_block_lse_cpu)
    .Inputs({"Q", "K", "Limit"})
    .Outputs({"LSE"})
    .Attrs({"block: int", "softmax_scale: float"})
    .SetKernelFn(PD_KERNEL(BlockLseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(BlockLseShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BlockLseDtype));
