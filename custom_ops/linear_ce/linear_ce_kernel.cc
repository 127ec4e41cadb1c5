// Forward and backward of the output projection + cross-entropy, a tile of logits at a time.
//
// The rows are cut into tiles of kRowTile rows, the vocabulary into tiles of kColTile columns.
// Both passes work on tasks that own a rectangle of whole tiles; how many and which depend on the
// shapes only, so results never depend on the thread count.
//
// Forward, a task = (row tile, column group); online logsumexp over the group's column tiles:
//
//   logits tile = h rows . w_MV[:, cols]     per row: running max m, running sum s of exp(l - m)
//   then per row, over the groups in order:  lse = max_g m_g + log sum_g s_g exp(m_g - max m)
//
// Backward, a task = (row group a, column group g), row tiles outer, column tiles inner:
//
//   logits tile (recomputed) -> G tile = dloss * (softmax - onehot)    (softmax from the saved lse)
//   dh_g[rows]  += G . w_VM[cols]          (dh_0 is dh itself, dh_g>0 partial buffers)
//   dw_a[cols]  += h rows^T . G            (dw_0 is dw itself, dw_a>0 partial buffers)
//   then dh = sum_g dh_g and dw = sum_a dw_a in index order.
//
// w_MV is w when it is [M, V] and a transposed copy otherwise; w_VM the other way round. The
// split into groups is the one with the fewest partial floats among those with enough tasks.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/parallel.h"
#include "gemm.h"
#include "linear_ce_kernel.h"

namespace lce {

namespace {

using ernie5par::parallel;
using ernie5par::parallel_for;
using ernie5par::TaskQueue;
using ernie5par::team_size;

using ernie5simd::expv;
using ernie5simd::hmax;
using ernie5simd::hsum;
using ernie5simd::vmax;

constexpr int64_t kTasks = 16;  // tasks wanted per pass: enough to balance a few threads

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A pass's tasks: row tiles cut into `row_groups` contiguous ranges, column tiles into
// `col_groups`.
struct Grid {
  int64_t row_tiles, col_tiles, row_groups, col_groups;

  int64_t row_tile_begin(int64_t a) const { return a * row_tiles / row_groups; }
  int64_t col_tile_begin(int64_t g) const { return g * col_tiles / col_groups; }
};

Grid forward_grid(const Dims& d) {
  const int64_t rt = ceil_div(d.T, kRowTile), ct = ceil_div(d.V, kColTile);
  // Each row tile is its own task; short inputs split the vocabulary too.
  const int64_t wanted = ceil_div(kTasks, std::max<int64_t>(rt, 1));
  const int64_t ng = std::max<int64_t>(1, std::min(ct, wanted));
  return {rt, ct, rt, ng};
}

Grid backward_grid(const Dims& d) {
  const int64_t rt = ceil_div(d.T, kRowTile), ct = ceil_div(d.V, kColTile);
  const int64_t wanted = std::max<int64_t>(1, std::min(kTasks, rt * ct));
  Grid best{rt, ct, 1, 1};
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int64_t ng = 1; ng <= std::min(ct, wanted); ++ng) {
    const int64_t na = std::min(rt, ceil_div(wanted, ng));
    if (na * ng < wanted) continue;
    const int64_t cost = (na - 1) * d.M * d.V + (ng - 1) * d.T * d.M;
    if (cost < best_cost) {
      best_cost = cost;
      best = {rt, ct, na, ng};
    }
  }
  return best;
}

// dst [cols, rows] = src [rows, cols]^T.
void transpose(const float* src, int64_t rows, int64_t cols, float* dst, int threads) {
  constexpr int64_t kBlock = 32;
  // A task is a stripe of kBlock columns of src (rows of dst).
  parallel_for(threads, (cols + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kBlock; c0 < std::min(cols, b1 * kBlock); c0 += kBlock)
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c)
          for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
            dst[c * rows + r] = src[r * cols + c];
  });
}

