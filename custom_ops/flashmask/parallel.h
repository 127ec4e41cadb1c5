// Parallel regions on the OpenMP runtime that Paddle's own CPU kernels use.
//
// Paddle's CPU wheels run their kernels on Intel's OpenMP runtime (libiomp5), while GCC compiles
// `#pragma omp` into calls to its own runtime (libgomp). With two runtimes in one process each
// keeps its own worker threads, and the idle workers of one spin (Intel's default: for 200 ms
// after each parallel region) while the other works: with as many threads as cores, the op's
// workers share their cores with spinning threads, and the end of every parallel region waits for
// a descheduled worker. A training step alternates Paddle's kernels with this op, so that is the
// common case. parallel() therefore enters its region through libiomp5's GCC-compatible entry
// point GOMP_parallel when that runtime is loaded in the process (the op then runs on the worker
// threads Paddle's kernels just used) and through the pragma otherwise.
//
// Work is handed out by a TaskQueue (one task at a time from a shared counter): a descheduled
// thread holds up at most the task it is running.
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace flashmask {

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

// libiomp5's GOMP_parallel when libiomp5 is already loaded in the process, else null.
inline GompParallel paddle_openmp() {
#if defined(__linux__)
  static const GompParallel fn = []() -> GompParallel {
    void* lib = dlopen("libiomp5.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib != nullptr ? reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel")) : nullptr;
  }();
  return fn;
#else
  return nullptr;
#endif
}

// Runs body() once on each of `threads` threads (the calling thread is one of them) and returns
// when every call has returned.
template <class Body>
void parallel(int threads, Body& body) {
  if (threads <= 1) {
    body();
    return;
  }
  if (const GompParallel fn = paddle_openmp()) {
    fn([](void* b) { (*static_cast<Body*>(b))(); }, &body, static_cast<unsigned>(threads), 0);
    return;
  }
#pragma omp parallel num_threads(threads)
  body();
}

// Task indices 0..n-1, each handed to exactly one caller of next().
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  bool next(int64_t& task) {
    task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < n_;
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> next_{0};
};

// Threads worth starting for n tasks.
inline int team_size(int threads, int64_t n) {
  return static_cast<int>(n < threads ? (n > 0 ? n : 1) : threads);
}

}  // namespace flashmask
