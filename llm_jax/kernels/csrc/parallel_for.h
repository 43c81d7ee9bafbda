// Work split over XLA's intra-op thread pool, shared by the CPU kernels.
#ifndef LLM_JAX_CSRC_PARALLEL_FOR_H_
#define LLM_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace llm_jax {

// Tasks spread over XLA's intra-op thread pool. The caller takes tasks too, so the call finishes
// even if no pool thread is free; helpers that start late find no work left and return (they own
// a reference to the shared state, so they never touch a finished call's stack).

struct TaskState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
};

template <typename Fn>
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, Fn fn) {
  auto state = std::make_shared<TaskState>();
  state->total = total;
  auto work = std::make_shared<Fn>(std::move(fn));
  auto run = [state, work]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < state->total;) {
      (*work)(t);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([run] { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

}  // namespace llm_jax

#endif  // LLM_JAX_CSRC_PARALLEL_FOR_H_
