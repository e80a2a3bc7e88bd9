// One decoding step's attention block for Gemma-style layers, after the q/k/v projection, in one
// call: the query and key heads RMS-normed (each head its own scale row, the score scale folded
// into the query rows), rotated (RoPE as x * cos + roll(x, D / 2) * sin_signed), the new key and
// value written into the cache, and every query head's softmax attention over its sequence's
// cached keys (grouped-query: query head h reads key/value head h / (H / Hkv)). In torch the
// same is ~25 operators and their Python per layer (~90 us a layer at one row); here ~10 us.
//
// Arithmetic, per element as the torch path orders it (rms_norm.cpp's norm, then x * cos,
// roll(x) * sin, their sum; scores as 16-lane sums reduced pairwise; bias added; softmax as
// exp(s - max) / sum, exp taken as 0 below float32's normal range; the output as a sum over
// keys in key order), each step rounded once
// (-ffp-contract=off). Sums run in another order than torch's GEMMs, so results differ from
// the torch path in the last bits (tests/test_native_attention.py bounds it). The cache rows
// each sequence writes and the additive mask (0 / -inf) come from the caller's step plan
// (layers/kv_cache.py), so sliding windows, wrapped rings and sequences of different lengths
// are the plan's business, not this kernel's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "lanes.h"
#include "parallel.h"

namespace {

using pipeserve::lane_dot;
using pipeserve::norm_row;
using pipeserve::parallel_chunks;
using pipeserve::reduce_lanes;

constexpr int kLanes = pipeserve::kSumLanes;
// (query head, key) pairs times the head size below which the attention runs on this thread.
constexpr int64_t kMinParallelWork = 1 << 16;

// lane_dot of q with four rows at once (independent sums, the same bits as four calls): the
// additions of one sum wait for each other, four sums keep the adder busy.
void lane_dot4(const float* q, const float* k, int64_t stride, int64_t d, float* out) {
#if defined(__AVX512F__)
  if (d % kLanes == 0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < d; i += kLanes) {
      const __m512 x = _mm512_loadu_ps(q + i);
      a0 = _mm512_add_ps(a0, _mm512_mul_ps(x, _mm512_loadu_ps(k + i)));
      a1 = _mm512_add_ps(a1, _mm512_mul_ps(x, _mm512_loadu_ps(k + stride + i)));
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(x, _mm512_loadu_ps(k + 2 * stride + i)));
      a3 = _mm512_add_ps(a3, _mm512_mul_ps(x, _mm512_loadu_ps(k + 3 * stride + i)));
    }
    float lanes[4][kLanes];
    _mm512_storeu_ps(lanes[0], a0);
    _mm512_storeu_ps(lanes[1], a1);
    _mm512_storeu_ps(lanes[2], a2);
    _mm512_storeu_ps(lanes[3], a3);
    for (int r = 0; r < 4; ++r) out[r] = reduce_lanes(lanes[r]);
    return;
  }
#endif
  for (int r = 0; r < 4; ++r) out[r] = lane_dot(q, k + r * stride, d);
}

// o[i] = sum over j of p[j] * v[j * d + i], added in j order (each product and sum rounded
// once, on either path); a chunk of o stays in registers while every row j passes.
void weighted_sum(const float* p, const float* v, int64_t rows, int64_t d, float* o) {
  int64_t i = 0;
#if defined(__AVX512F__)
  constexpr int64_t kChunk = 4 * kLanes;
  for (; i + kChunk <= d; i += kChunk) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < rows; ++j) {
      if (p[j] == 0.0f) continue;  // adds 0 * v: nothing (v is finite)
      const __m512 w = _mm512_set1_ps(p[j]);
      const float* row = v + j * d + i;
      a0 = _mm512_add_ps(a0, _mm512_mul_ps(w, _mm512_loadu_ps(row)));
      a1 = _mm512_add_ps(a1, _mm512_mul_ps(w, _mm512_loadu_ps(row + kLanes)));
      a2 = _mm512_add_ps(a2, _mm512_mul_ps(w, _mm512_loadu_ps(row + 2 * kLanes)));
      a3 = _mm512_add_ps(a3, _mm512_mul_ps(w, _mm512_loadu_ps(row + 3 * kLanes)));
    }
    _mm512_storeu_ps(o + i, a0);
    _mm512_storeu_ps(o + i + kLanes, a1);
    _mm512_storeu_ps(o + i + 2 * kLanes, a2);
    _mm512_storeu_ps(o + i + 3 * kLanes, a3);
  }
#endif
  for (; i < d; ++i) {
    float sum = 0.0f;
    for (int64_t j = 0; j < rows; ++j)
      if (p[j] != 0.0f) sum = sum + p[j] * v[j * d + i];
    o[i] = sum;
  }
}

// exp(z) for z below this is under float32's smallest normal: taken as 0, not computed as a
// denormal (whose arithmetic runs ~100x slower on x86 and adds less than the sum's rounding).
constexpr float kExpFloor = -87.0f;

