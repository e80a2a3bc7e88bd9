// y[M, N] = x[M, K] @ W^T for weights held on per-group grids (group = 32 weights along K):
// W[n, k] = level[n, k] * scale[n, k / 32] + offset[n, k / 32], level 4 bits (16-level grids),
// 5 bits (32 levels: Q5_0) or 8 bits (up to 256 levels). Activations and sums stay float32.
//
// Layout (made by layers/grid_native.py): panels of kCols output columns, [N / kCols][K / 32]
// [kCols] records, so that a block of columns reads one sequential stream. A record is one
// group of one column: its levels (4 bits: 16 bytes, byte j holding weight j's level in its
// low nibble and weight 16 + j's in its high one, so one 16-byte load gives both halves; 5
// bits: those 16 bytes for the low four bits, then a little-endian uint32 whose bit i is
// weight i's fifth bit; 8 bits: 32 bytes, one level each), then its float32 scale and offset.
// N is padded to whole panels with zero records, whose outputs are never stored.
//
// Order of a sum, and why a row's result does not depend on its batch: each output element
// keeps one 16-lane accumulator, fed k = 0, 16, 32, ... in order, then reduced across its
// lanes in a fixed order. The rows of a call are register-blocked (up to kRows at a time, so a
// dequantized weight is reused by every row of a block), but blocking only changes which
// accumulators live side by side, never the operations applied to one of them; each output
// column is computed by exactly one thread. So any M, any row position and any thread count
// give the same bits.
//
// Up to kRows rows, each group's weights are expanded in registers and used at once. Past that,
// per block of kCols output columns the weights are dequantized once into a float buffer that
// every block of rows then reads: at 16 or 37 rows a weight is expanded once per call, not once
// per row (torch's int4 kernel does it per 4 rows). Both compute the same weight values
// (one fused multiply-add, or the portable path's multiply then add) and the same sums.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "lanes.h"
#include "parallel.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using pipeserve::parallel_chunks;

constexpr int64_t kGroup = 32;
constexpr int64_t kLanes = pipeserve::kSumLanes;
constexpr int kCols = 4;  // output columns dequantized together (4 x K floats: L1/L2-sized)
constexpr int kRows = 6;  // rows per register block: 6 x 4 accumulators + 4 weights + 1 input
// A chunk of columns handed to one thread holds at least this many weights: below it the fork
// and join of the team cost more than the work (one Gemma 270M o projection is 655k weights).
constexpr int64_t kMinWeightsPerTask = 1 << 15;
constexpr int64_t kMaxK = 1 << 16;  // the per-thread buffer is kCols x K floats (1 MiB here)
// Groups to prefetch ahead in a panel's stream: ~16 x 4 records (1-2.5 KB) covers the memory
// latency at one row (Gemma's 72 block linears, 1 row, 1 thread: 10.0 CPU ms at 16 and 32
// ahead, 11.0-11.7 at 8; the weights do not fit the cache, so every step streams them).
constexpr int64_t kAhead = 16;

constexpr int64_t group_bytes(int64_t bits) { return bits == 4 ? 16 : bits == 5 ? 20 : 32; }
constexpr int64_t record_bytes(int64_t bits) { return group_bytes(bits) + 2 * sizeof(float); }

struct Grid {
  const uint8_t* panels;
  int64_t n, k;
  int bits;
  int64_t groups() const { return k / kGroup; }
  const uint8_t* group(int64_t col, int64_t g) const {
    return panels + ((col / kCols) * groups() * kCols + g * kCols + col % kCols) * record_bytes(bits);
  }
  float scale(int64_t col, int64_t g) const { return load_float(group(col, g) + group_bytes(bits)); }
  float offset(int64_t col, int64_t g) const { return load_float(group(col, g) + group_bytes(bits) + 4); }
  static float load_float(const uint8_t* p) {
    float v;
    std::memcpy(&v, p, sizeof(v));  // records are byte-aligned
    return v;
  }
};

