// Routed SwiGLU experts on the CPU, fp32, plain pointers (no framework types).
//
// Layouts: x, y, dx [T, M]; w_gate_up [E, M, 2F] (gate columns first, then up); w_down [E, F, M];
// ids, weights [T, K] (assignment n = t * K + k); order [T*K], offsets [E + 1] int32; h [T*K, 2F].
//
//   y[t] = sum_k weights[t, k] * SwiGLU_{ids[t, k]}(x[t]),  SwiGLU_e(v) = (silu(v Wg_e) * v Wu_e) Wd_e
//
// Assignments of expert e are the kept ones in token order; with a capacity C > 0 those past the
// first C of an expert are dropped and contribute zero (as in the grouped dispatcher).
#pragma once

#include <cstdint>
#include <vector>

namespace moe {

struct Dims {
  int64_t T, M, E, F, K;
  int64_t capacity;  // rows per expert; 0 = dropless
  int threads;
};

// Stable grouping by expert. order[offsets[e] .. offsets[e+1]) are the assignments n of expert e
// in token order; order[offsets[E] ..) = -1 (dropped). Throws std::invalid_argument for an id
// outside [0, E).
void route(const Dims& d, const int64_t* ids, int32_t* order, int32_t* offsets);

// y from the grouping above; h receives the gate/up pre-activations of row order[i] at row i
// (what backward needs); out is scratch of T*K*M floats.
void forward(const Dims& d, const float* x, const float* w_gate_up, const float* w_down,
             const float* weights, const int32_t* order, const int32_t* offsets, float* y,
             float* h, float* out);

// Backward works on chunks of an expert's rows; every chunk after an expert's first sums its weight
// gradient into a partial buffer (slot >= 0) that is added afterwards.
struct Chunk {
  int64_t expert, begin, end;  // rows [begin, end) of order[]
  int64_t slot;                // -1: the expert's first chunk, summed into the output
};
std::vector<Chunk> backward_chunks(const Dims& d, const int32_t* offsets);
int64_t backward_scratch_floats(const Dims& d, const int32_t* offsets);

// Gradients of x, both weight tensors and the combine weights (0 for dropped assignments) from dy.
// Scratch: dx_rows of T*K*M floats, partial of backward_scratch_floats(). Deterministic: chunks
// depend on the shapes only and each is summed by one thread in row order, so results do not
// depend on the thread count.
void backward(const Dims& d, const float* x, const float* w_gate_up, const float* w_down,
              const float* weights, const int32_t* order, const int32_t* offsets, const float* h,
              const float* dy, float* dx, float* d_gate_up, float* d_down, float* d_weights,
              float* dx_rows, float* partial);

}  // namespace moe
