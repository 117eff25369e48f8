// Softmax statistics of float32 logits rows for the cross-entropy loss on XLA:CPU, via XLA FFI.
// XLA:CPU reads a [rows, V] logits array once per statistic (max, sum of exponentials, the target's logit,
// the accuracy's compare-and-reduce); here each row (32 KB for V = 8192, in L1/L2) is read from memory once:
//   forward   lse = max + log(sum exp(x - max)), the target's logit x[t], correct = (argmax x == t, ties to
//             the lowest index, as jnp.argmax), and the mean logit when asked for (label smoothing);
//   backward  d = g_lse * exp(x - lse) + g_mean / V, plus g_target at the target.
// A target outside [0, V) has a NaN logit, is never correct and gets no one-hot gradient.
// Rows are split into one block per core on XLA's intra-op thread pool (parallel.h).
// Built on first use by llmjax/kernels/cpu_cross_entropy.py (c++ -O3 -march=native ...).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "vmath.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
// fn(r0, r1) over rows [0, R) in one block per core (a small problem on the calling thread).
template <typename F>
void for_row_blocks(ffi::ThreadPool& pool, int64_t R, int64_t V, F&& fn) {
  const int64_t workers = R * V < (int64_t(1) << 16) ? 1 : std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), R));
  const int64_t chunk = (R + workers - 1) / workers;
  const int blocks = int(chunk ? (R + chunk - 1) / chunk : 0);
  auto run = [&](int i) { fn(i * chunk, std::min(R, (i + 1) * chunk)); };
  if (blocks == 1) {
    run(0);
  } else if (blocks > 1) {
    llmjax::parallel_for(pool, blocks, run);
  }
}

ffi::Error Check(const ffi::Buffer<ffi::F32>& logits, const ffi::Buffer<ffi::S32>& targets, int64_t& R, int64_t& V) {
  auto d = logits.dimensions();
  if (d.size() != 2) return ffi::Error::InvalidArgument("llmjax cross-entropy: logits must be [rows, V]");
  R = d[0];
  V = d[1];
  if (int64_t(targets.element_count()) != R)
    return ffi::Error::InvalidArgument("llmjax cross-entropy: targets must have one element per row");
  return ffi::Error::Success();
}

ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                     ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> target_logit,
                     ffi::ResultBuffer<ffi::PRED> correct, ffi::ResultBuffer<ffi::F32> mean) {
  int64_t R = 0, V = 0;
  if (auto e = Check(logits, targets, R, V); e.failure()) return e;
  const bool with_mean = mean->element_count() != 0;
  if (int64_t(lse->element_count()) != R || int64_t(target_logit->element_count()) != R ||
      int64_t(correct->element_count()) != R || (with_mean && int64_t(mean->element_count()) != R))
    return ffi::Error::InvalidArgument("llmjax cross-entropy: outputs must have one element per row");
  if (V == 0) return ffi::Error::InvalidArgument("llmjax cross-entropy: empty vocabulary");
  const float* X = logits.typed_data();
  const int32_t* T = targets.typed_data();
  float* L = lse->typed_data();
  float* TL = target_logit->typed_data();
  bool* C = correct->typed_data();
  float* M = with_mean ? mean->typed_data() : nullptr;
  for_row_blocks(pool, R, V, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict x = X + r * V;
      const int32_t t = T[r];
      const bool in_range = t >= 0 && t < V;
      const float mx = llmjax::lane_max(x, V);
      const float s = llmjax::lane_sum(V, [&](int64_t j) { return llmjax::exp_nonpositive(x[j] - mx); });
      L[r] = std::isinf(mx) ? mx : mx + std::log(s);  // all -inf: -inf, as XLA
      TL[r] = in_range ? x[t] : NAN;
      // The target is argmax iff its logit is the maximum and no earlier logit equals it.
      bool ok = in_range && x[t] == mx;
      for (int64_t j = 0; ok && j < t; ++j) ok = x[j] != mx;
      C[r] = ok;
      if (M != nullptr) M[r] = llmjax::lane_sum(V, [&](int64_t j) { return x[j]; }) / float(V);
    }
  });
  return ffi::Error::Success();
}

ffi::Error StatsBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> g_lse, ffi::Buffer<ffi::F32> g_target,
                        ffi::Buffer<ffi::F32> g_mean, ffi::ResultBuffer<ffi::F32> dlogits) {
  int64_t R = 0, V = 0;
  if (auto e = Check(logits, targets, R, V); e.failure()) return e;
  const bool with_mean = g_mean.element_count() != 0;
  if (int64_t(lse.element_count()) != R || int64_t(g_lse.element_count()) != R ||
      int64_t(g_target.element_count()) != R || (with_mean && int64_t(g_mean.element_count()) != R) ||
      dlogits->element_count() != logits.element_count())
    return ffi::Error::InvalidArgument("llmjax cross-entropy: gradient operands do not match the logits");
  const float* X = logits.typed_data();
  const int32_t* T = targets.typed_data();
  const float* L = lse.typed_data();
  const float* GL = g_lse.typed_data();
  const float* GT = g_target.typed_data();
  const float* GM = with_mean ? g_mean.typed_data() : nullptr;
  float* D = dlogits->typed_data();
  for_row_blocks(pool, R, V, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* __restrict x = X + r * V;
      float* __restrict d = D + r * V;
      const float l = L[r], gl = GL[r], gm = GM != nullptr ? GM[r] / float(V) : 0.0f;
      for (int64_t j = 0; j < V; ++j) d[j] = gl * llmjax::exp_nonpositive(x[j] - l) + gm;
      const int32_t t = T[r];
      if (t >= 0 && t < V) d[t] += GT[r];
    }
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoftmaxStats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits [rows, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets [rows]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logsumexp [rows]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // target logit [rows]
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // argmax == target [rows]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // mean logit [rows], or [0]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoftmaxStatsBwd, StatsBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits [rows, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets [rows]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logsumexp [rows]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // its cotangent
                                  .Arg<ffi::Buffer<ffi::F32>>()   // the target logit's cotangent
                                  .Arg<ffi::Buffer<ffi::F32>>()   // the mean logit's cotangent, or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d logits [rows, V]
