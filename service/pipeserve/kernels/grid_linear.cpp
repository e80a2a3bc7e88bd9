// y[M, N] = x[M, K] @ W^T for weights held on per-group grids (group = 32 weights along K):
// W[n, k] = level[n, k] * scale[n, k / 32] + offset[n, k / 32], level 4 bits (16-level grids,
// two per byte) or 8 bits (up to 256 levels). Activations and sums stay float32.
//
// Layout (made by layers/grid_native.py): levels [N, K] uint8, or [N, K / 2] for 4 bits where
// byte j of group g holds weight g*32 + j in its low nibble and g*32 + 16 + j in its high one
// (one 16-byte load gives both halves of the group); scales and offsets [N, K / 32] float32.
//
// Order of a sum, and why a row's result does not depend on its batch: each output element
// keeps one 16-lane accumulator, fed k = 0, 16, 32, ... in order, then reduced across its
// lanes in a fixed order. The rows of a call are register-blocked (up to kRows at a time, so a
// dequantized weight is reused by every row of a block), but blocking only changes which
// accumulators live side by side, never the operations applied to one of them; each output
// column is computed by exactly one thread. So any M, any row position and any thread count
// give the same bits.
//
// Per block of kCols output columns the weights are dequantized once into a float buffer that
// every block of rows then reads: at 16 or 37 rows a weight is expanded once per call, not
// once per row (torch's int4 kernel does it per 4 rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kLanes = 16;
constexpr int kCols = 4;  // output columns dequantized together (4 x K floats: L1/L2-sized)
constexpr int kRows = 6;  // rows per register block: 6 x 4 accumulators + 4 weights + 1 input
// A chunk of columns handed to one thread holds at least this many weights: below it the fork
// and join of the team cost more than the work (one Gemma 270M o projection is 655k weights).
constexpr int64_t kMinWeightsPerTask = 1 << 15;
constexpr int64_t kMaxK = 1 << 16;  // the per-thread buffer is kCols x K floats (1 MiB here)

struct Grid {
  const uint8_t* levels;
  const float* scales;
  const float* offsets;
  int64_t n, k;
  int bits;
  int64_t row_bytes() const { return bits == 4 ? k / 2 : k; }
};

// ---- the plain C++ path (any CPU) ------------------------------------------------------------
// Built with -ffp-contract=off, so a * b + c is two roundings everywhere, whatever the compiler
// inlines or vectorizes: each lane's operations are fixed by the source.

void dequantize_portable(const Grid& g, int64_t col, float* out) {
  const uint8_t* q = g.levels + col * g.row_bytes();
  for (int64_t group = 0; group < g.k / kGroup; ++group) {
    const float s = g.scales[col * (g.k / kGroup) + group];
    const float o = g.offsets[col * (g.k / kGroup) + group];
    float* dst = out + group * kGroup;
    if (g.bits == 4) {
      const uint8_t* b = q + group * (kGroup / 2);
      for (int j = 0; j < 16; ++j) {
        dst[j] = static_cast<float>(b[j] & 15) * s + o;
        dst[16 + j] = static_cast<float>(b[j] >> 4) * s + o;
      }
    } else {
      const uint8_t* b = q + group * kGroup;
      for (int j = 0; j < kGroup; ++j) dst[j] = static_cast<float>(b[j]) * s + o;
    }
  }
}

float reduce_lanes_portable(const float* lanes) {
  // pairwise, fixed: (0+8), (1+9), ... then 4, 2, 1 apart
  float t[kLanes];
  std::memcpy(t, lanes, sizeof(t));
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) t[i] = t[i] + t[i + width];
  return t[0];
}

template <int R>
void block_portable(const float* x, int64_t k, const float* w, float* y, int64_t ldy, int cols) {
  float acc[R][kCols][kLanes] = {};
  for (int64_t base = 0; base < k; base += kLanes)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kCols; ++c)
        for (int l = 0; l < kLanes; ++l) acc[r][c][l] = acc[r][c][l] + x[r * k + base + l] * w[c * k + base + l];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) y[r * ldy + c] = reduce_lanes_portable(acc[r][c]);
}

// ---- the AVX-512 path -----------------------------------------------------------------------
#if defined(__AVX512F__)

inline void dequantize_avx512(const Grid& g, int64_t col, float* out) {
  const uint8_t* q = g.levels + col * g.row_bytes();
  const int64_t groups = g.k / kGroup;
  const __m512i nibble = _mm512_set1_epi32(15);
  for (int64_t group = 0; group < groups; ++group) {
    const __m512 s = _mm512_set1_ps(g.scales[col * groups + group]);
    const __m512 o = _mm512_set1_ps(g.offsets[col * groups + group]);
    __m512i lo, hi;
    if (g.bits == 4) {
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + group * 16)));
      lo = _mm512_and_si512(b, nibble);
      hi = _mm512_srli_epi32(b, 4);
    } else {
      lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + group * 32)));
      hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + group * 32 + 16)));
    }
    _mm512_storeu_ps(out + group * kGroup, _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), s, o));
    _mm512_storeu_ps(out + group * kGroup + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), s, o));
  }
}

