// Self-attention within documents for XLA:CPU as two XLA FFI custom calls (forward and
// backward), float32, causal (decoders) or bidirectional (encoders) by the `causal` attribute.
//
// Why: XLA:CPU has no fused attention, so the explicit attention writes and reads [B, H, L, S]
// score arrays many times per layer (forward and backward); on a CPU that makes attention about
// twice as slow as a fused kernel. Here each (batch row, head) is one task whose scores stay in
// the core's cache: scores, softmax and the products are done block by block of query rows, and
// each block is computed against only the keys its rows may see: none after its last row when
// causal, none outside the span of its rows' documents (KeySpans) either way.
//
// Layouts (as in llm_jax/layers.py): q [B, L, H, D], k and v [B, L, K, D] with H = G * K heads
// (grouped-query attention), segment ids [B, L] int32: key j is visible to query i when both are
// in the same segment (document) and, if causal, j <= i. Outputs: out [B, L, H, D], lse [B, H, L]
// (the log-sum-exp of each query row's scaled scores, kept for the backward pass).
// Backward (FlashAttention's): recomputes a block's probabilities from q, k and lse, takes the
// softmax's row correction from rowsum(dout * out), returns dq [B, L, H, D], dk and dv [B, L, K, D].
//
// Built on first use by llm_jax/cpu_kernels.py with the machine's C++ compiler (-O3
// -march=native): the inner loops are plain C++ written so that the compiler vectorises them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <unordered_map>
#include <vector>

#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llm_jax::ExpNonPositive;
using llm_jax::ParallelFor;
using llm_jax::RowMax;
using llm_jax::RowSum;

namespace {

constexpr int kQueryBlock = 64;  // query rows per block: a block's scores are kQueryBlock x S floats
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// C[M, N] (+)= A[M, K] * B[K, N]. A(m, k) is A[m * a_row + k * a_col] (so A may be a transposed
// view), B and C are row-major with leading dimensions ldb and ldc. Register tiles of MR rows x
// NV vectors of 16 floats, written with GCC's vector extensions so that every ISA gets whole
// vector FMAs (one zmm per vector with AVX-512, two ymm with AVX2, NEON on ARM).

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));  // aligned(4): unaligned loads
constexpr int kVec = 16;
#ifdef __AVX512F__
constexpr int kTileRows = 6;  // 6 x 2 accumulators + 2 loaded vectors of 32 zmm registers
#else
constexpr int kTileRows = 3;  // 3 x 2 x 2 ymm accumulators + 4 loaded of 16 registers
#endif

template <int MR, int NV, bool ACCUMULATE>
inline void Tile(int K, const float* A, int64_t a_row, int64_t a_col, const float* B, int64_t ldb,
                 float* C, int64_t ldc) {
  Vec16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = ACCUMULATE ? *reinterpret_cast<const Vec16*>(C + r * ldc + v * kVec) : Vec16{};
  for (int k = 0; k < K; ++k) {
    Vec16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const Vec16*>(B + k * ldb + v * kVec);
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<Vec16*>(C + r * ldc + v * kVec) = acc[r][v];
}

// Columns [n0, N) that do not fill a whole vector: one column at a time.
template <bool ACCUMULATE>
inline void TailColumns(int M, int n0, int N, int K, const float* A, int64_t a_row, int64_t a_col,
                        const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int m = 0; m < M; ++m)
    for (int n = n0; n < N; ++n) {
      float acc = ACCUMULATE ? C[m * ldc + n] : 0.0f;
      for (int k = 0; k < K; ++k) acc += A[m * a_row + k * a_col] * B[k * ldb + n];
      C[m * ldc + n] = acc;
    }
}

// One band of MR rows: whole tiles of two vectors, then one vector, then single columns.
template <int MR, bool ACCUMULATE>
inline void RowBand(int N, int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                    int64_t ldb, float* C, int64_t ldc) {
  int n = 0;
  for (; n + 2 * kVec <= N; n += 2 * kVec) Tile<MR, 2, ACCUMULATE>(K, A, a_row, a_col, B + n, ldb, C + n, ldc);
  for (; n + kVec <= N; n += kVec) Tile<MR, 1, ACCUMULATE>(K, A, a_row, a_col, B + n, ldb, C + n, ldc);
  if (n < N) TailColumns<ACCUMULATE>(MR, n, N, K, A, a_row, a_col, B, ldb, C, ldc);
}

