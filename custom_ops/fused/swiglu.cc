// SwiGLU over [a | b] rows (see fused_kernel.h).
//
//   forward   s = sigmoid(a),  y = (a * s) * b
//   backward  da = dy * b * s * (1 + a * (1 - s)),  db = dy * (a * s)
#include "fused_kernel.h"
#include "rows.h"
#include "vec.h"

namespace fused {

using ernie5simd::sigmoidv;
using ernie5simd::splat;

void swiglu_forward(int64_t rows, int64_t F, const float* x, float* y, int threads) {
  for_rows(threads, rows, 3 * F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = x + r * 2 * F;
      const float* b = a + F;
      float* yr = y + r * F;
      for (int64_t i = 0; i < F; i += kLanes) {
        const f16v av = load_at(a, i, F);
        store_at(yr, i, F, (av * sigmoidv(av)) * load_at(b, i, F));
      }
    }
  });
}

void swiglu_backward(int64_t rows, int64_t F, const float* x, const float* dy, float* dx,
                     int threads) {
  const f16v one = splat(1.0f);
  for_rows(threads, rows, 5 * F, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = x + r * 2 * F;
      const float* b = a + F;
      const float* g = dy + r * F;
      float* da = dx + r * 2 * F;
      float* db = da + F;
      for (int64_t i = 0; i < F; i += kLanes) {
        const f16v av = load_at(a, i, F), gv = load_at(g, i, F);
        const f16v s = sigmoidv(av);
        store_at(da, i, F, gv * load_at(b, i, F) * s * (one + av * (one - s)));
        store_at(db, i, F, gv * (av * s));
      }
    }
  });
}

}  // namespace fused
