// Framework-free kernels of the fused AdamW step and of the per-tensor gradient sums of squares.
//
// Both work on a list of tensors at once: the work is cut into chunks of at most kChunk floats
// (the cut depends on the tensor sizes only) and the chunks of every tensor are spread over the
// threads (../common/parallel.h), so one call keeps all cores busy however small the individual
// tensors are.
#pragma once

#include <cstdint>
#include <vector>

namespace adamw {

constexpr int64_t kChunk = 8192;  // floats per task

// One parameter: its values, gradient and Adam moments, `n` contiguous floats each. The step
// writes param, moment1 and moment2 in place.
struct Slot {
  float* param;
  const float* grad;
  float* moment1;
  float* moment2;
  int64_t n;
};

// What one step shares across its parameters. Per parameter: the beta powers before this step
// (beta1^t, beta2^t with t the number of steps that parameter has taken, plus one) and whether it
// is decayed.
struct Hyper {
  float lr;
  float beta1;
  float beta2;
  float epsilon;
  float coeff;       // decoupled weight decay
  float grad_scale;  // every gradient is multiplied by it first (global-norm clipping)
};

// For every slot i:
//   g = grad_scale * grad
//   p = p - (lr * coeff) * p                                    (decay[i] only)
//   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2
//   p = p - lr_t * m / (sqrt(v) + eps_t),  lr_t = lr sqrt(1 - beta2_pow) / (1 - beta1_pow),
//                                          eps_t = epsilon sqrt(1 - beta2_pow)
// in float32 with the roundings (and fused multiply-adds) of Paddle's AdamW CPU kernel.
void step(const std::vector<Slot>& slots, const std::vector<float>& beta1_pows,
          const std::vector<float>& beta2_pows, const std::vector<int>& decay, const Hyper& h,
          int threads);

// out[i] = sum_j grads[i][j]^2, accumulated in float64. Each chunk is summed in a fixed order and
// the chunk sums of a tensor are added in chunk order: the result does not depend on `threads`.
void sq_norms(const std::vector<const float*>& grads, const std::vector<int64_t>& sizes,
              double* out, int threads);

}  // namespace adamw