// A band of `rows` < kTileRows rows, for `rows` known at run time only.
template <int R, bool ACCUMULATE>
inline void LastRows(int rows, int N, int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      RowBand<R, ACCUMULATE>(N, K, A, a_row, a_col, B, ldb, C, ldc);
    else
      LastRows<R - 1, ACCUMULATE>(rows, N, K, A, a_row, a_col, B, ldb, C, ldc);
  }
}

template <bool ACCUMULATE>
void Gemm(int M, int N, int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
          int64_t ldb, float* C, int64_t ldc) {
  int m = 0;
  for (; m + kTileRows <= M; m += kTileRows)
    RowBand<kTileRows, ACCUMULATE>(N, K, A + m * a_row, a_row, a_col, B, ldb, C + m * ldc, ldc);
  // The last M % kTileRows rows as one band of that height, not row by row: a block of 64 query
  // rows leaves 4 with AVX-512's 6-row tiles.
  LastRows<kTileRows - 1, ACCUMULATE>(M - m, N, K, A + m * a_row, a_row, a_col, B, ldb, C + m * ldc, ldc);
}


// ---------------------------------------------------------------------------------------------
// Shapes and per-task helpers.

// A float buffer left uninitialised: every element is written before it is read, and zeroing it
// first (as std::vector does) cost ~3% of the kernels' time.
inline std::unique_ptr<float[]> Scratch(int64_t size) { return std::unique_ptr<float[]>(new float[size]); }

struct Dims {
  int64_t batch, length, heads, kv_heads, head_dim;
  int64_t group() const { return heads / kv_heads; }
};

constexpr char kShapeError[] = "cpu attention: q [B, L, H, D], k and v [B, L, K, D], H % K == 0";

// The dimensions from q and k, or false when their shapes do not fit together.
bool ReadDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, Dims* d) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[0] != kd[0] || qd[1] != kd[1] || qd[3] != kd[3] || kd[2] == 0 ||
      qd[2] % kd[2] != 0)
    return false;
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3]};
  return true;
}

// Rows of one head of a [B, L, N, D] array as a contiguous [L, D] copy, times `scale`.
void GatherHead(const float* x, int64_t b, int64_t head, int64_t n_heads, const Dims& d, float scale,
                float* out) {
  for (int64_t i = 0; i < d.length; ++i) {
    const float* src = x + ((b * d.length + i) * n_heads + head) * d.head_dim;
    for (int64_t e = 0; e < d.head_dim; ++e) out[i * d.head_dim + e] = src[e] * scale;
  }
}

// The same head transposed: [D, L]. In tiles of 16 rows, so that the stores run along whole
// output rows: element by element with a stride of L, the copy cost as much as the products.
void GatherHeadTransposed(const float* x, int64_t b, int64_t head, int64_t n_heads, const Dims& d,
                          float* out) {
  constexpr int64_t kTile = 16;
  const int64_t row_stride = n_heads * d.head_dim;
  const float* first = x + (b * d.length * n_heads + head) * d.head_dim;
  for (int64_t i0 = 0; i0 < d.length; i0 += kTile) {
    const int64_t rows = std::min(kTile, d.length - i0);
    for (int64_t e = 0; e < d.head_dim; ++e)
      for (int64_t i = 0; i < rows; ++i) out[e * d.length + i0 + i] = first[(i0 + i) * row_stride + e];
  }
}

void ScatterHead(const float* rows, int64_t b, int64_t head, int64_t n_heads, const Dims& d,
                 int64_t first_row, int64_t n_rows, float scale, float* x) {
  for (int64_t i = 0; i < n_rows; ++i) {
    float* dst = x + ((b * d.length + first_row + i) * n_heads + head) * d.head_dim;
    for (int64_t e = 0; e < d.head_dim; ++e) dst[e] = rows[i * d.head_dim + e] * scale;
  }
}

// For each query block (rows [i0, i0 + kQueryBlock)), the keys [begin, end) it is computed
// against: from the first key of its rows' documents to the last one, cut after the block's last
// row when causal. Packed documents are runs of equal
// ids, so a block of a short document skips the rest of the row; the span is taken from each id's
// first and last position, so any segment ids (runs or not) give a span that holds every visible
// key, and the mask is still applied inside it.
struct KeySpan {
  int64_t begin, end;
};

