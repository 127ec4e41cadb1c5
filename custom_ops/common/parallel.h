// Parallel regions on the OpenMP runtime that Paddle's own CPU kernels use.
//
// Paddle's CPU wheels run their kernels on Intel's OpenMP runtime (libiomp5), while GCC compiles
// `#pragma omp` into calls to its own runtime (libgomp). With two runtimes in one process each
// keeps its own worker threads, and the idle workers of one spin (Intel's default: for 200 ms
// after each parallel region) while the other works: with as many threads as cores, an op's
// workers share their cores with spinning threads, and the end of every parallel region waits for
// a descheduled worker. A training step alternates Paddle's kernels with the custom ops, so that
// is the common case. parallel() therefore enters its region through libiomp5's GCC-compatible
// entry point GOMP_parallel when that runtime is loaded in the process (the op then runs on the
// worker threads Paddle's kernels just used) and through the pragma otherwise.
//
// Work is handed out by a TaskQueue (one task at a time from a shared counter): a descheduled
// thread holds up at most the task it is running. Which thread runs a task is not fixed, so a
// task's results must go to places chosen by the task index alone; scratch that a thread reuses
// from task to task is allocated inside the body (one copy per participating thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace ernie5par {

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

// OMP_NUM_THREADS, the variable Paddle's own CPU kernels follow (Paddle sets it to 1 at import when
// it is unset); 1 when unset or invalid.
inline int env_threads() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  const int n = env != nullptr ? std::atoi(env) : 0;
  return n > 0 ? n : 1;
}

// Runs body() once on each of `threads` threads (the calling thread is one of them) and returns
// when every call has returned. body must not throw.
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

// fn(begin, end) over [0, n) cut into ranges of `grain` indices (the last may be shorter), the
// ranges spread over up to `threads` threads. On one thread fn(0, n) runs once: fn must compute the
// same values for an index whichever range holds it.
template <class Fn>
void parallel_for(int threads, int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t tasks = (n + grain - 1) / grain;
  const int team = team_size(threads, tasks);
  if (team <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  TaskQueue queue(tasks);
  auto body = [&] {
    for (int64_t t; queue.next(t);) {
      const int64_t begin = t * grain;
      fn(begin, begin + grain < n ? begin + grain : n);
    }
  };
  parallel(team, body);
}

}  // namespace ernie5par
