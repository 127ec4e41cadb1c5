// Forward and backward of the routed experts.
//
// Forward, one task per (expert, tile of up to kTile of its rows), tasks spread over threads:
//
//   x rows (by index) --gemm--> h tile [R, 2F] --swiglu--> act [R, F] --gemm--> out rows (by index)
//   then per token: y[t] = sum_k weights[t, k] * out[t * K + k]
//
// Backward, one task per chunk of an expert's rows (it owns a weight gradient: the expert's output
// for the first chunk, a partial buffer for later ones), tiles in row order:
//
//   g    = dy rows . Wd^T                      [R, F]   (dy read by index)
//   d weights[n] = <g, act>;   d act = weights[n] * g;   d h from swiglu'   [R, 2F]
//   d Wd  += (weights * act)^T . dy rows       d Wgu += x rows^T . d h
//   dx rows (by index) = d h . Wgu^T,  then per token dx[t] = sum_k dx rows[t * K + k]
//
// The per-assignment rows (out, dx rows) make the final sums per token race-free and ordered.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/parallel.h"
#include "gemm.h"
#include "moe_kernel.h"

namespace moe {

namespace {

using ernie5par::parallel;
using ernie5par::parallel_for;
using ernie5par::TaskQueue;
using ernie5par::team_size;

constexpr int64_t kTile = 96;  // rows per tile: a multiple of kRows; tiles stay in L2
// Backward splits an expert's rows into chunks of at least kMinChunkRows, and into at most about
// kMaxChunks chunks in all, so that a few busy experts still keep every thread busy.
constexpr int64_t kMinChunkRows = 1024;
constexpr int64_t kMaxChunks = 16;

struct Task {
  int64_t expert, begin, end;  // rows [begin, end) of order[]
};

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// act[f] = silu(gate[f]) * up[f], gate = hrow[0:F], up = hrow[F:2F].
void swiglu_row(const float* hrow, int64_t F, float* act) {
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
    const f16v g = load(hrow + f), u = load(hrow + F + f);
    store(act + f, g * sigmoidv(g) * u);
  }
  for (; f < F; ++f) act[f] = hrow[f] * sigmoid(hrow[f]) * hrow[F + f];
}

// From g = d(out row) . Wd^T and the saved h row: d weight (returned), w * act and d h.
float swiglu_row_grad(const float* hrow, const float* g, float w, int64_t F, float* wact,
                      float* dh) {
  f16v dot_v = splat(0.0f);
  float dot = 0.0f;
  const f16v wv = splat(w), one = splat(1.0f);
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes) {
    const f16v gate = load(hrow + f), up = load(hrow + F + f), gv = load(g + f);
    const f16v s = sigmoidv(gate), silu = gate * s, act = silu * up;
    dot_v += gv * act;
    store(wact + f, wv * act);
    const f16v dact = wv * gv;
    store(dh + f, dact * up * s * (one + gate * (one - s)));
    store(dh + F + f, dact * silu);
  }
  for (; f < F; ++f) {
    const float gate = hrow[f], up = hrow[F + f], s = sigmoid(gate), silu = gate * s;
    const float act = silu * up;
    dot += g[f] * act;
    wact[f] = w * act;
    const float dact = w * g[f];
    dh[f] = dact * up * s * (1.0f + gate * (1.0f - s));
    dh[F + f] = dact * silu;
  }
  for (int l = 0; l < kLanes; ++l) dot += dot_v[l];
  return dot;
}

// Row pointers of a row-major [rows, cols] matrix.
void row_pointers(const float* base, int64_t rows, int64_t cols, std::vector<const float*>& out) {
  out.resize(rows);
  for (int64_t r = 0; r < rows; ++r) out[r] = base + r * cols;
}

void row_pointers(float* base, int64_t rows, int64_t cols, std::vector<float*>& out) {
  out.resize(rows);
  for (int64_t r = 0; r < rows; ++r) out[r] = base + r * cols;
}

// dst[c][r] = src[r][c] for a row-major [rows, cols] src.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
      for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c) dst[c * rows + r] = src[r * cols + c];
}

// dst[t] = sum over kept k of scale(t, k) * rows[t * K + k] (scale = 1 when weights is null).
void sum_per_token(const Dims& d, const std::vector<uint8_t>& kept, const float* rows,
                   const float* weights, float* dst) {
  const int64_t M = d.M, K = d.K;
  // Tasks of 64 tokens from a queue: on a shared machine a descheduled thread must not hold up
  // the others.
  parallel_for(d.threads, d.T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* out = dst + t * M;
      std::fill(out, out + M, 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = t * K + k;
        if (!kept[n]) continue;
        const float w = weights != nullptr ? weights[n] : 1.0f;
        const float* src = rows + n * M;
        for (int64_t m = 0; m < M; ++m) out[m] += w * src[m];
      }
    }
  });
}

