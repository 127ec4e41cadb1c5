// 16-lane float vectors (GCC/Clang vector extensions) and the vector exp behind SwiGLU.
//
// With -march=native on an AVX-512 machine one `f16v` is one zmm register; on AVX2 the compiler
// splits it into two ymm registers, elsewhere into whatever the target has.
#pragma once

#include <cstdint>
#include <cstring>

namespace moe {

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

// e^x, clamped to [2^-126, 2^126] (so sigmoid saturates to 0 or 1 instead of producing NaN).
// x log2(e) = n + f with |f| <= 1/2; 2^f by a degree-6 Taylor polynomial (relative error ~1e-7),
// 2^n from the exponent bits.
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

}  // namespace moe
