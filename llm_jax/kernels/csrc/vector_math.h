// exp and row reductions for the CPU kernels, written so that the compiler vectorises them:
// without -ffast-math a plain `total += x[e]` loop must add in order, one element at a time, and
// std::exp is a library call per element.
#ifndef LLM_JAX_CSRC_VECTOR_MATH_H_
#define LLM_JAX_CSRC_VECTOR_MATH_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// exp(x) for x <= 0 (callers subtract the row maximum or the log-sum-exp first), in a form the
// compiler vectorises: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2; p is the degree-6 Taylor
// polynomial (relative error ~2e-7). Inputs below -87 are taken as -87 (exp ~1.6e-38); NaN stays NaN.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace llm_jax

#endif  // LLM_JAX_CSRC_VECTOR_MATH_H_