std::vector<uint8_t> kept_mask(const Dims& d, const int32_t* order, const int32_t* offsets) {
  std::vector<uint8_t> kept(d.T * d.K, 0);
  for (int32_t i = 0; i < offsets[d.E]; ++i) kept[order[i]] = 1;
  return kept;
}

}  // namespace

void route(const Dims& d, const int64_t* ids, int32_t* order, int32_t* offsets) {
  const int64_t N = d.T * d.K;
  std::vector<int64_t> count(d.E, 0);
  for (int64_t n = 0; n < N; ++n) {
    if (ids[n] < 0 || ids[n] >= d.E)
      throw std::invalid_argument("expert id " + std::to_string(ids[n]) + " outside [0, " +
                                  std::to_string(d.E) + ")");
    ++count[ids[n]];
  }
  offsets[0] = 0;
  for (int64_t e = 0; e < d.E; ++e) {
    const int64_t kept = d.capacity > 0 ? std::min(count[e], d.capacity) : count[e];
    offsets[e + 1] = static_cast<int32_t>(offsets[e] + kept);
  }
  std::vector<int64_t> fill(offsets, offsets + d.E);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t e = ids[n];
    if (fill[e] < offsets[e + 1]) order[fill[e]++] = static_cast<int32_t>(n);
  }
  for (int64_t i = offsets[d.E]; i < N; ++i) order[i] = -1;
}

void forward(const Dims& d, const float* x, const float* w_gate_up, const float* w_down,
             const float* weights, const int32_t* order, const int32_t* offsets, float* y,
             float* h, float* out) {
  const int64_t M = d.M, F = d.F, K = d.K, N = d.T * d.K;
  std::vector<Task> tasks;
  for (int64_t e = 0; e < d.E; ++e)
    for (int64_t b = offsets[e]; b < offsets[e + 1]; b += kTile)
      tasks.push_back({e, b, std::min<int64_t>(b + kTile, offsets[e + 1])});
  // Rows of dropped assignments are never read; zero them so the saved tensor is deterministic.
  std::memset(h + offsets[d.E] * 2 * F, 0, sizeof(float) * (N - offsets[d.E]) * 2 * F);

  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  TaskQueue queue(ntasks);
  auto worker = [&] {
    std::vector<float> act(kTile * F);
    std::vector<const float*> x_rows(kTile), act_rows, wgu_rows, wd_rows;
    std::vector<float*> h_rows(kTile), out_rows(kTile);
    row_pointers(act.data(), kTile, F, act_rows);
    for (int64_t i; queue.next(i);) {
      const Task& task = tasks[i];
      const int64_t R = task.end - task.begin;
      row_pointers(w_gate_up + task.expert * M * 2 * F, M, 2 * F, wgu_rows);
      row_pointers(w_down + task.expert * F * M, F, M, wd_rows);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = order[task.begin + r];
        x_rows[r] = x + (n / K) * M;
        h_rows[r] = h + (task.begin + r) * 2 * F;
        out_rows[r] = out + n * M;
      }
      gemm_nn(x_rows.data(), R, M, wgu_rows.data(), 2 * F, h_rows.data(), false);
      for (int64_t r = 0; r < R; ++r) swiglu_row(h_rows[r], F, act.data() + r * F);
      gemm_nn(act_rows.data(), R, F, wd_rows.data(), M, out_rows.data(), false);
    }
  };
  parallel(team_size(d.threads, ntasks), worker);
  sum_per_token(d, kept_mask(d, order, offsets), out, weights, y);
}

std::vector<Chunk> backward_chunks(const Dims& d, const int32_t* offsets) {
  // Rows per chunk from the shapes only (never the thread count), so the summation order and
  // hence the gradients are the same for any number of threads.
  const int64_t wanted = (offsets[d.E] + kMaxChunks - 1) / kMaxChunks;
  const int64_t rows = (std::max(kMinChunkRows, wanted) + kTile - 1) / kTile * kTile;
  std::vector<Chunk> chunks;
  int64_t slots = 0;
  for (int64_t e = 0; e < d.E; ++e) {
    chunks.push_back({e, offsets[e], std::min<int64_t>(offsets[e] + rows, offsets[e + 1]), -1});
    for (int64_t b = offsets[e] + rows; b < offsets[e + 1]; b += rows)
      chunks.push_back({e, b, std::min<int64_t>(b + rows, offsets[e + 1]), slots++});
  }
  return chunks;
}

int64_t backward_scratch_floats(const Dims& d, const int32_t* offsets) {
  int64_t slots = 0;
  for (const Chunk& c : backward_chunks(d, offsets)) slots += c.slot >= 0;
  return slots * 3 * d.M * d.F;
}

