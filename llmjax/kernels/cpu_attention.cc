// Causal + packed (segment ids / positions) attention for XLA:CPU via XLA FFI.
// Layout: q, k, v, o [B, T, N, H] float32, H == 64, any T with T % 64 == 0. seg/pos [B, T] int32.
// Forward: O and lse [B, N, T]. Backward: dQ, dK, dV from (q, k, v, seg, pos, o, lse, dO).
// Work is split over (batch, head) items, run by parallel.h's parallel_for on XLA's intra-op thread pool
// (one worker per core). Per item: Q/K/V(/dO) are copied into contiguous
// scratch (K^T, Q^T, dO^T as 64x64-blocked transposes) and all matmuls are 64x64 tiles done by a
// register-blocked AVX-512 microkernel (6 rows x 64 columns of accumulators, broadcast-A x row-of-B FMA).
// Skipped work: key blocks above the diagonal (kb > qb, in index order), the masked half of diagonal
// tiles (per 6-row strip), and block pairs whose non-zero segment-id ranges do not overlap (packing,
// all-padding blocks). Index-order causality assumes, as llmjax's causal_blocks_attention does, that
// positions increase with the index within a segment and a segment id is one contiguous run.
// Limits: H == 64, T % 64 == 0, float32 only. Per-item scratch (thread_local, reused across calls) is
// linear in T: forward 4*T*H + BL*T + BL*H floats (+ masks/ranges), backward 8*T*H + 5*BL*BL + T floats.
// Built on first use by llmjax/kernels/cpu_attention.py (c++ -O3 -march=native -shared -fPIC ...).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using llmjax::parallel_for;

namespace {
constexpr int H = 64;   // head dim
constexpr int BL = 64;  // block size (queries and keys)

#ifndef ATTN_MR
#define ATTN_MR 6
#endif

// C[MR x 16*NV] (+)= A[MR x K] * B[K x 16*NV]; A row-major (lda), B row-major (ldb), C (ldc).
// Register-blocked: MR*NV accumulators, per k: NV loads of B, MR broadcasts of A, MR*NV FMAs.
template <int MR, int NV, bool ACC>
static inline void micro(const float* __restrict A, long lda, const float* __restrict B, long ldb,
                         float* __restrict C, long ldc, int K) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x)
      c[r][x] = ACC ? _mm512_loadu_ps(C + r * ldc + 16 * x) : _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    __m512 bv[NV];
    for (int x = 0; x < NV; ++x) bv[x] = _mm512_loadu_ps(b + 16 * x);
    for (int r = 0; r < MR; ++r) {
      __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int x = 0; x < NV; ++x) c[r][x] = _mm512_fmadd_ps(a, bv[x], c[r][x]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int x = 0; x < NV; ++x) _mm512_storeu_ps(C + r * ldc + 16 * x, c[r][x]);
}

template <int MR, bool ACC>
static inline void micro_nv(int nv, const float* A, long lda, const float* B, long ldb, float* C, long ldc, int K) {
  switch (nv) {
    case 4: micro<MR, 4, ACC>(A, lda, B, ldb, C, ldc, K); break;
    case 3: micro<MR, 3, ACC>(A, lda, B, ldb, C, ldc, K); break;
    case 2: micro<MR, 2, ACC>(A, lda, B, ldb, C, ldc, K); break;
    case 1: micro<MR, 1, ACC>(A, lda, B, ldb, C, ldc, K); break;
    default: break;
  }
}

struct Strip { int k0, k1, c0, nv; };  // contraction range [k0, k1), column vectors [c0, c0 + nv)

// C[64 x 64] (+)= A[64 x K] * B[K x 64], with per-row-strip trimming: fn(i, rows) -> Strip says which
// part of the contraction and which 16-column groups strip [i, i + rows) needs (the rest is masked).
template <bool ACC, typename Fn>
static inline void gemm64_trim(const float* A, long lda, const float* B, long ldb, float* C, long ldc, Fn fn) {
  constexpr int MR = ATTN_MR;
  int i = 0;
  auto run = [&](auto mr_tag) {
    constexpr int R = decltype(mr_tag)::value;
    Strip st = fn(i, R);
    if (st.nv > 0 && st.k1 > st.k0)
      micro_nv<R, ACC>(st.nv, A + i * lda + st.k0, lda, B + st.k0 * ldb + 16 * st.c0, ldb,
                       C + i * ldc + 16 * st.c0, ldc, st.k1 - st.k0);
    i += R;
  };
  while (i + MR <= 64) run(std::integral_constant<int, MR>{});
  while (i + 4 <= 64) run(std::integral_constant<int, 4>{});
  while (i < 64) run(std::integral_constant<int, 1>{});
}