template <int R>
void block_avx512(const float* x, int64_t k, const float* w, float* y, int64_t ldy, int cols) {
  __m512 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t base = 0; base < k; base += kLanes) {
    __m512 wv[kCols];
    for (int c = 0; c < kCols; ++c) wv[c] = _mm512_loadu_ps(w + c * k + base);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + base);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

#endif

// ---- driver ---------------------------------------------------------------------------------

using Dequantize = void (*)(const Grid&, int64_t, float*);
using Block = void (*)(const float*, int64_t, const float*, float*, int64_t, int);

struct Path {
  Dequantize dequantize;
  Block blocks[kRows + 1];  // blocks[r]: r rows (1..kRows)
};

template <template <int> class Make>
constexpr Path make_path(Dequantize d) {
  return Path{d, {nullptr, Make<1>::f, Make<2>::f, Make<3>::f, Make<4>::f, Make<5>::f, Make<6>::f}};
}
template <int R> struct PortableBlock { static constexpr Block f = &block_portable<R>; };
const Path kPortable = make_path<PortableBlock>(&dequantize_portable);
#if defined(__AVX512F__)
template <int R> struct Avx512Block { static constexpr Block f = &block_avx512<R>; };
const Path kAvx512 = make_path<Avx512Block>(&dequantize_avx512);
const Path& kBest = kAvx512;
const char* kBestName = "avx512";
#else
const Path& kBest = kPortable;
const char* kBestName = "portable";
#endif

at::Tensor run(const Path& path, const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales,
               const at::Tensor& offsets, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "grid_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && levels.device().is_cpu() && scales.device().is_cpu() && offsets.device().is_cpu(),
              "grid_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "grid_linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(levels.dim() == 2 && levels.scalar_type() == at::kByte && levels.is_contiguous(),
              "grid_linear: levels must be a contiguous uint8 [N, K or K/2] tensor");
  const int64_t m = x.size(0), k = x.size(1), n = levels.size(0);
  TORCH_CHECK(k % kGroup == 0 && k > 0 && k <= kMaxK, "grid_linear: K must be a positive multiple of ", kGroup,
              " up to ", kMaxK, ", got ", k);
  TORCH_CHECK(levels.size(1) == (bits == 4 ? k / 2 : k), "grid_linear: levels have ", levels.size(1),
              " bytes per row for K=", k, " at ", bits, " bits");
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == n &&
                    t->size(1) == k / kGroup,
                "grid_linear: scales and offsets must be contiguous float32 [N, K/32]");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const Grid grid{levels.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(), n, k,
                  static_cast<int>(bits)};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t col_blocks = (n + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (kCols * k));
  at::parallel_for(0, col_blocks, grain, [&](int64_t first, int64_t last) {
    // kCols columns of K floats; a short last block's missing columns stay zero (never stored)
    std::vector<float> w(static_cast<size_t>(kCols * k));
    for (int64_t block = first; block < last; ++block) {
      const int64_t col0 = block * kCols;
      const int cols = static_cast<int>(std::min<int64_t>(kCols, n - col0));
      if (cols < kCols) std::fill(w.begin(), w.end(), 0.0f);
      for (int c = 0; c < cols; ++c) path.dequantize(grid, col0 + c, w.data() + c * k);
      for (int64_t row = 0; row < m; row += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - row));
        path.blocks[rows](xp + row * k, k, w.data(), yp + row * n + col0, n, cols);
      }
    }
  });
  return y;
}

at::Tensor grid_linear(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales,
                       const at::Tensor& offsets, int64_t bits) {
  return run(kBest, x, levels, scales, offsets, bits);
}

at::Tensor grid_linear_portable(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales,
                                const at::Tensor& offsets, int64_t bits) {
  return run(kPortable, x, levels, scales, offsets, bits);
}

std::string grid_kernel_isa() { return kBestName; }

int64_t grid_max_k() { return kMaxK; }

}  // namespace

TORCH_LIBRARY(pipeserve, m) {
  m.def("grid_linear(Tensor x, Tensor levels, Tensor scales, Tensor offsets, int bits) -> Tensor", &grid_linear);
  m.def("grid_linear_portable(Tensor x, Tensor levels, Tensor scales, Tensor offsets, int bits) -> Tensor",
        &grid_linear_portable);
  m.def("grid_kernel_isa() -> str", &grid_kernel_isa);
  m.def("grid_max_k() -> int", &grid_max_k);
}
