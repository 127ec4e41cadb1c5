// Rows of a fused kernel spread over threads with ../common/parallel.h.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/parallel.h"

namespace fused {

// Floats per task: ~0.1 ms of streaming on one core, so a queue of tasks balances the threads
// (a descheduled one holds up one task) at a negligible cost per task.
constexpr int64_t kTaskFloats = int64_t{1} << 16;

// fn(r0, r1) over rows [0, rows) of `row_floats` floats each, in tasks of about kTaskFloats.
// Each row is computed by one call in a fixed order, so results do not depend on `threads`.
template <class Fn>
void for_rows(int threads, int64_t rows, int64_t row_floats, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, kTaskFloats / std::max<int64_t>(1, row_floats));
  ernie5par::parallel_for(threads, rows, grain, fn);
}

}  // namespace fused