inline uint32_t fifth_bits(const uint8_t* group) {
  uint32_t bits;
  std::memcpy(&bits, group + 16, sizeof(bits));  // little-endian, as numpy wrote it
  return bits;
}

// ---- the plain C++ path (any CPU) ------------------------------------------------------------
// Built with -ffp-contract=off, so a * b + c is two roundings everywhere, whatever the compiler
// inlines or vectorizes: each lane's operations are fixed by the source.

void dequantize_portable(const Grid& g, int64_t col, float* out) {
  for (int64_t group = 0; group < g.k / kGroup; ++group) {
    const float s = g.scale(col, group), o = g.offset(col, group);
    const uint8_t* b = g.group(col, group);
    float* dst = out + group * kGroup;
    if (g.bits == 8) {
      for (int j = 0; j < kGroup; ++j) dst[j] = static_cast<float>(b[j]) * s + o;
      continue;
    }
    const uint32_t high = g.bits == 5 ? fifth_bits(b) : 0;
    for (int j = 0; j < 16; ++j) {
      const int lo = (b[j] & 15) | static_cast<int>((high >> j) & 1) << 4;
      const int hi = (b[j] >> 4) | static_cast<int>((high >> (16 + j)) & 1) << 4;
      dst[j] = static_cast<float>(lo) * s + o;
      dst[16 + j] = static_cast<float>(hi) * s + o;
    }
  }
}

float reduce_lanes_portable(const float* lanes) {
  float t[kLanes];  // lanes.h's pairwise order, on a copy
  std::memcpy(t, lanes, sizeof(t));
  return pipeserve::reduce_lanes(t);
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

// One group's 32 weights as two vectors: level * scale + offset in one rounding.
inline void group_avx512(const Grid& g, int64_t col, int64_t group, __m512& lo, __m512& hi) {
  const uint8_t* b = g.group(col, group);
  __m512i l, h;
  if (g.bits == 8) {
    l = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    h = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
  } else {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    l = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
    h = _mm512_srli_epi32(bytes, 4);
    if (g.bits == 5) {
      const uint32_t high = fifth_bits(b);
      const __m512i sixteen = _mm512_set1_epi32(16);
      l = _mm512_mask_or_epi32(l, static_cast<__mmask16>(high), l, sixteen);
      h = _mm512_mask_or_epi32(h, static_cast<__mmask16>(high >> 16), h, sixteen);
    }
  }
  const __m512 s = _mm512_set1_ps(g.scale(col, group)), o = _mm512_set1_ps(g.offset(col, group));
  lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), s, o);
  hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), s, o);
}

inline void dequantize_avx512(const Grid& g, int64_t col, float* out) {
  for (int64_t group = 0; group < g.k / kGroup; ++group) {
    if (col % kCols == 0) {  // the panel's first column brings its records in for the other three
      const char* ahead = reinterpret_cast<const char*>(g.group(col, group + kAhead));
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
    }
    __m512 lo, hi;
    group_avx512(g, col, group, lo, hi);
    _mm512_storeu_ps(out + group * kGroup, lo);
    _mm512_storeu_ps(out + group * kGroup + 16, hi);
  }
}