template <bool ACC>
static inline void gemm64(const float* A, long lda, const float* B, long ldb, float* C, long ldc, int K) {
  gemm64_trim<ACC>(A, lda, B, ldb, C, ldc, [K](int, int) { return Strip{0, K, 0, 4}; });
}

// exp for float32 lanes; inputs clamped to [-87, 88]. Degree-6 Taylor on [-ln2/2, ln2/2].
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16x16 transpose in registers: dst[c * ldd + r] = src[r * lds + c].
static inline void transpose16(const float* __restrict src, long lds, float* __restrict dst, long ldd) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: column 4L + c, rows 4i..4i+3
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), x1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    __m512 y0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    _mm512_storeu_ps(dst + (0 + c) * ldd, _mm512_shuffle_f32x4(x0, y0, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * ldd, _mm512_shuffle_f32x4(x1, y1, 0x88));
    _mm512_storeu_ps(dst + (8 + c) * ldd, _mm512_shuffle_f32x4(x0, y0, 0xDD));
    _mm512_storeu_ps(dst + (12 + c) * ldd, _mm512_shuffle_f32x4(x1, y1, 0xDD));
  }
}

// dst[h * 64 + j] = src[j * 64 + h] for a contiguous 64x64 tile.
static inline void transpose64(const float* __restrict src, float* __restrict dst) {
  for (int rb = 0; rb < 64; rb += 16)
    for (int cb = 0; cb < 64; cb += 16) transpose16(src + rb * 64 + cb, 64, dst + cb * 64 + rb, 64);
}

// Per 64-token block: the range [lo, hi] of its non-zero segment ids (lo > hi when all padding).
// A (query block, key block) pair can only have visible entries if the ranges overlap.
struct SegRange { int lo, hi; };

// Per-thread scratch, grown on demand (never shrunk) and reused across items and calls.
struct alignas(64) Scratch {
  std::vector<float, std::allocator<float>> buf;
  std::vector<__mmask16> masks;  // forward: [BL][T / 16] visibility masks of one query block
  std::vector<SegRange> rng;     // [T / BL]
  float* get(size_t n) {
    if (buf.size() < n + 16) buf.resize(n + 16);
    uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
  }
  __mmask16* get_masks(size_t n) {
    if (masks.size() < n) masks.resize(n);
    return masks.data();
  }
  SegRange* get_rng(size_t n) {
    if (rng.size() < n) rng.resize(n);
    return rng.data();
  }
};
static thread_local Scratch tl_scratch;

// ---------------------------------------------------------------- segment ranges
static inline void seg_ranges(const int32_t* seg, int T, SegRange* out) {
  for (int blk = 0; blk < T / BL; ++blk) {
    int lo = INT32_MAX, hi = INT32_MIN;
    for (int t = blk * BL; t < (blk + 1) * BL; ++t)
      if (seg[t] != 0) { lo = std::min(lo, int(seg[t])); hi = std::max(hi, int(seg[t])); }
    out[blk] = {lo, hi};
  }
}
static inline bool live(const SegRange& a, const SegRange& b) {
  return std::max(a.lo, b.lo) <= std::min(a.hi, b.hi);
}