void backward(const Dims& d, const float* x, const float* w_gate_up, const float* w_down,
              const float* weights, const int32_t* order, const int32_t* offsets, const float* h,
              const float* dy, float* dx, float* d_gate_up, float* d_down, float* d_weights,
              float* dx_rows, float* partial) {
  const int64_t M = d.M, F = d.F, K = d.K, W = 3 * M * F;  // W: floats of one expert's weights
  std::fill(d_weights, d_weights + d.T * K, 0.0f);
  std::vector<Chunk> chunks = backward_chunks(d, offsets);
  // Longest chunks first so that the last tasks are short.
  std::stable_sort(chunks.begin(), chunks.end(), [](const Chunk& a, const Chunk& b) {
    return a.end - a.begin > b.end - b.begin;
  });

  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  TaskQueue queue(nchunks);
  auto worker = [&] {
    std::vector<float> wd_t(M * F), wgu_t(2 * F * M), g(kTile * F), wact(kTile * F),
        dh(kTile * 2 * F);
    std::vector<const float*> x_rows(kTile), dy_rows(kTile), wd_t_rows, wgu_t_rows, wact_rows,
        dh_rows;
    std::vector<float*> g_rows, dd_rows, dgu_rows, dx_out(kTile);
    row_pointers(wd_t.data(), M, F, wd_t_rows);
    row_pointers(wgu_t.data(), 2 * F, M, wgu_t_rows);
    row_pointers(wact.data(), kTile, F, wact_rows);
    row_pointers(dh.data(), kTile, 2 * F, dh_rows);
    row_pointers(g.data(), kTile, F, g_rows);
    for (int64_t i; queue.next(i);) {
      const Chunk& c = chunks[i];
      const int64_t e = c.expert;
      // The first chunk of an expert sums into the output, the others into their own partials.
      float* dgu = c.slot < 0 ? d_gate_up + e * M * 2 * F : partial + c.slot * W;
      float* dd = c.slot < 0 ? d_down + e * F * M : partial + c.slot * W + M * 2 * F;
      std::fill(dgu, dgu + M * 2 * F, 0.0f);
      std::fill(dd, dd + F * M, 0.0f);
      if (c.begin == c.end) continue;
      transpose(w_down + e * F * M, F, M, wd_t.data());
      transpose(w_gate_up + e * M * 2 * F, M, 2 * F, wgu_t.data());
      row_pointers(dd, F, M, dd_rows);
      row_pointers(dgu, M, 2 * F, dgu_rows);
      for (int64_t b = c.begin; b < c.end; b += kTile) {
        const int64_t R = std::min<int64_t>(kTile, c.end - b);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = order[b + r];
          x_rows[r] = x + (n / K) * M;
          dy_rows[r] = dy + (n / K) * M;
          dx_out[r] = dx_rows + n * M;
        }
        gemm_nn(dy_rows.data(), R, M, wd_t_rows.data(), F, g_rows.data(), false);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t n = order[b + r];
          d_weights[n] = swiglu_row_grad(h + (b + r) * 2 * F, g_rows[r], weights[n], F,
                                         wact.data() + r * F, dh.data() + r * 2 * F);
        }
        gemm_tn(wact_rows.data(), F, R, dy_rows.data(), M, dd_rows.data(), true);
        gemm_tn(x_rows.data(), M, R, dh_rows.data(), 2 * F, dgu_rows.data(), true);
        gemm_nn(dh_rows.data(), R, 2 * F, wgu_t_rows.data(), M, dx_out.data(), false);
      }
    }
  };
  parallel(team_size(d.threads, nchunks), worker);

  // Partials of the later chunks, added in chunk order: one region over the 3F runs of M floats
  // (d Wgu then d Wd) of every expert that has partials; each run adds its slots in slot order.
  std::vector<int64_t> first_slot(d.E + 1, 0);  // slots of expert e: [first_slot[e], [e + 1])
  for (const Chunk& c : backward_chunks(d, offsets))
    if (c.slot >= 0) first_slot[c.expert + 1] = c.slot + 1;
  for (int64_t e = 0; e < d.E; ++e) first_slot[e + 1] = std::max(first_slot[e + 1], first_slot[e]);
  if (first_slot[d.E] > 0) {
    parallel_for(d.threads, d.E * 3 * F, F, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e = r / (3 * F), row = r % (3 * F);
        if (first_slot[e] == first_slot[e + 1]) continue;
        float* dst = row < 2 * F ? d_gate_up + e * M * 2 * F + row * M
                                 : d_down + e * F * M + (row - 2 * F) * M;
        for (int64_t slot = first_slot[e]; slot < first_slot[e + 1]; ++slot) {
          const float* add = partial + slot * W + row * M;
          for (int64_t m = 0; m < M; ++m) dst[m] += add[m];
        }
      }
    });
  }
  sum_per_token(d, kept_mask(d, order, offsets), dx_rows, nullptr, dx);
}

}  // namespace moe
