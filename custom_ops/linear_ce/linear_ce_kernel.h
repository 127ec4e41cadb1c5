// Output projection + cross-entropy on the CPU, fp32, plain pointers (no framework types).
//
// Layouts: h [T, M]; w [M, V] (a Linear's weight: logits = h w), or [V, M] when `transposed` (a
// tied embedding table: logits = h w^T); labels int64 [T]; loss, lse, dloss [T]; dh like h, dw like
// w. A label equal to `ignore_index` marks a row without a target: its loss is 0 and it gets no
// gradient.
//
//   lse[t]  = log sum_v exp(logits[t, v])
//   loss[t] = lse[t] - logits[t, labels[t]]                         (0 when ignored)
//   G[t, v] = dloss[t] * (exp(logits[t, v] - lse[t]) - [v == labels[t]])   (0 when ignored)
//   dh = G w^T (G w when transposed),   dw = h^T G (G^T h when transposed)
//
// The logits exist only as tiles of kRowTile x kColTile floats per thread.
#pragma once

#include <cstdint>

namespace lce {

constexpr int64_t kRowTile = 96;   // rows per tile: a multiple of the GEMM's 6-row blocks
constexpr int64_t kColTile = 256;  // vocabulary columns per tile: whole 64-column GEMM stripes

struct Dims {
  int64_t T, M, V;
  bool transposed;  // w is [V, M] instead of [M, V]
  int64_t ignore_index;
  int threads;
};

// Throws std::invalid_argument for a label outside [0, V) that is not ignore_index.
void check_labels(const Dims& d, const int64_t* labels);

int64_t forward_scratch_floats(const Dims& d);
void forward(const Dims& d, const float* h, const float* w, const int64_t* labels, float* loss,
             float* lse, float* scratch);

int64_t backward_scratch_floats(const Dims& d);
// Deterministic: the work is split by the shapes only (never the thread count) and every sum runs
// in a fixed order, so dh and dw are bit-identical for any number of threads.
void backward(const Dims& d, const float* h, const float* w, const int64_t* labels,
              const float* lse, const float* dloss, float* dh, float* dw, float* scratch);

}  // namespace lce