// ---------------------------------------------------------------- forward
static void fwd_bh(const float* q, const float* k, const float* v, long ld, const int32_t* seg, const int32_t* pos,
                   float* o, float* lse, int b, int n, int T, int N, float scale) {
  const long NH = long(N) * H;
  const long base = long(b) * T * NH + long(n) * H;  // o rows
  const long in = long(b) * T * ld + long(n) * H;     // q, k, v rows (row stride ld)
  seg += long(b) * T;
  pos += long(b) * T;
  lse += (long(b) * N + n) * T;
  float* Qp = tl_scratch.get(size_t(T) * H * 4 + BL * T + BL * H);
  float* Kt = Qp + T * H;  // [T/BL][H][BL] (K^T per key block, contiguous)
  float* Vp = Kt + T * H;  // [T x H]
  float* S = Vp + T * H;   // [BL x T]
  float* Ob = S + BL * T;  // [BL x H]
  float* Kp = Ob + BL * H;  // [T x H]
  for (int t = 0; t < T; ++t) {
    const float* qr = q + in + t * ld;
    const float* kr = k + in + t * ld;
    const float* vr = v + in + t * ld;
    std::memcpy(Qp + t * H, qr, H * sizeof(float));
    std::memcpy(Vp + t * H, vr, H * sizeof(float));
    std::memcpy(Kp + t * H, kr, H * sizeof(float));
  }
  for (int tb = 0; tb < T; tb += BL) transpose64(Kp + tb * H, Kt + tb * H);
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 neg = _mm512_set1_ps(-1e30f);
  float inv[BL];
  const int nb = T / BL;
  const int mstride = T / 16;  // masks row i, 16-key group g: masks[i * mstride + g]
  __mmask16* masks = tl_scratch.get_masks(size_t(BL) * mstride);
  SegRange* rng = tl_scratch.get_rng(nb);
  seg_ranges(seg, T, rng);
  for (int qb = 0; qb < nb; ++qb) {
    const int q0 = qb * BL, kn = q0 + BL;
    int klo = -1;  // first live key block
    for (int kt = 0; kt <= qb; ++kt)
      if (live(rng[qb], rng[kt])) { klo = kt; break; }
    if (klo < 0) {  // no query of this block sees anything (e.g. all padding)
      for (int i = 0; i < BL; ++i) {
        lse[q0 + i] = 0.f;
        std::memset(o + base + (q0 + i) * NH, 0, H * sizeof(float));
      }
      continue;
    }
    for (int kt = 0; kt < qb; ++kt)
      if (live(rng[qb], rng[kt])) gemm64<false>(Qp + q0 * H, H, Kt + kt * H * BL, BL, S + kt * BL, T, H);
    // diagonal tile: query rows [i, i + r) only see keys < i + r (index-order causality)
    if (live(rng[qb], rng[qb]))
      gemm64_trim<false>(Qp + q0 * H, H, Kt + qb * H * BL, BL, S + qb * BL, T,
                       [](int i, int r) { return Strip{0, H, 0, std::min(4, (i + r + 15) / 16)}; });
    for (int i = 0; i < BL; ++i) {
      const int row = q0 + i;
      const int sq = seg[row], pq = pos[row];
      float* s = S + i * T;
      __m512 mx = neg;
      const __m512i vsq = _mm512_set1_epi32(sq), vpq = _mm512_set1_epi32(pq);
      for (int j = 0; j < kn; j += 16) {
        __m512i sk = _mm512_loadu_si512(seg + j), pk = _mm512_loadu_si512(pos + j);
        __mmask16 m = sq == 0 ? 0 : (_mm512_cmpeq_epi32_mask(sk, vsq) & _mm512_cmple_epi32_mask(pk, vpq));
        masks[i * mstride + j / 16] = m;
        __m512 sv = _mm512_mask_mul_ps(neg, m, _mm512_loadu_ps(s + j), vscale);
        _mm512_storeu_ps(s + j, sv);
        mx = _mm512_max_ps(mx, sv);
      }
      const float mrow = _mm512_reduce_max_ps(mx);
      if (mrow < -1e29f) {  // sees nothing (padding): output 0, P row 0
        for (int j = 0; j < kn; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
        inv[i] = 0.f;
        lse[row] = 0.f;
        continue;
      }
      const __m512 vm = _mm512_set1_ps(mrow);
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < kn; j += 16) {
        __m512 p = _mm512_maskz_mov_ps(masks[i * mstride + j / 16], exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm)));
        _mm512_storeu_ps(s + j, p);
        acc = _mm512_add_ps(acc, p);
      }
      const float l = _mm512_reduce_add_ps(acc);
      inv[i] = 1.f / l;
      lse[row] = mrow + std::log(l);
    }
    const int k_lo = klo * BL;  // P is zero before the first live key block (and in dead blocks)
    gemm64_trim<false>(S, T, Vp, H, Ob, H, [q0, k_lo](int i, int r) { return Strip{k_lo, q0 + i + r, 0, 4}; });
    for (int i = 0; i < BL; ++i) {
      float* orow = o + base + (q0 + i) * NH;
      const __m512 vi = _mm512_set1_ps(inv[i]);
      for (int x = 0; x < 4; ++x)
        _mm512_storeu_ps(orow + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(Ob + i * H + 16 * x), vi));
    }
  }
}

