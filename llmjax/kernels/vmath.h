// Elementwise and row-reduction helpers for the llmjax CPU kernels, written as plain loops that the compiler
// vectorizes (-O3 -march=native -fno-math-errno).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace llmjax {

// exp(x) for x <= 0: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-6 Taylor polynomial
// (relative error ~2e-7); 0 below -87 (where float32 denormals start).
inline float exp_nonpositive(float x) {
  const bool tiny = x < -87.0f;
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return tiny ? 0.0f : p * scale;
}

constexpr int kLanes = 16;  // independent partial results, so the compiler keeps them in one vector register

// sum over j < n of f(j), with kLanes interleaved accumulators.
template <typename F>
inline float lane_sum(int64_t n, F f) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  float s = 0.0f;
  for (; j < n; ++j) s += f(j);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// max over j < n of x[j] (n > 0); NaN if any x[j] is NaN.
inline float lane_max(const float* __restrict x, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
  bool nan = false;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      acc[l] = std::max(acc[l], x[j + l]);
      nan |= x[j + l] != x[j + l];
    }
  float m = -INFINITY;
  for (; j < n; ++j) {
    m = std::max(m, x[j]);
    nan |= x[j] != x[j];
  }
  for (int l = 0; l < kLanes; ++l) m = std::max(m, acc[l]);
  return nan ? NAN : m;
}

}  // namespace llmjax
