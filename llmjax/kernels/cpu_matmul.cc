// float32 matmul for XLA:CPU via XLA FFI, on OpenBLAS's sgemm (the scipy-openblas32 wheel, loaded by
// llmjax/kernels/cpu_matmul.py, which hands this library the address of `scipy_cblas_sgemm`).
// C[M, N] = op(A) op(B) (+ bias[N]) with A [M, K] or, transposed, [K, M]; B [K, N] or, transposed, [N, K];
// row-major. The output is cut into one block of rows (or, when N > M, of columns) per core, each computed
// by a single-threaded sgemm call on XLA's intra-op thread pool (parallel.h), so the kernel uses the
// cores XLA gives it and no BLAS threads compete with XLA's. With a bias, each block is first filled
// with it and sgemm accumulates onto it (beta = 1), so the bias costs no separate pass over C.
//
// Work that would otherwise be a separate XLA pass over a large operand is done on each block while it is
// still the thread's own:
//   epilogue gelu / relu     U = op(A) op(B) + bias (the pre-activation, kept for the backward pass) and
//                            C = act(U): a Linear followed by its activation;
//   epilogue gelu / relu_grad  C = (op(A) op(B)) * act'(aux) with aux the saved pre-activation: the gradient
//                            flowing from an MLP's output projection back through its activation;
//   sum_a                    S[K] = the column sums of A [M, K] (not transposed): with A the gradient of a
//                            Linear's output and B its weight, C is the input's gradient and S the bias's.
// Exact GELU is x Phi(x) with erf from Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), written as plain
// loops the compiler vectorizes (-O3 -march=native).
// Built on first use by llmjax/kernels/cpu_matmul.py (c++ -O3 -shared -fPIC ...).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
// cblas_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), 32-bit ints.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int kAlign = 16;  // block edges fall on multiples of 16 rows / columns (one AVX-512 vector)
Sgemm g_sgemm = nullptr;

// The `epilogue` attribute (cpu_matmul.py's EPILOGUES).
enum Epilogue : int64_t { kNone = 0, kGelu = 1, kRelu = 2, kGeluGrad = 3, kReluGrad = 4 };

// Phi(u) = (1 + erf(u / sqrt 2)) / 2 and phi(u) = exp(-u^2 / 2) / sqrt(2 pi), sharing one exp.
inline void normal_cdf_pdf(float u, float& cdf, float& pdf) {
  const float z = std::fabs(u) * 0.70710678118654752f;
  const float e = llmjax::exp_nonpositive(-z * z);
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                     t * 1.061405429f))));
  const float half_erf = 0.5f - 0.5f * poly * e;  // erf(|z|) / 2
  cdf = 0.5f + std::copysign(half_erf, u);
  pdf = e * 0.39894228040143268f;
}

// The epilogue on rows [0, m) x columns [0, n) of a block starting at C (and at U / aux), row stride ld.
void epilogue(Epilogue kind, float* __restrict C, float* __restrict U, const float* __restrict aux, int64_t m,
              int64_t n, int64_t ld) {
  for (int64_t r = 0; r < m; ++r) {
    float* __restrict c = C + r * ld;
    switch (kind) {
      case kGelu: {
        float* __restrict u = U + r * ld;
        for (int64_t j = 0; j < n; ++j) {
          float cdf, pdf;
          normal_cdf_pdf(u[j], cdf, pdf);
          c[j] = u[j] * cdf;
        }
        break;
      }
      case kRelu: {
        const float* __restrict u = U + r * ld;
        for (int64_t j = 0; j < n; ++j) c[j] = std::max(u[j], 0.0f);
        break;
      }
      case kGeluGrad: {
        const float* __restrict u = aux + r * ld;
        for (int64_t j = 0; j < n; ++j) {
          float cdf, pdf;
          normal_cdf_pdf(u[j], cdf, pdf);
          c[j] *= cdf + u[j] * pdf;
        }
        break;
      }
      case kReluGrad: {
        const float* __restrict u = aux + r * ld;
        for (int64_t j = 0; j < n; ++j) c[j] = u[j] > 0.0f ? c[j] : 0.0f;
        break;
      }
      default:
        return;
    }
  }
}

