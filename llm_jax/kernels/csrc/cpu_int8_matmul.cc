// Weight-only int8 matmul for XLA:CPU as an XLA FFI custom call: C[M, N] = A[M, K] @ dequant(Q),
// reading the int8 weights as they are stored, for the few rows of a decode step.
//
// Why: a decode step at batch 1 multiplies one row by every weight, so its speed is how fast the
// weights stream from memory. Int8 weights are a quarter of float32's bytes, but dequantized by XLA
// (qwix.dequantize, an elementwise op before the dot) they are written and read again as float32,
// and in the decode loop XLA hoists that dequantization out of the loop altogether: the loop reads
// float32 copies and int8 decodes at float speed (llm_jax/infer/quantize.py). Here each int8 weight
// is read once, widened to float32 in registers and multiplied.
//
// Layouts (`transpose_b`):
// - false: Q [K, N] (a Dense kernel, inputs first), scales [K / G, N]: one per output channel and
//   group of G consecutive inputs (G = K: per channel). C[m, n] = sum_g S[g, n] * sum_{k in g}
//   A[m, k] Q[k, n]. The columns of C are split into bands, one task each.
// - true: Q [N, K] (an embedding table used as the output projection), scales [N, K / G]. The rows
//   of Q (the columns of C) are split into bands.
// The group sums are float32 dot products, scaled once per group: the same function as the
// dequantized float32 matmul, to float32 rounding.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llm_jax::ParallelFor;
using llm_jax::RowSum;

namespace {

constexpr int64_t kColumns = 256;  // columns of C accumulated at once (Q [K, N]): an L1-sized strip
constexpr int64_t kMinBand = 64;    // the narrowest band of columns worth a task
constexpr int kBlock = 8;           // rows of Q per pass over the accumulators: 8 FMAs per load and store

// acc[r, 0:W] += sum_j a[r, j] * Q[j, 0:W] for R rows of A (row stride lda) and kBlock rows of Q
// (row stride N), widened in registers; each widened value serves R rows. The accumulators' rows
// are W apart.
template <int R>
inline void Block(const float* a, int64_t lda, const int8_t* __restrict__ q, int64_t N, int64_t W,
                  float* __restrict__ acc) {
  float ar[R][kBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kBlock; ++j) ar[r][j] = a[r * lda + j];
  for (int64_t n = 0; n < W; ++n) {
    float total[R];
    for (int r = 0; r < R; ++r) total[r] = acc[r * W + n];
    for (int j = 0; j < kBlock; ++j) {
      const float qj = static_cast<float>(q[j * N + n]);
      for (int r = 0; r < R; ++r) total[r] += ar[r][j] * qj;
    }
    for (int r = 0; r < R; ++r) acc[r * W + n] = total[r];
  }
}

// C[:, n0:n1] for Q [K, N] with scales [K / G, N].
void BandKN(const float* a, const int8_t* q, const float* s, float* c, int64_t M, int64_t K, int64_t N,
            int64_t G, int64_t n0, int64_t n1) {
  std::vector<float> group_buf(M * kColumns);
  float* __restrict__ acc = group_buf.data();
  for (int64_t c0 = n0; c0 < n1; c0 += kColumns) {
    const int64_t W = std::min(kColumns, n1 - c0);
    for (int64_t m = 0; m < M; ++m) std::fill(c + m * N + c0, c + m * N + c0 + W, 0.0f);
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      std::fill(acc, acc + M * W, 0.0f);
      int64_t k = g0;
      for (; k + kBlock <= g0 + G; k += kBlock) {
        const int8_t* qk = q + k * N + c0;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) Block<4>(a + m * K + k, K, qk, N, W, acc + m * W);
        for (; m + 2 <= M; m += 2) Block<2>(a + m * K + k, K, qk, N, W, acc + m * W);
        for (; m < M; ++m) Block<1>(a + m * K + k, K, qk, N, W, acc + m * W);
      }
      for (; k < g0 + G; ++k) {  // the rows of a group left over by the blocks
        const int8_t* __restrict__ qk = q + k * N + c0;
        for (int64_t m = 0; m < M; ++m) {
          const float ak = a[m * K + k];
          float* __restrict__ am = acc + m * W;
          for (int64_t n = 0; n < W; ++n) am[n] += ak * static_cast<float>(qk[n]);
        }
      }
      const float* __restrict__ sg = s + (g0 / G) * N + c0;
      for (int64_t m = 0; m < M; ++m) {
        float* __restrict__ cm = c + m * N + c0;
        const float* __restrict__ am = acc + m * W;
        for (int64_t n = 0; n < W; ++n) cm[n] += am[n] * sg[n];
      }
    }
  }
}

// C[:, n0:n1] for Q [N, K] with scales [N, K / G].
void BandNK(const float* a, const int8_t* q, const float* s, float* c, int64_t M, int64_t K, int64_t N,
            int64_t G, int64_t n0, int64_t n1) {
  std::vector<float> row_buf(K);
  float* __restrict__ row = row_buf.data();
  const int64_t groups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* __restrict__ qn = q + n * K;
    const float* sn = s + n * groups;
    if (M == 1) {  // one dot product per group, Q widened in registers
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const float* ag = a + g * G;
        const int8_t* qg = qn + g * G;
        total += sn[g] * RowSum(G, [&](int64_t k) { return ag[k] * static_cast<float>(qg[k]); });
      }
      c[n] = total;
      continue;
    }
    for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(qn[k]);
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict__ am = a + m * K;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        const float* ag = am + g * G;
        const float* rg = row + g * G;
        total += sn[g] * RowSum(G, [&](int64_t k) { return ag[k] * rg[k]; });
      }
      c[m * N + n] = total;
    }
  }
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> c, bool transpose_b) {
  const auto ad = a.dimensions(), qd = q.dimensions(), sd = s.dimensions();
  if (ad.size() != 2 || qd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("cpu int8 matmul: 2-D operands only");
  const int64_t M = ad[0], K = ad[1];
  const int64_t N = transpose_b ? qd[0] : qd[1];
  const int64_t groups = transpose_b ? sd[1] : sd[0];
  if ((transpose_b ? qd[1] : qd[0]) != K || (transpose_b ? sd[0] : sd[1]) != N || groups < 1 || K % groups)
    return ffi::Error::InvalidArgument("cpu int8 matmul: operand shapes do not fit together");
  float* c_ptr = c->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(c_ptr, c_ptr + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t G = K / groups;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bands = std::max<int64_t>(1, std::min(threads, N / kMinBand));
  const int64_t band = ((N + bands - 1) / bands + 15) / 16 * 16;  // whole vectors of columns
  ParallelFor(pool, bands, [&](int64_t i) {
    const int64_t n0 = i * band, n1 = std::min(N, n0 + band);
    if (n0 >= n1) return;
    if (transpose_b)
      BandNK(a.typed_data(), q.typed_data(), s.typed_data(), c_ptr, M, K, N, G, n0, n1);
    else
      BandKN(a.typed_data(), q.typed_data(), s.typed_data(), c_ptr, M, K, N, G, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_b"));