// ---------------------------------------------------------------- backward
static void bwd_bh(const float* q, const float* k, const float* v, long ld, const int32_t* seg, const int32_t* pos,
                   const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   int b, int n, int T, int N, float scale) {
  const long NH = long(N) * H;
  const long base = long(b) * T * NH + long(n) * H;  // o and dout rows
  const long in = long(b) * T * ld + long(n) * H;     // q, k, v and dq, dk, dv rows (row stride ld)
  seg += long(b) * T;
  pos += long(b) * T;
  lse += (long(b) * N + n) * T;
  float* Qp = tl_scratch.get(size_t(T) * H * 8 + 5 * BL * BL + T);
  float* Kp = Qp + T * H;    // [T x H]
  float* Vp = Kp + T * H;    // [T x H]
  float* dOp = Vp + T * H;   // [T x H]
  // transposed copies, blocked [T/BL][H][BL] so each block's tile is contiguous
  float* Qt = dOp + T * H;
  float* dOt = Qt + T * H;
  float* Kt = dOt + T * H;
  float* dQt = Kt + T * H;   // dQ^T accumulator, same blocked layout
  float* PT = dQt + T * H;   // [BL x BL] rows = keys, cols = queries
  float* dPT = PT + BL * BL;
  float* dKa = dPT + BL * BL;
  float* dVa = dKa + BL * BL;
  float* delta = dVa + BL * BL;  // [T]
  for (int t = 0; t < T; ++t) {
    const float* qr = q + in + t * ld;
    const float* kr = k + in + t * ld;
    const float* vr = v + in + t * ld;
    const float* dr = dout + base + t * NH;
    const float* orow = o + base + t * NH;
    std::memcpy(Qp + t * H, qr, H * sizeof(float));
    std::memcpy(Kp + t * H, kr, H * sizeof(float));
    std::memcpy(Vp + t * H, vr, H * sizeof(float));
    std::memcpy(dOp + t * H, dr, H * sizeof(float));
    __m512 acc = _mm512_setzero_ps();
    for (int x = 0; x < 4; ++x)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(dr + 16 * x), _mm512_loadu_ps(orow + 16 * x), acc);
    delta[t] = _mm512_reduce_add_ps(acc);
  }
  for (int tb = 0; tb < T; tb += BL) {
    transpose64(Qp + tb * H, Qt + tb * H);
    transpose64(dOp + tb * H, dOt + tb * H);
    transpose64(Kp + tb * H, Kt + tb * H);
  }
  std::memset(dQt, 0, sizeof(float) * T * H);
  const __m512 vscale = _mm512_set1_ps(scale);
  const int nb = T / BL;
  SegRange* rng = tl_scratch.get_rng(nb);
  seg_ranges(seg, T, rng);
  for (int kb = 0; kb < nb; ++kb) {
    const int k0 = kb * BL;
    std::memset(dKa, 0, sizeof(float) * BL * H);
    std::memset(dVa, 0, sizeof(float) * BL * H);
    for (int qb = kb; qb < nb; ++qb) {
      if (!live(rng[qb], rng[kb])) continue;  // P = dS = 0 on this pair
      const int q0 = qb * BL;
      const bool diag = qb == kb;
      // On the diagonal, key rows [j, j + r) only matter for query columns >= j.
      auto cols = [diag](int j, int) { return Strip{0, H, diag ? j / 16 : 0, diag ? 4 - j / 16 : 4}; };
      gemm64_trim<false>(Kp + k0 * H, H, Qt + q0 * H, BL, PT, BL, cols);    // S^T
      gemm64_trim<false>(Vp + k0 * H, H, dOt + q0 * H, BL, dPT, BL, cols);  // dP^T
      for (int j = 0; j < BL; ++j) {
        const int sk = seg[k0 + j], pk = pos[k0 + j];
        const __m512i vsk = _mm512_set1_epi32(sk), vpk = _mm512_set1_epi32(pk);
        float* pr = PT + j * BL;
        float* dr = dPT + j * BL;
        for (int i = 0; i < BL; i += 16) {
          __m512i sq = _mm512_loadu_si512(seg + q0 + i), pq = _mm512_loadu_si512(pos + q0 + i);
          __mmask16 m = sk == 0 ? 0 : (_mm512_cmpeq_epi32_mask(sq, vsk) & _mm512_cmpge_epi32_mask(pq, vpk));
          __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(pr + i), vscale, _mm512_loadu_ps(lse + q0 + i));
          __m512 p = _mm512_maskz_mov_ps(m, exp512(x));
          _mm512_storeu_ps(pr + i, p);
          // maskz: entries left uncomputed on the diagonal may hold stale values
          __m512 ds = _mm512_maskz_mul_ps(m, p, _mm512_sub_ps(_mm512_loadu_ps(dr + i), _mm512_loadu_ps(delta + q0 + i)));
          _mm512_storeu_ps(dr + i, ds);  // dPT now holds dS^T (unscaled)
        }
      }
      // key rows [j, j + r) contract only over queries >= j on the diagonal
      auto from_j = [diag](int j, int) { return Strip{diag ? j : 0, BL, 0, 4}; };
      gemm64_trim<true>(PT, BL, dOp + q0 * H, H, dVa, H, from_j);   // dV += P^T dO
      gemm64_trim<true>(dPT, BL, Qp + q0 * H, H, dKa, H, from_j);   // dK += dS^T Q
      if (!diag) {
        gemm64<true>(Kt + k0 * H, BL, dPT, BL, dQt + q0 * H, BL, BL);  // dQ^T += K^T dS^T
      } else {  // query columns [0, 32) only need keys [0, 32)
        gemm64_trim<true>(Kt + k0 * H, BL, dPT, BL, dQt + q0 * H, BL, [](int, int) { return Strip{0, 32, 0, 2}; });
        gemm64_trim<true>(Kt + k0 * H, BL, dPT, BL, dQt + q0 * H, BL, [](int, int) { return Strip{0, 64, 2, 2}; });
      }
    }
    for (int j = 0; j < BL; ++j) {
      float* dkr = dk + in + (k0 + j) * ld;
      float* dvr = dv + in + (k0 + j) * ld;
      for (int x = 0; x < 4; ++x) {
        _mm512_storeu_ps(dkr + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(dKa + j * H + 16 * x), vscale));
        _mm512_storeu_ps(dvr + 16 * x, _mm512_loadu_ps(dVa + j * H + 16 * x));
      }
    }
  }
  for (int tb = 0; tb < T; tb += BL) transpose64(dQt + tb * H, Qt + tb * H);  // Qt reused as dQ rows
  for (int t = 0; t < T; ++t) {
    float* dqr = dq + in + t * ld;
    for (int x = 0; x < 4; ++x)
      _mm512_storeu_ps(dqr + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(Qt + t * H + 16 * x), vscale));
  }
}

}  // namespace

