// FlashMask attention on the CPU, fp32, plain pointers (no framework types).
//
// Layouts: q/out/dq [B, Sq, H, D], k/v/dk/dv [B, Sk, Hk, D], idx [B, Hm, Sk, C] int32,
// lse [B, H, Sq] (natural log; +inf for a row that sees no key), block [B, Hb, ceil(Sq/128),
// ceil(Sk/128)] int32 (nonzero = the 128 x 128 block is computed) or null (s.Hb == 0).
#pragma once

#include <cstdint>

#include "mask.h"

namespace flashmask {

// Throws std::invalid_argument for indices outside [0, Sq].
void forward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* idx,
             const int32_t* block, float* out, float* lse);

// Gradients from d out and d lse; either may be null (that output is not used by the loss).
// Deterministic: the summation order depends on the shapes only, never on thread timing.
void backward(const Shape& s, const float* q, const float* k, const float* v, const int32_t* idx,
              const int32_t* block, const float* out, const float* lse, const float* dout,
              const float* dlse, float* dq, float* dk, float* dv);

}  // namespace flashmask
