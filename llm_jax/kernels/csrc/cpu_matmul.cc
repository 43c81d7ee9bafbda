// Float32 matmul for XLA:CPU as an XLA FFI custom call: C[M, N] = op(A) @ op(B) through OpenBLAS.
//
// Why: XLA:CPU's own matmuls (YNNPACK, and Eigen for weight gradients, which contract over the
// token axis) run the baby GPT's shapes 5-40% slower than an optimised BLAS (docs/benchmarks.md).
// op(X) is X or its transpose (attributes transpose_a, transpose_b), so a dense layer's forward,
// input gradient and weight gradient are all one call on the arrays as they lie.
//
// Threads: OpenBLAS runs single-threaded here (set once by llm_jax/cpu_kernels.py); the rows (or
// columns) of C are split into one band per thread of XLA's intra-op pool, so no second thread
// pool spins beside XLA's.

#include <algorithm>
#include <cstdint>

#include "cblas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llm_jax::ParallelFor;

namespace {

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2)
    return ffi::Error::InvalidArgument("cpu matmul: 2-D operands only");
  const int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int64_t n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k)
    return ffi::Error::InvalidArgument("cpu matmul: contracted dimensions differ");
  const float* a_ptr = a.typed_data();
  const float* b_ptr = b.typed_data();
  float* c_ptr = c->typed_data();
  const int64_t lda = ad[1], ldb = bd[1];
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill(c_ptr, c_ptr + m * n, 0.0f);
    return ffi::Error::Success();
  }
  const auto ta = transpose_a ? CblasTrans : CblasNoTrans;
  const auto tb = transpose_b ? CblasTrans : CblasNoTrans;
  // Bands along the longer side of C, at least 64 wide so each call stays a good BLAS shape.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t bands = std::max<int64_t>(1, std::min(threads, extent / 64));
  const int64_t band = (extent + bands - 1) / bands;
  ParallelFor(pool, bands, [&](int64_t i) {
    const int64_t start = i * band, size = std::min(band, extent - start);
    if (size <= 0) return;
    if (split_rows) {  // rows [start, start + size) of op(A) and of C
      const float* a_band = a_ptr + (transpose_a ? start : start * lda);
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, size, n, k, 1.0f, a_band, lda, b_ptr, ldb, 0.0f,
                        c_ptr + start * n, n);
    } else {  // columns [start, start + size) of op(B) and of C
      const float* b_band = b_ptr + (transpose_b ? start * ldb : start);
      scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, size, k, 1.0f, a_ptr, lda, b_band, ldb, 0.0f,
                        c_ptr + start, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
