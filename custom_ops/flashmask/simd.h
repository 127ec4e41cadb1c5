// FlashMask's additions to the shared 16-lane vectors of ../common/simd.h: int32 lane helpers,
// exp2, a scaled copy, and aligned scratch buffers.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/simd.h"

namespace flashmask {

using ernie5simd::f16v;
using ernie5simd::hmax;
using ernie5simd::hsum;
using ernie5simd::i16v;
using ernie5simd::kLanes;
using ernie5simd::load;
using ernie5simd::splat;
using ernie5simd::store;
using ernie5simd::vmax;

inline i16v splat_i(int32_t x) { return i16v{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

inline i16v load_i(const int32_t* p) {
  i16v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// dst[d] = src[d] * scale, d < n.
inline void scaled_copy(float* dst, const float* src, int64_t n, float scale) {
  int64_t d = 0;
  const f16v sc = splat(scale);
  for (; d + kLanes <= n; d += kLanes) store(dst + d, load(src + d) * sc);
  for (; d < n; ++d) dst[d] = src[d] * scale;
}

// 2^x for x <= 126; exactly 0 below -126 (so -inf gives 0, never NaN).
// Round-to-nearest split x = n + f with |f| <= 1/2, a degree-6 Taylor polynomial of 2^f
// (relative error ~1e-7, the fp32 rounding level) and 2^n built from the exponent bits.
inline f16v exp2v(f16v x) {
  const f16v lo = splat(-126.0f);
  const f16v hi = splat(126.0f);
  f16v xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  f16v half = xc < splat(0.0f) ? splat(-0.5f) : splat(0.5f);
  i16v n = __builtin_convertvector(xc + half, i16v);
  f16v f = xc - __builtin_convertvector(n, f16v);
  // Coefficients (ln 2)^k / k!.
  const float c1 = 0.693147180559945f, c2 = 0.240226506959101f, c3 = 0.0555041086648216f,
              c4 = 0.00961812910762848f, c5 = 0.00133335581464284f, c6 = 0.000154035303933816f;
  f16v p = splat(c6);
  p = p * f + c5;
  p = p * f + c4;
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + c1;
  p = p * f + 1.0f;
  i16v bits = (n + 127) << 23;
  f16v scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  f16v r = p * scale;
  return x < lo ? splat(0.0f) : r;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Scratch buffer, 64-byte aligned, zero-initialised unless `zero` is false (then its owner writes
// every element before reading it, in parallel, which also spreads the first-touch page faults).
// Large buffers ask for transparent huge pages: with 4 KiB pages, first-touch page faults on a
// fresh multi-MB buffer cost as much as the attention itself for sparse masks.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n, bool zero = true) { reset(n, zero); }
  ~Buffer() { std::free(ptr_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void reset(size_t n, bool zero = true) {
    std::free(ptr_);
    constexpr size_t kHuge = size_t(2) << 20;
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    const size_t align = bytes >= kHuge ? kHuge : 64;
    bytes = (bytes + align - 1) / align * align;
    ptr_ = static_cast<float*>(std::aligned_alloc(align, bytes > 0 ? bytes : 64));
    if (ptr_ == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) madvise(ptr_, bytes, MADV_HUGEPAGE);
#endif
    if (zero) std::memset(ptr_, 0, bytes);
    size_ = n;
  }
  float* data() { return ptr_; }
  const float* data() const { return ptr_; }
  size_t size() const { return size_; }

 private:
  float* ptr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace flashmask