// R rows (R <= kRows) straight from the grid: each group expanded in registers, used by every
// row, never stored. The same operations per output element as block_avx512 on the buffer.
template <int R>
void fused_avx512(const float* x, const Grid& g, int64_t col0, int cols, float* y, int64_t ldy) {
  __m512 acc[R][kCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t k = g.k;
  for (int64_t group = 0; group < k / kGroup; ++group) {
    __m512 lo[kCols], hi[kCols];
    // the panel is one stream: fetch kAhead groups ahead (a prefetch past its end never faults)
    const char* ahead = reinterpret_cast<const char*>(g.group(col0, group + kAhead));
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    for (int c = 0; c < kCols; ++c) {
      if (c < cols) {
        group_avx512(g, col0 + c, group, lo[c], hi[c]);
      } else {
        lo[c] = hi[c] = _mm512_setzero_ps();
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xlo = _mm512_loadu_ps(x + r * k + group * kGroup);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_fmadd_ps(xlo, lo[c], acc[r][c]);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xhi = _mm512_loadu_ps(x + r * k + group * kGroup + 16);
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_fmadd_ps(xhi, hi[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
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
using Fused = void (*)(const float*, const Grid&, int64_t, int, float*, int64_t);

struct Path {
  Dequantize dequantize;
  Block blocks[kRows + 1];  // blocks[r]: r rows (1..kRows) from the dequantized buffer
  Fused fused[kRows + 1];   // fused[r]: r rows straight from the grid (none: always the buffer)
};

template <int R> struct PortableBlock { static constexpr Block f = &block_portable<R>; };
const Path kPortable{&dequantize_portable,
                     {nullptr, PortableBlock<1>::f, PortableBlock<2>::f, PortableBlock<3>::f, PortableBlock<4>::f,
                      PortableBlock<5>::f, PortableBlock<6>::f},
                     {}};
#if defined(__AVX512F__)
const Path kAvx512{&dequantize_avx512,
                   {nullptr, &block_avx512<1>, &block_avx512<2>, &block_avx512<3>, &block_avx512<4>,
                    &block_avx512<5>, &block_avx512<6>},
                   {nullptr, &fused_avx512<1>, &fused_avx512<2>, &fused_avx512<3>, &fused_avx512<4>,
                    &fused_avx512<5>, &fused_avx512<6>}};
const Path& kBest = kAvx512;
const char* kBestName = "avx512";
#else
const Path& kBest = kPortable;
const char* kBestName = "portable";
#endif

at::Tensor run(const Path& path, const at::Tensor& x, const at::Tensor& panels, int64_t n, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "grid_linear: bits must be 4, 5 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "grid_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "grid_linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(panels.dim() == 2 && panels.scalar_type() == at::kByte && panels.is_contiguous(),
              "grid_linear: panels must be a contiguous uint8 [N / 4, bytes per panel] tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0 && k > 0 && k <= kMaxK, "grid_linear: K must be a positive multiple of ", kGroup,
              " up to ", kMaxK, ", got ", k);
  TORCH_CHECK(n > 0 && panels.size(0) == (n + kCols - 1) / kCols, "grid_linear: ", panels.size(0),
              " panels cannot hold ", n, " output columns");
  const int64_t panel_bytes = k / kGroup * kCols * record_bytes(bits);
  TORCH_CHECK(panels.size(1) == panel_bytes, "grid_linear: panels have ", panels.size(1), " bytes, ", panel_bytes,
              " expected for K=", k, " at ", bits, " bits");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  const Grid grid{panels.data_ptr<uint8_t>(), n, k, static_cast<int>(bits)};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t col_blocks = (n + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (kCols * k));
  if (m <= kRows && path.fused[m] != nullptr) {
    parallel_chunks(col_blocks, grain, [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const int64_t col0 = block * kCols;
        path.fused[m](xp, grid, col0, static_cast<int>(std::min<int64_t>(kCols, n - col0)), yp + col0, n);
      }
    });
    return y;
  }
  parallel_chunks(col_blocks, grain, [&](int64_t first, int64_t last) {
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

at::Tensor grid_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, int64_t bits) {
  return run(kBest, x, panels, n, bits);
}

at::Tensor grid_linear_portable(const at::Tensor& x, const at::Tensor& panels, int64_t n, int64_t bits) {
  return run(kPortable, x, panels, n, bits);
}

std::string grid_kernel_isa() { return kBestName; }

int64_t grid_max_k() { return kMaxK; }

}  // namespace

TORCH_LIBRARY(pipeserve, m) {
  m.def("grid_linear(Tensor x, Tensor panels, int out_features, int bits) -> Tensor", &grid_linear);
  m.def("grid_linear_portable(Tensor x, Tensor panels, int out_features, int bits) -> Tensor", &grid_linear_portable);
  m.def("grid_kernel_isa() -> str", &grid_kernel_isa);
  m.def("grid_max_k() -> int", &grid_max_k);
}
