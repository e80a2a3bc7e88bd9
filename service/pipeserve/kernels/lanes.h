// Shared by the kernels: float32 sums in one fixed order, so that a row's result does not depend
// on its batch, its position or the thread count. A sum keeps 16 lane accumulators, lane i % 16
// fed in index order, then reduced pairwise: (0 + 8), (1 + 9), ..., then 4, 2, 1 apart. Each
// product and sum is rounded once (built with -ffp-contract=off); the AVX-512 and the portable
// loops apply the same operations to each lane, so both give the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pipeserve {

constexpr int kSumLanes = 16;

// Reduces `lanes` (kSumLanes values) pairwise in place; returns the sum.
inline float reduce_lanes(float* lanes) {
  for (int width = kSumLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] = lanes[l] + lanes[l + width];
  return lanes[0];
}

// Sum of a[i] * b[i], i < d.
inline float lane_dot(const float* a, const float* b, int64_t d) {
  float lanes[kSumLanes] = {};
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + kSumLanes <= d; i += kSumLanes)
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  _mm512_storeu_ps(lanes, acc);
#else
  for (; i + kSumLanes <= d; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) lanes[l] = lanes[l] + a[i + l] * b[i + l];
#endif
  for (int l = 0; i < d; ++i, ++l) lanes[l] = lanes[l] + a[i] * b[i];
  return reduce_lanes(lanes);
}

// 1 / sqrt(mean(x^2) + eps) over x[0..d)
inline float inverse_rms(const float* x, int64_t d, double eps) {
  return 1.0f / std::sqrt(lane_dot(x, x, d) / static_cast<float>(d) + static_cast<float>(eps));
}

// out = (x * inverse_rms(x)) * scale: RMSNorm of one row
inline void norm_row(const float* x, int64_t d, const float* scale, double eps, float* out) {
  const float r = inverse_rms(x, d, eps);
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] * r) * scale[i];
}

}  // namespace pipeserve