float row_max(const float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= kLanes) {
    f16v mv = load(row);
    for (j = kLanes; j + kLanes <= n; j += kLanes) mv = vmax(mv, load(row + j));
    m = hmax(mv);
  }
  for (; j < n; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

// sum_j exp(row[j] - m), vector lanes summed in a fixed order.
float sum_exp(const float* row, int64_t n, float m) {
  f16v acc = splat(0.0f);
  const f16v mv = splat(m);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc += expv(load(row + j) - mv);
  float s = hsum(acc);
  for (; j < n; ++j) s += std::exp(row[j] - m);
  return s;
}

// row <- scale * (exp(row - lse) - [j == label_col]).
void grad_row(float* row, int64_t n, float lse, float scale, int64_t label_col) {
  if (scale == 0.0f) {
    std::fill(row, row + n, 0.0f);
    return;
  }
  const f16v lv = splat(lse), sv = splat(scale);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store(row + j, expv(load(row + j) - lv) * sv);
  for (; j < n; ++j) row[j] = std::exp(row[j] - lse) * scale;
  if (label_col >= 0 && label_col < n) row[label_col] -= scale;
}

// dst[i] += sum_p parts[p][i] for i < n, p in order; parts are `stride` floats apart.
void add_partials(float* dst, const float* parts, int64_t count, int64_t stride, int64_t n,
                  int threads) {
  if (count == 0) return;
  constexpr int64_t kChunk = 4096;
  parallel_for(threads, n, kChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {  // one thread: chunks keep dst in L1
      const int64_t c1 = std::min(i1, c0 + kChunk);
      for (int64_t p = 0; p < count; ++p) {
        const float* src = parts + p * stride;
        for (int64_t i = c0; i < c1; ++i) dst[i] += src[i];
      }
    }
  });
}

}  // namespace

void check_labels(const Dims& d, const int64_t* labels) {
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t y = labels[t];
    if (y != d.ignore_index && (y < 0 || y >= d.V))
      throw std::invalid_argument("label " + std::to_string(y) + " at row " + std::to_string(t) +
                                  " is outside [0, " + std::to_string(d.V) + ") and is not " +
                                  std::to_string(d.ignore_index));
  }
}

int64_t forward_scratch_floats(const Dims& d) {
  const Grid g = forward_grid(d);
  return (d.transposed ? d.M * d.V : 0) + (2 * g.col_groups + 1) * d.T;
}

void forward(const Dims& d, const float* h, const float* w, const int64_t* labels, float* loss,
             float* lse, float* scratch) {
  check_labels(d, labels);
  const int64_t T = d.T, M = d.M, V = d.V;
  const float* w_mv = w;
  float* s = scratch;
  if (d.transposed) {
    transpose(w, V, M, s, d.threads);
    w_mv = s;
    s += M * V;
  }
  const Grid grid = forward_grid(d);
  const int64_t groups = grid.col_groups;
  float* part_max = s;                      // [groups, T]
  float* part_sum = s + groups * T;         // [groups, T]
  float* label_logit = s + 2 * groups * T;  // [T]: by the task whose columns hold the label
  std::fill(label_logit, label_logit + T, 0.0f);
  const int64_t tasks = grid.row_tiles * groups;

  TaskQueue queue(tasks);
  auto worker = [&] {
    std::vector<float> tile(kRowTile * kColTile);
    float run_max[kRowTile], run_sum[kRowTile];
    for (int64_t task; queue.next(task);) {
      const int64_t r0 = task / groups * kRowTile, g = task % groups;
      const int64_t R = std::min(kRowTile, T - r0);
      std::fill(run_max, run_max + R, -std::numeric_limits<float>::infinity());
      std::fill(run_sum, run_sum + R, 0.0f);
      for (int64_t ct = grid.col_tile_begin(g); ct < grid.col_tile_begin(g + 1); ++ct) {
        const int64_t c0 = ct * kColTile, C = std::min(kColTile, V - c0);
        gemm_nn(R, C, M, h + r0 * M, M, w_mv + c0, V, tile.data(), kColTile, false);
        for (int64_t r = 0; r < R; ++r) {
          const float* row = tile.data() + r * kColTile;
          const int64_t y = labels[r0 + r];
          if (y >= c0 && y < c0 + C) label_logit[r0 + r] = row[y - c0];
          const float m = std::max(run_max[r], row_max(row, C));
          run_sum[r] = run_sum[r] * std::exp(run_max[r] - m) + sum_exp(row, C, m);
          run_max[r] = m;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        part_max[g * T + r0 + r] = run_max[r];
        part_sum[g * T + r0 + r] = run_sum[r];
      }
    }
  };
  parallel(team_size(d.threads, tasks), worker);

  // One thread when there is one group: a pass over T floats is not worth waking the others.
  parallel_for(groups > 1 ? d.threads : 1, T, kRowTile, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float m = part_max[t];
      for (int64_t g = 1; g < groups; ++g) m = std::max(m, part_max[g * T + t]);
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        sum += part_sum[g * T + t] * std::exp(part_max[g * T + t] - m);
      lse[t] = m + std::log(sum);
      loss[t] = labels[t] == d.ignore_index ? 0.0f : lse[t] - label_logit[t];
    }
  });
}

