// float32 matmul for XLA:CPU via XLA FFI, on OpenBLAS's sgemm (the scipy-openblas32 wheel, loaded by
// llmjax/kernels/cpu_matmul.py, which hands this library the address of `scipy_cblas_sgemm`).
// C[M, N] = op(A) op(B) (+ bias[N]) with A [M, K] or, transposed, [K, M]; B [K, N] or, transposed, [N, K];
// row-major. The output is cut into one block of rows (or, when N > M, of columns) per core, each computed
// by a single-threaded sgemm call on XLA's intra-op thread pool (parallel.h), so the kernel uses the
// cores XLA gives it and no BLAS threads compete with XLA's. With a bias, each block is first filled
// with it and sgemm accumulates onto it (beta = 1), so the bias costs no separate pass over C.
// Built on first use by llmjax/kernels/cpu_matmul.py (c++ -O3 -shared -fPIC ...).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
// cblas_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), 32-bit ints.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int kAlign = 16;  // block edges fall on multiples of 16 rows / columns (one AVX-512 vector)
Sgemm g_sgemm = nullptr;

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("llmjax_matmul: sgemm is not loaded");
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("llmjax_matmul: A, B and C must be 2-D");
  const int64_t M = dc[0], N = dc[1], K = trans_a ? da[0] : da[1];
  if ((trans_a ? da[1] : da[0]) != M || (trans_b ? db[1] : db[0]) != K || (trans_b ? db[0] : db[1]) != N)
    return ffi::Error::InvalidArgument("llmjax_matmul: shapes of A, B and C do not match");
  if (bias.element_count() != 0 && int64_t(bias.element_count()) != N)
    return ffi::Error::InvalidArgument("llmjax_matmul: bias must have N elements (or none)");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  const float* bi = bias.element_count() ? bias.typed_data() : nullptr;
  float* C = c->typed_data();
  const int lda = int(std::max<int64_t>(1, da[1])), ldb = int(std::max<int64_t>(1, db[1]));

  const bool by_rows = M >= N;
  const int64_t extent = by_rows ? M : N;
  // One block per core; a matmul too small to be worth a thread hand-off runs on the calling thread.
  const int64_t workers = (M * N * std::max<int64_t>(K, 1) < (int64_t(1) << 21)) ? 1 : pool.num_threads();
  int64_t block = (extent + workers - 1) / workers;
  block = std::min(extent, (block + kAlign - 1) / kAlign * kAlign);
  const int blocks = int((extent + block - 1) / block);

  auto run = [&](int i) {
    const int64_t lo = i * block, len = std::min(block, extent - lo);
    const int64_t m0 = by_rows ? lo : 0, m = by_rows ? len : M;
    const int64_t n0 = by_rows ? 0 : lo, n = by_rows ? N : len;
    float* Cb = C + m0 * N + n0;
    if (bi != nullptr)
      for (int64_t r = 0; r < m; ++r) std::memcpy(Cb + r * N, bi + n0, n * sizeof(float));
    const float* Ab = trans_a ? A + m0 : A + m0 * lda;
    const float* Bb = trans_b ? B + n0 * ldb : B + n0;
    g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n), int(K), 1.0f, Ab,
            lda, Bb, ldb, bi != nullptr ? 1.0f : 0.0f, Cb, int(N));
  };
  if (blocks == 1) {
    run(0);
  } else {
    llmjax::parallel_for(pool, blocks, run);
  }
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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // C
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
