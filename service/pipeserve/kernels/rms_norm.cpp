// RMSNorm in one call: y = (x * rsqrt(mean(x^2) + eps)) * scale per row of the last dimension,
// float32. torch.rms_norm on a CPU runs it as ~8 operators (pow, mean, add, rsqrt, mul, mul and
// their dtype checks), ~8 us for one 640-float row, and Gemma 3 norms ~90 rows a decoding step
// in ~90 calls; here a call is ~1 us. The second operator adds a normed tensor to the residual
// stream in place (Gemma's post-norms: x += norm(y) * scale), and may norm the sum for the next
// block in the same pass (the pre-norm that follows): two torch calls and their Python in one.
//
// Arithmetic: a row's sum of squares in lanes.h's fixed order (the same bits for any row count,
// thread count or row position), then r = 1 / sqrt(sum / D + eps) and y = (x * r) * scale, each step rounded once (built with
// -ffp-contract=off). torch reduces in another order, so results differ from torch.rms_norm in
// the last bits (tests/test_native_norms.py bounds it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "lanes.h"
#include "parallel.h"

namespace {

using pipeserve::inverse_rms;
using pipeserve::norm_row;
using pipeserve::parallel_chunks;

// Rows per thread at least this many floats: below it one thread is faster than a team.
constexpr int64_t kMinFloatsPerTask = 1 << 15;

// Element offsets of each row (the leading dimensions, any strides; the last one contiguous).
std::vector<int64_t> row_offsets(const at::Tensor& x) {
  const int64_t dims = x.dim() - 1;
  int64_t rows = 1;
  for (int64_t i = 0; i < dims; ++i) rows *= x.size(i);
  std::vector<int64_t> offsets(static_cast<size_t>(rows));
  for (int64_t row = 0; row < rows; ++row) {
    int64_t rest = row, offset = 0;
    for (int64_t i = dims - 1; i >= 0; --i) {
      offset += (rest % x.size(i)) * x.stride(i);
      rest /= x.size(i);
    }
    offsets[static_cast<size_t>(row)] = offset;
  }
  return offsets;
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.stride(-1) == 1, name,
              " must have a non-empty, contiguous last dimension");
}

// scale: [D], or [G, D] with G = x.size(-2) (one scale row per group, e.g. per attention head)
int64_t scale_groups(const at::Tensor& x, const at::Tensor& scale, const char* name) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
  const int64_t d = x.size(-1);
  if (scale.dim() == 1) {
    TORCH_CHECK(scale.size(0) == d, name, " has ", scale.size(0), " values for rows of ", d);
    return 1;
  }
  TORCH_CHECK(scale.dim() == 2 && x.dim() >= 2 && scale.size(0) == x.size(-2) && scale.size(1) == d, name,
              " must be [D] or [x.size(-2), D]");
  return scale.size(0);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps) {
  check_rows(x, "rms_norm: x");
  const int64_t groups = scale_groups(x, scale, "rms_norm: scale");
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t d = x.size(-1);
  const std::vector<int64_t> offsets = row_offsets(x);
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t rows = static_cast<int64_t>(offsets.size());
  parallel_chunks(rows, std::max<int64_t>(1, kMinFloatsPerTask / d), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row)
      norm_row(xp + offsets[row], d, sp + (row % groups) * d, eps, yp + row * d);
  });
  return y;
}

// x += norm(y) * post, in place; then, with `pre`, returns norm(x) * pre (else an empty tensor).
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& y, const at::Tensor& post, double eps,
                         const std::optional<at::Tensor>& pre) {
  check_rows(x, "add_rms_norm_: x");
  check_rows(y, "add_rms_norm_: y");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes(),
              "add_rms_norm_: x and y must be contiguous tensors of one shape");
  TORCH_CHECK(scale_groups(x, post, "add_rms_norm_: post") == 1, "add_rms_norm_: post must be [D]");
  if (pre) TORCH_CHECK(scale_groups(x, *pre, "add_rms_norm_: pre") == 1, "add_rms_norm_: pre must be [D]");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  at::Tensor out = pre ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* post_p = post.data_ptr<float>();
  const float* pre_p = pre ? pre->data_ptr<float>() : nullptr;
  float* op = pre ? out.data_ptr<float>() : nullptr;
  parallel_chunks(rows, std::max<int64_t>(1, kMinFloatsPerTask / d), [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      float* xr = xp + row * d;
      const float* yr = yp + row * d;
      const float r = inverse_rms(yr, d, eps);
      for (int64_t i = 0; i < d; ++i) xr[i] = xr[i] + (yr[i] * r) * post_p[i];
      if (pre_p != nullptr) norm_row(xr, d, pre_p, eps, op + row * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pipeserve, m) {
  m.def("rms_norm(Tensor x, Tensor scale, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor y, Tensor post, float eps, Tensor? pre=None) -> Tensor", &add_rms_norm_);
}