// ---------------------------------------------------------------- FFI handlers
// Two layouts: q, k, v as three [B, T, N, 64] arrays (AttnFwd, AttnBwd), or packed side by side in one
// [B, T, 3N, 64] array, as one q|k|v matmul outputs it (AttnFwdPacked, AttnBwdPacked: read in place, the
// gradient written as one [B, T, 3N, 64] array). o, dout [B, T, N, 64] and lse [B, N, T] in both.
struct Inputs {  // the arguments both passes read, with the shapes checked
  const float *q, *k, *v;
  long ld;  // row stride of q, k, v (and of their gradients)
  const int32_t *seg, *pos;
  int B, T, N;
  bool ok;
};

static bool shape_ok(ffi::Span<const int64_t> d, int heads_per_row) {
  return d.size() == 4 && d[3] == H && d[1] > 0 && d[1] % BL == 0 && d[2] > 0 && d[2] % heads_per_row == 0;
}

static Inputs inputs(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                     ffi::Buffer<ffi::S32>& seg, ffi::Buffer<ffi::S32>& pos) {
  auto d = q.dimensions();
  const bool ok = shape_ok(d, 1) && k.dimensions() == d && v.dimensions() == d;
  return {q.typed_data(), k.typed_data(), v.typed_data(), ok ? long(d[2]) * H : 0, seg.typed_data(),
          pos.typed_data(), ok ? int(d[0]) : 0, ok ? int(d[1]) : 0, ok ? int(d[2]) : 0, ok};
}

