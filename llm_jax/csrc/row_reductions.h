// Sums and maxima along a row, written so that the compiler vectorises them: without -ffast-math
// a plain `total += x[e]` loop must add in order, one element at a time.
#ifndef LLM_JAX_CSRC_ROW_REDUCTIONS_H_
#define LLM_JAX_CSRC_ROW_REDUCTIONS_H_

#include <algorithm>
#include <cstdint>

namespace llm_jax {

constexpr int kLanes = 16;  // independent partial results, one vector register's worth

// The sum over e in [0, n) of f(e), in kLanes interleaved partial sums.
template <typename F>
inline float RowSum(int64_t n, F f) {
  float lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += f(e + l);
  float total = 0.0f;
  for (; e < n; ++e) total += f(e);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// The maximum over e in [0, n) of f(e), starting from `init`.
template <typename F>
inline float RowMax(int64_t n, float init, F f) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, init);
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], f(e + l));
  float result = init;
  for (; e < n; ++e) result = std::max(result, f(e));
  for (int l = 0; l < kLanes; ++l) result = std::max(result, lanes[l]);
  return result;
}

}  // namespace llm_jax

#endif  // LLM_JAX_CSRC_ROW_REDUCTIONS_H_