int64_t backward_scratch_floats(const Dims& d) {
  const Grid g = backward_grid(d);
  return d.M * d.V + (g.row_groups - 1) * d.M * d.V + (g.col_groups - 1) * d.T * d.M;
}

void backward(const Dims& d, const float* h, const float* w, const int64_t* labels,
              const float* lse, const float* dloss, float* dh, float* dw, float* scratch) {
  check_labels(d, labels);
  const int64_t T = d.T, M = d.M, V = d.V;
  const Grid grid = backward_grid(d);
  float* w_copy = scratch;
  transpose(w, d.transposed ? V : M, d.transposed ? M : V, w_copy, d.threads);
  const float* w_mv = d.transposed ? w_copy : w;
  const float* w_vm = d.transposed ? w : w_copy;
  float* dw_parts = scratch + M * V;                           // [row_groups - 1, |w|]
  float* dh_parts = dw_parts + (grid.row_groups - 1) * M * V;  // [col_groups - 1, T, M]
  const int64_t tasks = grid.row_groups * grid.col_groups;

  TaskQueue queue(tasks);
  auto worker = [&] {
    std::vector<float> tile(kRowTile * kColTile);
    for (int64_t task; queue.next(task);) {
      const int64_t a = task / grid.col_groups, g = task % grid.col_groups;
      float* dw_a = a == 0 ? dw : dw_parts + (a - 1) * M * V;
      float* dh_g = g == 0 ? dh : dh_parts + (g - 1) * T * M;
      const int64_t row_begin = grid.row_tile_begin(a) * kRowTile;
      const int64_t row_end = std::min(T, grid.row_tile_begin(a + 1) * kRowTile);
      const int64_t col_begin = grid.col_tile_begin(g) * kColTile;
      const int64_t col_end = std::min(V, grid.col_tile_begin(g + 1) * kColTile);
      // This task's rectangle of dh_g and of dw_a starts at zero.
      std::fill(dh_g + row_begin * M, dh_g + row_end * M, 0.0f);
      if (d.transposed) {
        std::fill(dw_a + col_begin * M, dw_a + col_end * M, 0.0f);
      } else {
        for (int64_t m = 0; m < M; ++m)
          std::fill(dw_a + m * V + col_begin, dw_a + m * V + col_end, 0.0f);
      }
      for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowTile) {
        const int64_t R = std::min(kRowTile, row_end - r0);
        bool any = false;
        for (int64_t r = 0; r < R; ++r)
          any |= labels[r0 + r] != d.ignore_index && dloss[r0 + r] != 0.0f;
        if (!any) continue;  // a tile without targets adds nothing
        const float* h_rows = h + r0 * M;
        for (int64_t c0 = col_begin; c0 < col_end; c0 += kColTile) {
          const int64_t C = std::min(kColTile, col_end - c0);
          float* G = tile.data();
          gemm_nn(R, C, M, h_rows, M, w_mv + c0, V, G, kColTile, false);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t y = labels[r0 + r];
            const float scale = y == d.ignore_index ? 0.0f : dloss[r0 + r];
            grad_row(G + r * kColTile, C, lse[r0 + r], scale, y - c0);
          }
          gemm_nn(R, M, C, G, kColTile, w_vm + c0 * M, M, dh_g + r0 * M, M, true);
          if (d.transposed)
            gemm_tn(C, M, R, G, kColTile, h_rows, M, dw_a + c0 * M, M, true);
          else
            gemm_tn(M, C, R, h_rows, M, G, kColTile, dw_a + c0, V, true);
        }
      }
    }
  };
  parallel(team_size(d.threads, tasks), worker);
  add_partials(dw, dw_parts, grid.row_groups - 1, M * V, M * V, d.threads);
  add_partials(dh, dh_parts, grid.col_groups - 1, T * M, T * M, d.threads);
}

}  // namespace lce
