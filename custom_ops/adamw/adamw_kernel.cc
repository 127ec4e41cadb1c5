// The fused AdamW step and the gradient sums of squares (see adamw_kernel.h).
//
// The step reproduces Paddle's AdamW CPU kernel on AVX-512 (its JIT code): the same float32
// operations in the same order, with a fused multiply-add exactly where that kernel has one. An
// element therefore ends bit-identical to Paddle's update, and the vector body and the scalar tail
// agree with each other.
#include "adamw_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../common/parallel.h"
#include "../common/simd.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace adamw {
namespace {

using ernie5simd::f16v;
using ernie5simd::kLanes;
using ernie5simd::load;
using ernie5simd::splat;
using ernie5simd::store;

// Below this many floats in all, one thread does the work (waking a team costs more).
constexpr int64_t kParallelMin = 1 << 16;

// a * b + c rounded once, and the square root, lane by lane. Written with intrinsics where the
// target has them: GCC does not turn a lane loop of fmaf into vector instructions.
#if defined(__AVX512F__)
inline f16v fmav(f16v a, f16v b, f16v c) {
  return (f16v)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
inline f16v sqrtv(f16v x) { return (f16v)_mm512_sqrt_ps((__m512)x); }
#elif defined(__AVX__) && defined(__FMA__)
inline f16v fmav(f16v a, f16v b, f16v c) {
  __m256 h[3][2];
  std::memcpy(h[0], &a, sizeof(a));
  std::memcpy(h[1], &b, sizeof(b));
  std::memcpy(h[2], &c, sizeof(c));
  const __m256 r[2] = {_mm256_fmadd_ps(h[0][0], h[1][0], h[2][0]),
                       _mm256_fmadd_ps(h[0][1], h[1][1], h[2][1])};
  f16v out;
  std::memcpy(&out, r, sizeof(out));
  return out;
}
inline f16v sqrtv(f16v x) {
  __m256 h[2];
  std::memcpy(h, &x, sizeof(x));
  const __m256 r[2] = {_mm256_sqrt_ps(h[0]), _mm256_sqrt_ps(h[1])};
  f16v out;
  std::memcpy(&out, r, sizeof(out));
  return out;
}
#else
inline f16v fmav(f16v a, f16v b, f16v c) {
  f16v r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return r;
}
inline f16v sqrtv(f16v x) {
  f16v r;
  for (int i = 0; i < kLanes; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
}
#endif

struct Task {
  int32_t slot;
  int64_t begin, end;
};

std::vector<Task> split(const std::vector<int64_t>& sizes, int64_t* total) {
  std::vector<Task> tasks;
  *total = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (int64_t b = 0; b < sizes[i]; b += kChunk) {
      tasks.push_back({static_cast<int32_t>(i), b, b + std::min(kChunk, sizes[i] - b)});
    }
    *total += sizes[i];
  }
  return tasks;
}

// Per-parameter constants of one step, formed as Paddle forms them (float32 arithmetic).
struct Coeffs {
  float neg_lr_t;  // -lr sqrt(1 - beta2^t) / (1 - beta1^t)
  float eps_t;     // epsilon sqrt(1 - beta2^t)
  float decay;     // (lr * lr_ratio) * coeff with lr_ratio = 1; 0 = not decayed
  bool decayed;
};

Coeffs coeffs(const Hyper& h, float beta1_pow, float beta2_pow, bool decayed) {
  const float root = std::sqrt(1.0f - beta2_pow);
  Coeffs c;
  c.neg_lr_t = -(h.lr * (root / (1.0f - beta1_pow)));
  c.eps_t = h.epsilon * root;
  c.decay = (h.lr * 1.0f) * h.coeff;
  c.decayed = decayed;
  return c;
}

void update(const Slot& s, const Coeffs& c, const Hyper& h, int64_t begin, int64_t end) {
  const float one_b1 = 1.0f - h.beta1, one_b2 = 1.0f - h.beta2;
  const bool scaled = h.grad_scale != 1.0f;
  const f16v b1 = splat(h.beta1), b2 = splat(h.beta2), ob1 = splat(one_b1), ob2 = splat(one_b2);
  const f16v scale = splat(h.grad_scale), neg_lr = splat(c.neg_lr_t), eps = splat(c.eps_t);
  const f16v neg_decay = splat(-c.decay);
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    f16v g = load(s.grad + j);
    if (scaled) g = g * scale;
    f16v p = load(s.param + j);
    if (c.decayed) p = fmav(neg_decay, p, p);
    const f16v m = fmav(b1, load(s.moment1 + j), ob1 * g);
    const f16v v = fmav(b2, load(s.moment2 + j), ob2 * (g * g));
    store(s.moment1 + j, m);
    store(s.moment2 + j, v);
    store(s.param + j, fmav(m / (sqrtv(v) + eps), neg_lr, p));
  }
  for (; j < end; ++j) {
    float g = s.grad[j];
    if (scaled) g = g * h.grad_scale;
    float p = s.param[j];
    if (c.decayed) p = __builtin_fmaf(-c.decay, p, p);
    const float m = __builtin_fmaf(h.beta1, s.moment1[j], one_b1 * g);
    const float v = __builtin_fmaf(h.beta2, s.moment2[j], one_b2 * (g * g));
    s.moment1[j] = m;
    s.moment2[j] = v;
    s.param[j] = __builtin_fmaf(m / (__builtin_sqrtf(v) + c.eps_t), c.neg_lr_t, p);
  }
}

typedef double d8v __attribute__((vector_size(64)));
typedef float f8v __attribute__((vector_size(32)));

inline d8v widen(const float* p) {
  f8v x;
  std::memcpy(&x, p, sizeof(x));
  return __builtin_convertvector(x, d8v);
}

// Sum of squares of n floats in float64: two 8-lane accumulators, then a fixed pairwise tree.
double sum_squares(const float* g, int64_t n) {
  d8v a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const d8v x0 = widen(g + j), x1 = widen(g + j + 8);
    a0 += x0 * x0;
    a1 += x1 * x1;
  }
  const d8v a = a0 + a1;
  double s = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
  for (; j < n; ++j) s += static_cast<double>(g[j]) * static_cast<double>(g[j]);
  return s;
}

}  // namespace

void step(const std::vector<Slot>& slots, const std::vector<float>& beta1_pows,
          const std::vector<float>& beta2_pows, const std::vector<int>& decay, const Hyper& h,
          int threads) {
  std::vector<int64_t> sizes(slots.size());
  std::vector<Coeffs> cs(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    sizes[i] = slots[i].n;
    cs[i] = coeffs(h, beta1_pows[i], beta2_pows[i], decay[i] != 0);
  }
  int64_t total = 0;
  const std::vector<Task> tasks = split(sizes, &total);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      update(slots[task.slot], cs[task.slot], h, task.begin, task.end);
    }
  };
  ernie5par::parallel_for(total >= kParallelMin ? threads : 1, n_tasks, 1, run);
}

void sq_norms(const std::vector<const float*>& grads, const std::vector<int64_t>& sizes,
              double* out, int threads) {
  int64_t total = 0;
  const std::vector<Task> tasks = split(sizes, &total);
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  std::vector<double> partial(tasks.size());
  auto run = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      partial[t] = sum_squares(grads[task.slot] + task.begin, task.end - task.begin);
    }
  };
  ernie5par::parallel_for(total >= kParallelMin ? threads : 1, n_tasks, 1, run);
  for (size_t i = 0; i < grads.size(); ++i) out[i] = 0.0;
  for (int64_t t = 0; t < n_tasks; ++t) out[tasks[t].slot] += partial[t];
}

}  // namespace adamw
