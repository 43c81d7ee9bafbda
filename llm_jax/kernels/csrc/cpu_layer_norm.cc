// LayerNorm and RMSNorm for XLA:CPU as two XLA FFI custom calls (forward and backward), float32.
//
// Why: in a whole training step XLA:CPU splits each norm into 6-8 separate loops (statistics,
// broadcasts of them, the affine part), and its backward into as many again; the baby GPT's 13
// norms then take ~170 ms of a 1.9 s step where one pass over the rows needs ~25 ms
// (docs/benchmarks.md). Here every row is normalised in cache in one task.
//
// x [..., E] is seen as N rows of E. Forward: y = (x - mean) * rstd * scale + bias, with
// rstd = 1 / sqrt(mean((x - mean)^2) + eps); RMSNorm (attribute rms) takes mean = 0 and its
// caller passes a zero bias. Outputs y [..., E], mean and rstd [...] (kept for the backward).
// Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale and
// xhat = (x - mean) * rstd (RMSNorm: without the mean(g) term); dscale = sum over rows of
// dy * xhat, dbias = sum of dy.
//
// Rows are cut into fixed chunks, one task each; each task sums its dscale and dbias in its own
// buffer and the buffers are added in chunk order, so the result does not depend on the number
// of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llm_jax::ParallelFor;
using llm_jax::RowSum;

namespace {

constexpr int64_t kRowsPerTask = 64;
struct Rows {
  int64_t n, width;  // N rows of E
};

// N and E from x, or false when the other operands do not fit them.
bool ReadRows(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& scale, int64_t stats_size, Rows* rows) {
  const auto xd = x.dimensions();
  if (xd.size() < 1) return false;
  const int64_t width = xd.back();
  const int64_t n = width == 0 ? 0 : static_cast<int64_t>(x.element_count()) / width;
  if (width == 0 || static_cast<int64_t>(scale.element_count()) != width || stats_size != n) return false;
  *rows = Rows{n, width};
  return true;
}

constexpr char kShapeError[] = "cpu layer norm: x [..., E], scale and bias [E], mean and rstd [...]";

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float eps, bool rms) {
  Rows r;
  if (!ReadRows(x, scale, mean->element_count(), &r) || bias.element_count() != scale.element_count())
    return ffi::Error::InvalidArgument(kShapeError);
  const int64_t E = r.width;
  const float* s = scale.typed_data();
  const float* b = bias.typed_data();
  const int64_t tasks = (r.n + kRowsPerTask - 1) / kRowsPerTask;
  ParallelFor(pool, tasks, [&, E](int64_t task) {
    const int64_t end = std::min(r.n, (task + 1) * kRowsPerTask);
    for (int64_t i = task * kRowsPerTask; i < end; ++i) {
      const float* xi = x.typed_data() + i * E;
      float* yi = y->typed_data() + i * E;
      const float mu = rms ? 0.0f : RowSum(E, [&](int64_t e) { return xi[e]; }) / E;
      const float var = RowSum(E, [&](int64_t e) { return (xi[e] - mu) * (xi[e] - mu); }) / E;
      const float inv = 1.0f / std::sqrt(var + eps);
      for (int64_t e = 0; e < E; ++e) yi[e] = (xi[e] - mu) * inv * s[e] + b[e];
      mean->typed_data()[i] = mu;
      rstd->typed_data()[i] = inv;
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, bool rms) {
  Rows r;
  if (!ReadRows(x, scale, mean.element_count(), &r) || rstd.element_count() != mean.element_count() ||
      dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument(kShapeError);
  const int64_t E = r.width;
  const float* __restrict__ s = scale.typed_data();
  const int64_t tasks = (r.n + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<float> partial_dscale(tasks * E, 0.0f), partial_dbias(tasks * E, 0.0f);
  ParallelFor(pool, tasks, [&, E](int64_t task) {
    std::vector<float> xhat_row(E), g_row(E);
    // No two of these overlap: saying so lets the compiler vectorise the loops below.
    float* __restrict__ xhat = xhat_row.data();
    float* __restrict__ g = g_row.data();
    float* __restrict__ ds = partial_dscale.data() + task * E;
    float* __restrict__ db = partial_dbias.data() + task * E;
    const int64_t end = std::min(r.n, (task + 1) * kRowsPerTask);
    for (int64_t i = task * kRowsPerTask; i < end; ++i) {
      const float* __restrict__ xi = x.typed_data() + i * E;
      const float* __restrict__ dyi = dy.typed_data() + i * E;
      const float mu = mean.typed_data()[i], inv = rstd.typed_data()[i];
      for (int64_t e = 0; e < E; ++e) {
        xhat[e] = (xi[e] - mu) * inv;
        g[e] = dyi[e] * s[e];
        ds[e] += dyi[e] * xhat[e];
        db[e] += dyi[e];
      }
      const float g_mean = rms ? 0.0f : RowSum(E, [&](int64_t e) { return g[e]; }) / E;
      const float gx_mean = RowSum(E, [&](int64_t e) { return g[e] * xhat[e]; }) / E;
      float* __restrict__ dxi = dx->typed_data() + i * E;
      for (int64_t e = 0; e < E; ++e) dxi[e] = inv * (g[e] - g_mean - xhat[e] * gx_mean);
    }
  });
  // The tasks' partial sums, added in task order (e innermost, so the adds are vectorised).
  float* __restrict__ dscale_out = dscale->typed_data();
  float* __restrict__ dbias_out = dbias->typed_data();
  std::fill(dscale_out, dscale_out + E, 0.0f);
  std::fill(dbias_out, dbias_out + E, 0.0f);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t e = 0; e < E; ++e) {
      dscale_out[e] += partial_dscale[t * E + e];
      dbias_out[e] += partial_dbias[t * E + e];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuLayerNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<bool>("rms"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuLayerNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("rms"));
