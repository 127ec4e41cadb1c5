// Partial (tail) loads and stores of the 16-lane vectors of ../common/simd.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/simd.h"

namespace fused {

using ernie5simd::f16v;
using ernie5simd::kLanes;

// The first n (< 16) floats of p, the other lanes zero.
inline f16v load_n(const float* p, int64_t n) {
  float buf[kLanes] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return ernie5simd::load(buf);
}

inline void store_n(float* p, f16v v, int64_t n) {
  float buf[kLanes];
  ernie5simd::store(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}

// Lanes [i, i + 16) of p, or the n - i < 16 left of a row of n (zero-padded).
inline f16v load_at(const float* p, int64_t i, int64_t n) {
  return n - i >= kLanes ? ernie5simd::load(p + i) : load_n(p + i, n - i);
}

inline void store_at(float* p, int64_t i, int64_t n, f16v v) {
  if (n - i >= kLanes) {
    ernie5simd::store(p + i, v);
  } else {
    store_n(p + i, v, n - i);
  }
}

}  // namespace fused