std::vector<KeySpan> KeySpans(const int32_t* seg, int64_t length, bool causal) {
  std::unordered_map<int32_t, KeySpan> extent;  // id -> [first, last + 1)
  for (int64_t j = 0; j < length; ++j) {
    auto [it, added] = extent.try_emplace(seg[j], KeySpan{j, j + 1});
    if (!added) it->second.end = j + 1;
  }
  std::vector<KeySpan> spans;
  for (int64_t i0 = 0; i0 < length; i0 += kQueryBlock) {
    const int64_t last = std::min<int64_t>(i0 + kQueryBlock, length);
    KeySpan span{length, 0};
    for (int64_t i = i0; i < last; ++i) {
      const KeySpan& doc = extent[seg[i]];
      span = KeySpan{std::min(span.begin, doc.begin), std::max(span.end, doc.end)};
    }
    if (causal) span.end = std::min(span.end, last);  // no key after the block's last row
    spans.push_back(span);
  }
  return spans;
}

// Probabilities of query rows [i0, i0 + rows) against keys [span.begin, span.end) from their
// scores (in place; column c is key span.begin + c): masked entries become 0. With `lse` ==
// nullptr the row statistics are computed and returned in row_max / row_sum (forward,
// unnormalised p = exp(s - max)); otherwise p = exp(s - lse).
void Probabilities(float* scores, int64_t ld, int64_t i0, int rows, KeySpan span, const int32_t* seg,
                   bool causal, const float* lse, float* row_max, float* row_sum) {
  const int64_t width = span.end - span.begin;
  const int32_t* seg_keys = seg + span.begin;
  for (int r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const int64_t last_visible = causal ? i - span.begin : width;  // column of key i when causal
    const int32_t seg_i = seg[i];
    float* s = scores + r * ld;
    auto visible = [&](int64_t c) { return c <= last_visible && seg_keys[c] == seg_i; };
    const float m = lse != nullptr ? lse[i] : RowMax(width, kNegInf, [&](int64_t c) {
      return visible(c) ? s[c] : kNegInf;
    });
    const float total = RowSum(width, [&](int64_t c) {
      s[c] = visible(c) ? ExpNonPositive(s[c] - m) : 0.0f;
      return s[c];
    });
    if (lse == nullptr) {
      row_max[r] = m;
      row_sum[r] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, bool causal) {
  Dims d;
  if (!ReadDims(q, k, &d)) return ffi::Error::InvalidArgument(kShapeError);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
  ParallelFor(pool, d.batch * d.heads, [&, d, scale, causal](int64_t task) {
    const int64_t b = task / d.heads, h = task % d.heads, kv = h / d.group();
    const int64_t L = d.length, D = d.head_dim;
    auto qc = Scratch(L * D), kt = Scratch(D * L), vc = Scratch(L * D), scores = Scratch(kQueryBlock * L),
         o = Scratch(kQueryBlock * D);
    float row_max[kQueryBlock], row_sum[kQueryBlock];
    GatherHead(q.typed_data(), b, h, d.heads, d, scale, qc.get());
    GatherHeadTransposed(k.typed_data(), b, kv, d.kv_heads, d, kt.get());
    GatherHead(v.typed_data(), b, kv, d.kv_heads, d, 1.0f, vc.get());
    const int32_t* seg = segment_ids.typed_data() + b * L;
    const std::vector<KeySpan> spans = KeySpans(seg, L, causal);
    for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, L - i0));
      const KeySpan span = spans[i0 / kQueryBlock];
      const int64_t width = span.end - span.begin;
      Gemm<false>(rows, width, D, qc.get() + i0 * D, D, 1, kt.get() + span.begin, L, scores.get(), width);
      Probabilities(scores.get(), width, i0, rows, span, seg, causal, nullptr, row_max, row_sum);
      Gemm<false>(rows, D, width, scores.get(), width, 1, vc.get() + span.begin * D, D, o.get(), D);
      for (int r = 0; r < rows; ++r) {
        const float inv = 1.0f / row_sum[r];
        for (int64_t e = 0; e < D; ++e) o[r * D + e] *= inv;
        lse->typed_data()[(b * d.heads + h) * L + i0 + r] = row_max[r] + std::log(row_sum[r]);
      }
      ScatterHead(o.get(), b, h, d.heads, d, i0, rows, 1.0f, out->typed_data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, bool causal) {
  Dims d;
  if (!ReadDims(q, k, &d)) return ffi::Error::InvalidArgument(kShapeError);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.head_dim));
  // One task per (batch row, kv head): it owns dk and dv of that head, summed over its group.
  ParallelFor(pool, d.batch * d.kv_heads, [&, d, scale, causal](int64_t task) {
    const int64_t b = task / d.kv_heads, kv = task % d.kv_heads;
    const int64_t L = d.length, D = d.head_dim;
    auto kc = Scratch(L * D), kt = Scratch(D * L), vt = Scratch(D * L), qc = Scratch(L * D), doc = Scratch(L * D),
         oc = Scratch(L * D), probs = Scratch(kQueryBlock * L), dprobs = Scratch(kQueryBlock * L),
         dq_rows = Scratch(kQueryBlock * D), delta = Scratch(L);
    std::vector<float> dk_acc(L * D, 0.0f), dv_acc(L * D, 0.0f);
    GatherHead(k.typed_data(), b, kv, d.kv_heads, d, 1.0f, kc.get());
    GatherHeadTransposed(k.typed_data(), b, kv, d.kv_heads, d, kt.get());
    GatherHeadTransposed(v.typed_data(), b, kv, d.kv_heads, d, vt.get());
    const int32_t* seg = segment_ids.typed_data() + b * L;
    const std::vector<KeySpan> spans = KeySpans(seg, L, causal);
    for (int64_t g = 0; g < d.group(); ++g) {
      const int64_t h = kv * d.group() + g;
      GatherHead(q.typed_data(), b, h, d.heads, d, scale, qc.get());
      GatherHead(dout.typed_data(), b, h, d.heads, d, 1.0f, doc.get());
      GatherHead(out.typed_data(), b, h, d.heads, d, 1.0f, oc.get());
      for (int64_t i = 0; i < L; ++i)  // rowsum(dp * p) = rowsum(dout * out)
        delta[i] = RowSum(D, [&](int64_t e) { return doc[i * D + e] * oc[i * D + e]; });
      const float* row_lse = lse.typed_data() + (b * d.heads + h) * L;
      for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kQueryBlock, L - i0));
        const KeySpan span = spans[i0 / kQueryBlock];
        const int64_t width = span.end - span.begin, first = span.begin;
        Gemm<false>(rows, width, D, qc.get() + i0 * D, D, 1, kt.get() + first, L, probs.get(), width);
        Probabilities(probs.get(), width, i0, rows, span, seg, causal, row_lse, nullptr, nullptr);
        // dv[span] += p^T dout_block
        Gemm<true>(width, D, rows, probs.get(), 1, width, doc.get() + i0 * D, D, dv_acc.data() + first * D, D);
        // dp = dout_block v^T; then dscores = p * (dp - delta) in place
        Gemm<false>(rows, width, D, doc.get() + i0 * D, D, 1, vt.get() + first, L, dprobs.get(), width);
        for (int r = 0; r < rows; ++r) {
          const float dl = delta[i0 + r];
          float* ds = dprobs.get() + r * width;
          const float* p = probs.get() + r * width;
          for (int64_t c = 0; c < width; ++c) ds[c] = p[c] * (ds[c] - dl);
        }
        // dq_block = scale * dscores k; dk[span] += dscores^T (scale * q_block)
        Gemm<false>(rows, D, width, dprobs.get(), width, 1, kc.get() + first * D, D, dq_rows.get(), D);
        ScatterHead(dq_rows.get(), b, h, d.heads, d, i0, rows, scale, dq->typed_data());
        Gemm<true>(width, D, rows, dprobs.get(), 1, width, qc.get() + i0 * D, D, dk_acc.data() + first * D, D);
      }
    }
    ScatterHead(dk_acc.data(), b, kv, d.kv_heads, d, 0, L, 1.0f, dk->typed_data());
    ScatterHead(dv_acc.data(), b, kv, d.kv_heads, d, 0, L, 1.0f, dv->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmJaxCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal"));