static Inputs packed_inputs(ffi::Buffer<ffi::F32>& qkv, ffi::Buffer<ffi::S32>& seg, ffi::Buffer<ffi::S32>& pos) {
  auto d = qkv.dimensions();
  const bool ok = shape_ok(d, 3);
  const int N = ok ? int(d[2] / 3) : 0;
  const float* p = qkv.typed_data();
  return {p, p + long(N) * H, p + 2L * N * H, 3L * N * H, seg.typed_data(), pos.typed_data(),
          ok ? int(d[0]) : 0, ok ? int(d[1]) : 0, N, ok};
}

static ffi::Error shape_error(const char* pass) {
  return ffi::Error::InvalidArgument(std::string(pass) + ": need q, k, v [B, T, N, 64] (or q|k|v [B, T, 3N, 64]) "
                                     "with T % 64 == 0");
}

static ffi::Error forward(ffi::ThreadPool& pool, const Inputs& in, float* o, float* lse, float scale) {
  parallel_for(pool, in.B * in.N, [&](int i) {
    fwd_bh(in.q, in.k, in.v, in.ld, in.seg, in.pos, o, lse, i / in.N, i % in.N, in.T, in.N, scale);
  });
  return ffi::Error::Success();
}

static ffi::Error backward(ffi::ThreadPool& pool, const Inputs& in, const float* o, const float* lse,
                           const float* dout, float* dq, float* dk, float* dv, float scale) {
  parallel_for(pool, in.B * in.N, [&](int i) {
    bwd_bh(in.q, in.k, in.v, in.ld, in.seg, in.pos, o, lse, dout, dq, dk, dv, i / in.N, i % in.N, in.T, in.N,
           scale);
  });
  return ffi::Error::Success();
}

static ffi::Error AttnFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos,
                              ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  const Inputs in = inputs(q, k, v, seg, pos);
  if (!in.ok) return shape_error("attn_fwd");
  return forward(pool, in, o->typed_data(), lse->typed_data(), scale);
}

static ffi::Error AttnBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> pos,
                              ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                              ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                              ffi::ResultBuffer<ffi::F32> dv, float scale) {
  const Inputs in = inputs(q, k, v, seg, pos);
  if (!in.ok) return shape_error("attn_bwd");
  return backward(pool, in, o.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(),
                  dk->typed_data(), dv->typed_data(), scale);
}

static ffi::Error AttnFwdPackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::S32> seg,
                                    ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> o,
                                    ffi::ResultBuffer<ffi::F32> lse, float scale) {
  const Inputs in = packed_inputs(qkv, seg, pos);
  if (!in.ok) return shape_error("attn_fwd_packed");
  return forward(pool, in, o->typed_data(), lse->typed_data(), scale);
}

static ffi::Error AttnBwdPackedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::S32> seg,
                                    ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv, float scale) {
  const Inputs in = packed_inputs(qkv, seg, pos);
  if (!in.ok) return shape_error("attn_bwd_packed");
  float* d = dqkv->typed_data();
  const long nh = long(in.N) * H;
  return backward(pool, in, o.typed_data(), lse.typed_data(), dout.typed_data(), d, d + nh, d + 2 * nh, scale);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwd, AttnFwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwd, AttnBwdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnFwdPacked, AttnFwdPackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttnBwdPacked, AttnBwdPackedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
