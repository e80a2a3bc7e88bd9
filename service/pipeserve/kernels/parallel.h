// Shared by the kernels: their one way to run work on several threads (see parallel_chunks).
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

namespace pipeserve {

// Splits [0, count) over the calling thread's OpenMP team (torch's libgomp: the team size
// torch or the compute lane gave this thread), in contiguous chunks of at least `grain`.
// Not at::parallel_for: inlined into this library, it runs torch's lazy per-thread init
// (at::init_num_threads) from this library's own copy of its thread_local flag at the first
// call on each thread, which resets that thread's team to torch's global default; the compute
// lane gives its threads their team and then sets that default to 1 for every other thread
// (scheduling/compute.py), so every operator after the kernel on the lane ran on one core.
// Like at::parallel_for: no num_threads clause (GOMP's thread pool, pytorch #32008), idle
// members past the chunks, nothing parallel inside a parallel region.
template <typename F>
void parallel_chunks(int64_t count, int64_t grain, const F& f) {
  const int64_t most = std::max<int64_t>(1, (count + grain - 1) / grain);
  if (count <= grain || omp_in_parallel() || omp_get_max_threads() <= 1) {
    f(0, count);
    return;
  }
  std::exception_ptr failure;  // an exception must not leave a parallel region (std::terminate)
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
#pragma omp parallel
  {
    const int64_t members = std::min<int64_t>(omp_get_num_threads(), most);
    const int64_t chunk = (count + members - 1) / members;
    const int64_t first = omp_get_thread_num() * chunk;
    if (first < count) {
      try {
        f(first, std::min(count, first + chunk));
      } catch (...) {
        if (!failed.test_and_set()) failure = std::current_exception();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace pipeserve
