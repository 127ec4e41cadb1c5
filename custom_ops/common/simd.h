// 16-lane float vectors (GCC/Clang vector extensions) shared by the fused CPU ops
// (custom_ops/fused, custom_ops/linear_ce, custom_ops/adamw).
//
// The ops are built with -march=native (paddle_ernie5/ops/build.py): on an AVX-512 machine one
// `f16v` is one zmm register, on AVX2 the compiler splits it into two ymm registers. The build hash
// includes the CPU's flags, so the kernel set is chosen for the machine that runs it.
#pragma once

#include <cstdint>
#include <cstring>

namespace ernie5simd {

constexpr int kLanes = 16;
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

inline f16v splat(float x) { return f16v{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

inline f16v load(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, f16v v) { std::memcpy(p, &v, sizeof(v)); }

inline f16v vmax(f16v a, f16v b) { return a > b ? a : b; }

inline float hmax(f16v v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Pairwise tree in a fixed order, so sums are reproducible.
inline float hsum(f16v v) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// e^x clamped to [2^-126, 2^126]: x log2(e) = n + f with |f| <= 1/2, 2^f by a degree-6 Taylor
// polynomial (relative error ~1e-7), 2^n from the exponent bits.
inline f16v expv(f16v x) {
  f16v z = x * splat(1.4426950408889634f);
  z = z < splat(-126.0f) ? splat(-126.0f) : z;
  z = z > splat(126.0f) ? splat(126.0f) : z;
  const f16v half = z < splat(0.0f) ? splat(-0.5f) : splat(0.5f);
  const i16v n = __builtin_convertvector(z + half, i16v);
  const f16v f = z - __builtin_convertvector(n, f16v);
  f16v p = splat(0.000154035303933816f);
  p = p * f + 0.00133335581464284f;
  p = p * f + 0.00961812910762848f;
  p = p * f + 0.0555041086648216f;
  p = p * f + 0.240226506959101f;
  p = p * f + 0.693147180559945f;
  p = p * f + 1.0f;
  const i16v bits = (n + 127) << 23;
  f16v scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline f16v sigmoidv(f16v x) { return splat(1.0f) / (splat(1.0f) + expv(-x)); }

}  // namespace ernie5simd