// out[0, k) += the sums of rows [r0, r1) of A [*, k].
void sum_rows(const float* __restrict A, int64_t k, int64_t r0, int64_t r1, float* __restrict out) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict a = A + r * k;
    for (int64_t j = 0; j < k; ++j) out[j] += a[j];
  }
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> aux, ffi::ResultBuffer<ffi::F32> c,
                      ffi::ResultBuffer<ffi::F32> pre, ffi::ResultBuffer<ffi::F32> sums, bool trans_a, bool trans_b,
                      int64_t epilogue_kind, bool sum_a) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("llmjax_matmul: sgemm is not loaded");
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("llmjax_matmul: A, B and C must be 2-D");
  const int64_t M = dc[0], N = dc[1], K = trans_a ? da[0] : da[1];
  if ((trans_a ? da[1] : da[0]) != M || (trans_b ? db[1] : db[0]) != K || (trans_b ? db[0] : db[1]) != N)
    return ffi::Error::InvalidArgument("llmjax_matmul: shapes of A, B and C do not match");
  if (bias.element_count() != 0 && int64_t(bias.element_count()) != N)
    return ffi::Error::InvalidArgument("llmjax_matmul: bias must have N elements (or none)");
  if (epilogue_kind < kNone || epilogue_kind > kReluGrad)
    return ffi::Error::InvalidArgument("llmjax_matmul: unknown epilogue");
  const Epilogue kind = static_cast<Epilogue>(epilogue_kind);
  const bool keeps_pre = kind == kGelu || kind == kRelu, reads_aux = kind == kGeluGrad || kind == kReluGrad;
  if (int64_t(pre->element_count()) != (keeps_pre ? M * N : 0))
    return ffi::Error::InvalidArgument("llmjax_matmul: the pre-activation output must be [M, N] with a gelu/relu "
                                       "epilogue and empty otherwise");
  if (int64_t(aux.element_count()) != (reads_aux ? M * N : 0))
    return ffi::Error::InvalidArgument("llmjax_matmul: aux must be the [M, N] pre-activation with a gradient "
                                       "epilogue and empty otherwise");
  if (sum_a && trans_a) return ffi::Error::InvalidArgument("llmjax_matmul: sum_a needs A not transposed");
  if (int64_t(sums->element_count()) != (sum_a ? K : 0))
    return ffi::Error::InvalidArgument("llmjax_matmul: the sums output must have K elements with sum_a");
  float* S = sums->typed_data();
  if (sum_a) std::fill(S, S + K, 0.0f);
  const float* A = a.typed_data();
  if (M == 0 || N == 0) {
    if (sum_a) sum_rows(A, K, 0, M, S);
    return ffi::Error::Success();
  }
  const float* B = b.typed_data();
  const float* bi = bias.element_count() ? bias.typed_data() : nullptr;
  float* C = c->typed_data();
  float* U = keeps_pre ? pre->typed_data() : nullptr;
  float* G = keeps_pre ? U : C;  // where sgemm writes
  const float* X = aux.typed_data();
  const int lda = int(std::max<int64_t>(1, da[1])), ldb = int(std::max<int64_t>(1, db[1]));

  const bool by_rows = M >= N;
  const int64_t extent = by_rows ? M : N;
  // One block per core; a matmul too small to be worth a thread hand-off runs on the calling thread.
  const int64_t workers = (M * N * std::max<int64_t>(K, 1) < (int64_t(1) << 21)) ? 1 : pool.num_threads();
  int64_t block = (extent + workers - 1) / workers;
  block = std::min(extent, (block + kAlign - 1) / kAlign * kAlign);
  const int blocks = int((extent + block - 1) / block);
  // Column sums of A: each row block sums its own rows of A into its partial; a column split (every block
  // reads all of A) sums A's rows in `blocks` chunks afterwards.
  std::vector<float> partial(sum_a ? size_t(blocks) * K : 0, 0.0f);
  const int64_t sum_chunk = (M + blocks - 1) / blocks;

  auto run = [&](int i) {
    const int64_t lo = i * block, len = std::min(block, extent - lo);
    const int64_t m0 = by_rows ? lo : 0, m = by_rows ? len : M;
    const int64_t n0 = by_rows ? 0 : lo, n = by_rows ? N : len;
    float* Gb = G + m0 * N + n0;
    if (bi != nullptr)
      for (int64_t r = 0; r < m; ++r) std::memcpy(Gb + r * N, bi + n0, n * sizeof(float));
    const float* Ab = trans_a ? A + m0 : A + m0 * lda;
    const float* Bb = trans_b ? B + n0 * ldb : B + n0;
    g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n), int(K), 1.0f, Ab,
            lda, Bb, ldb, bi != nullptr ? 1.0f : 0.0f, Gb, int(N));
    if (kind != kNone)
      epilogue(kind, C + m0 * N + n0, U ? U + m0 * N + n0 : nullptr, reads_aux ? X + m0 * N + n0 : nullptr, m, n, N);
    if (sum_a) {
      const int64_t r0 = by_rows ? m0 : std::min(M, i * sum_chunk), r1 = by_rows ? m0 + m : std::min(M, r0 + sum_chunk);
      sum_rows(A, K, r0, r1, partial.data() + size_t(i) * K);
    }
  };
  if (blocks == 1) {
    run(0);
  } else {
    llmjax::parallel_for(pool, blocks, run);
  }
  for (int i = 0; sum_a && i < blocks; ++i)
    for (int64_t j = 0; j < K; ++j) S[j] += partial[size_t(i) * K + j];
  return ffi::Error::Success();
}
}  // namespace

extern "C" void LlmjaxSetSgemm(void* sgemm) { g_sgemm = reinterpret_cast<Sgemm>(sgemm); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // A
                                  .Arg<ffi::Buffer<ffi::F32>>()  // B
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [N], or [0] for none
                                  .Arg<ffi::Buffer<ffi::F32>>()  // aux [M, N] for a gradient epilogue, else [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // C
                                  .Ret<ffi::Buffer<ffi::F32>>()  // U [M, N] for a gelu/relu epilogue, else [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // S [K] with sum_a, else [0]
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("epilogue")
                                  .Attr<bool>("sum_a"));
