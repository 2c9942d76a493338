// A fixed pool of worker threads for data-parallel loops. One process-wide pool sized to the cores
// (TUNESERVE_THREADS overrides); parallel_for splits [0, n) into contiguous chunks.
#pragma once
#include <cstdint>
#include <functional>

namespace ts {

int num_threads();                 // threads the pool uses (>= 1)
void set_num_threads(int n);       // resizes the pool; n <= 0 means "all cores"

// Runs fn(begin, end) over disjoint chunks covering [0, n), at least `grain` items per chunk, on the
// pool and the calling thread; returns when all chunks are done. Nested calls run serially.
// The first exception thrown by a chunk is rethrown on the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace ts