// out = rotate(norm(x) * scale): x one head [D]
void norm_and_rotate(const float* x, int64_t d, const float* scale, double eps, const float* cos,
                     const float* sin_signed, float* normed, float* out) {
  norm_row(x, d, scale, eps, normed);
  const int64_t half = d / 2;  // roll(x, D / 2): the halves swapped
  for (int64_t i = 0; i < half; ++i) out[i] = normed[i] * cos[i] + normed[i + half] * sin_signed[i];
  for (int64_t i = half; i < d; ++i) out[i] = normed[i] * cos[i] + normed[i - half] * sin_signed[i];
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "decode_attention: ", what); }

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& qk_scale, double eps, const at::Tensor& cos,
                            const at::Tensor& sin_signed, at::Tensor& cache_k, at::Tensor& cache_v,
                            const at::Tensor& rows, const at::Tensor& slots, int64_t length,
                            const std::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&qkv, &qk_scale, &cos, &sin_signed, const_cast<const at::Tensor*>(&cache_k),
                              const_cast<const at::Tensor*>(&cache_v)})
    check(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
          "qkv, qk_scale, cos, sin_signed and the caches must be contiguous float32 CPU tensors");
  check(cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(), "the caches must be two [S, Hkv, C, D] tensors");
  const int64_t S = cache_k.size(0), Hkv = cache_k.size(1), C = cache_k.size(2), D = cache_k.size(3);
  check(D % 2 == 0 && qk_scale.dim() == 2 && qk_scale.size(1) == D && qk_scale.size(0) > Hkv,
        "qk_scale must be [H + Hkv, D] with more query than key heads' rows");
  const int64_t H = qk_scale.size(0) - Hkv;
  check(H % Hkv == 0, "the query heads must be a multiple of the key/value heads");
  check(qkv.dim() == 3 && qkv.size(1) == 1 && qkv.size(2) == (H + 2 * Hkv) * D, "qkv must be [B, 1, (H + 2 Hkv) D]");
  const int64_t B = qkv.size(0);
  check(cos.numel() == B * D && sin_signed.numel() == B * D, "cos and sin_signed must hold [B, D]");
  check(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == B * Hkv,
        "rows must be B * Hkv int64 cache rows");
  check(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == B, "slots must be B int64");
  check(length > 0 && length <= C, "length must be within the cache's positions");
  const int64_t* row_p = rows.data_ptr<int64_t>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * Hkv; ++i)
    check(row_p[i] >= 0 && row_p[i] < S * Hkv * C, "a write row is outside the cache");
  for (int64_t b = 0; b < B; ++b) check(slot_p[b] >= 0 && slot_p[b] < S, "a slot is outside the cache");
  const float* bias_p = nullptr;
  if (bias) {
    check(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == B * Hkv * length,
          "bias must be a contiguous float32 [B * Hkv, 1, length] tensor");
    bias_p = bias->data_ptr<float>();
  }

  const float* in = qkv.data_ptr<float>();
  const float* scale = qk_scale.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin_signed.data_ptr<float>();
  float* keys = cache_k.data_ptr<float>();
  float* values = cache_v.data_ptr<float>();
  const int64_t width = (H + 2 * Hkv) * D;

  // 1. queries normed and rotated; new keys normed, rotated and written; new values written
  std::vector<float> queries(static_cast<size_t>(B * H * D)), normed(static_cast<size_t>(D));
  for (int64_t b = 0; b < B; ++b) {
    const float* x = in + b * width;
    for (int64_t h = 0; h < H; ++h)
      norm_and_rotate(x + h * D, D, scale + h * D, eps, cos_p + b * D, sin_p + b * D, normed.data(),
                      queries.data() + (b * H + h) * D);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t row = row_p[b * Hkv + g];
      norm_and_rotate(x + (H + g) * D, D, scale + (H + g) * D, eps, cos_p + b * D, sin_p + b * D, normed.data(),
                      keys + row * D);
      std::copy_n(x + (H + Hkv + g) * D, D, values + row * D);
    }
  }

  // 2. each query head over its sequence's keys 0..length-1
  at::Tensor y = at::empty({B, 1, H * D}, qkv.options());
  float* out = y.data_ptr<float>();
  const int64_t groups = H / Hkv;
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, length * D));
  parallel_chunks(B * H, grain, [&](int64_t first, int64_t last) {
    std::vector<float> scores(static_cast<size_t>(length));
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / H, h = task % H, g = h / groups;
      const int64_t base = (slot_p[b] * Hkv + g) * C * D;  // [slot, g, 0, 0]
      const float* q = queries.data() + task * D;
      const float* mask = bias_p ? bias_p + (b * Hkv + g) * length : nullptr;
      float top = -std::numeric_limits<float>::infinity();
      int64_t j = 0;
      for (; j + 4 <= length; j += 4) lane_dot4(q, keys + base + j * D, D, D, scores.data() + j);
      for (; j < length; ++j) scores[j] = lane_dot(q, keys + base + j * D, D);
      for (j = 0; j < length; ++j) {
        if (mask) scores[j] = scores[j] + mask[j];
        top = std::max(top, scores[j]);
      }
      float* o = out + b * H * D + h * D;
      if (top == -std::numeric_limits<float>::infinity()) {  // nothing to attend: zeros
        std::fill_n(o, D, 0.0f);
        continue;
      }
      float total = 0.0f;
      for (int64_t j = 0; j < length; ++j) {
        const float z = scores[j] - top;
        scores[j] = z < kExpFloor ? 0.0f : std::exp(z);
        total = total + scores[j];
      }
      for (int64_t j = 0; j < length; ++j) scores[j] = scores[j] / total;
      weighted_sum(scores.data(), values + base, length, D, o);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pipeserve, m) {
  m.def("decode_attention(Tensor qkv, Tensor qk_scale, float eps, Tensor cos, Tensor sin_signed, Tensor(a!) cache_k, "
        "Tensor(b!) cache_v, Tensor rows, Tensor slots, int length, Tensor? bias=None) -> Tensor",
        &decode_attention);
}
