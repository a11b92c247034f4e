// Grouped matrix products for MoE experts on AVX-512 (BF16 dot products or FP32 FMA).
//
// For each group g (one expert e, rows [start, start+count) of x) and each output row n:
//     r = dot(x[s, :], w[e, n, :]) + bias[e, n]
// then either out[s, n] = r, or (scatter) out[index[s], n] += weight[s] * r.
//
// Each thread owns one contiguous range of output rows n across all groups, so it streams its slice
// of every expert front to back, and two groups scattering into the same destination row never race.
// The weights stay in their natural [E, N, K] layout: decode and prefill share one copy.
//
// Two regimes, chosen per group by its row count:
// - decode (few rows, bound by reading the weights once): weight rows are consumed one at a time,
//   each as a single sequential stream. Interleaving 2-4 weight rows per register block (the classic
//   GEMV tiling, reusing each x load) measured 15-40% slower with 2 threads and up to 2x slower with
//   one on Zen 4: the hardware prefetchers keep one sequential stream at full DRAM bandwidth but not
//   several streams a row apart. Software prefetch (T0 or NTA, 128 B to 4 KiB ahead) made no
//   measurable difference, so there is none.
// - prefill (many rows, bound by the dot-product units): 4 x rows times 4 weight rows per register
//   tile, 16 accumulators over the whole of K, so each load feeds 4 dot products; the 16 lane-wise
//   partial sums are reduced together at the end of the tile. This reaches the register-only peak
//   with the operands in L1; 4x6 and 6x4 tiles measured slower (register pressure), prefetching the
//   next x rows and blocking K into 256-1024 chunks made no gain. The next tile's weight rows are
//   prefetched while the current tile computes (see run_slice).
//
// Plain C ABI over raw pointers: loaded with ctypes, no torch or Python headers needed.

// gcc 12's AVX-512 headers build results on _mm*_undefined_*(), which -Wall (in Python's build flags)
// reports as -Wmaybe-uninitialized wherever the intrinsics are inlined (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace {

// x rows per register block: 2 accumulators per x row stay well inside the 32 zmm registers.
constexpr int kRowBlock = 4;
// Groups with more than kRowBlock rows make several passes over the same weight rows; a tile of
// weight rows this many bytes is re-read from L1 instead of memory.
constexpr int64_t kWeightTileBytes = 16 * 1024;
// x rows staged per pass (see panel_stride); larger groups re-stream their weights once per panel.
constexpr int64_t kPanelRows = 64;
// Groups with at least this many rows use the 4x4 register tiles; smaller ones stream weight rows.
constexpr int64_t kTileMinRows = 8;
constexpr int kTile = 4;
// Below this many weight bytes times x rows per thread, waking another thread costs more than it
// saves (measured with cache-hot weights: 2 threads lose at 128 KiB per call, win from 512 KiB).
constexpr int64_t kMinBytesPerThread = 128 * 1024;

struct Bf16 {
  using Elem = uint16_t;
  using Vec = __m512i;
  static constexpr int kStep = 32;
  static Vec load(const Elem* p) { return _mm512_loadu_si512(p); }
  static Vec load_tail(const Elem* p, int64_t n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
  }
  static __m512 fma(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

struct F32 {
  using Elem = float;
  using Vec = __m512;
  static constexpr int kStep = 16;
  static Vec load(const Elem* p) { return _mm512_loadu_ps(p); }
  static Vec load_tail(const Elem* p, int64_t n) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static __m512 fma(__m512 acc, Vec a, Vec b) { return _mm512_fmadd_ps(a, b, acc); }
};

struct Problem {
  const void* x;
  int64_t x_stride;
  const void* w;
  int64_t n;
  int64_t k;
  const int64_t* experts;
  const int64_t* starts;
  const int64_t* counts;
  int64_t groups;
  const float* bias;
  float* out;
  int64_t out_stride;
  const int64_t* scatter_index;
  const float* scatter_weight;
};

// r[m] = dot(w, x[m]) for M rows of x. Two accumulators per row hide the FMA latency when
// the weights come from cache rather than memory.
template <typename Ops, int M>
inline void dot_rows(const typename Ops::Elem* w, const typename Ops::Elem* x, int64_t x_stride, int64_t k,
                     float* r) {
  constexpr int S = Ops::kStep;
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 2 * S <= k; kk += 2 * S) {
    const auto w0 = Ops::load(w + kk);
    const auto w1 = Ops::load(w + kk + S);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = Ops::fma(acc[m][0], w0, Ops::load(x + m * x_stride + kk));
      acc[m][1] = Ops::fma(acc[m][1], w1, Ops::load(x + m * x_stride + kk + S));
    }
  }
  if (kk + S <= k) {
    const auto w0 = Ops::load(w + kk);
    for (int m = 0; m < M; ++m) acc[m][0] = Ops::fma(acc[m][0], w0, Ops::load(x + m * x_stride + kk));
    kk += S;
  }
  if (kk < k) {
    // Masked loads zero both operands past k, so the tail adds nothing and reads nothing out of bounds.
    const auto w0 = Ops::load_tail(w + kk, k - kk);
    for (int m = 0; m < M; ++m) acc[m][1] = Ops::fma(acc[m][1], w0, Ops::load_tail(x + m * x_stride + kk, k - kk));
  }
  for (int m = 0; m < M; ++m) r[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

// M staged x rows (original rows [s, s+M)) of a group with expert e against weight rows [n0, n1).
template <typename Ops, int M>
void row_block(const Problem& p, int64_t e, const typename Ops::Elem* x, int64_t x_stride, int64_t s, int64_t n0,
               int64_t n1) {
  const auto* w = static_cast<const typename Ops::Elem*>(p.w) + e * p.n * p.k;
  const float* bias = p.bias ? p.bias + e * p.n : nullptr;
  for (int64_t n = n0; n < n1; ++n) {
    float r[M];
    dot_rows<Ops, M>(w + n * p.k, x, x_stride, p.k, r);
    if (bias)
      for (int m = 0; m < M; ++m) r[m] += bias[n];
    if (p.scatter_index) {
      for (int m = 0; m < M; ++m) p.out[p.scatter_index[s + m] * p.out_stride + n] += p.scatter_weight[s + m] * r[m];
    } else {
      for (int m = 0; m < M; ++m) p.out[(s + m) * p.out_stride + n] = r[m];
    }
  }
}

// Lane-wise partial sums of 4 vectors, packed: 128-bit chunk i of the result holds 4 partial sums
// of vector i.
inline __m512 partial_sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
}

// Finishes four partial_sums4 results: float 4 * i + j of the result is the full sum of vector i of
// input j. About 3 instructions per reduced vector instead of the ~8 of _mm512_reduce_add_ps.
inline __m512 full_sums4x4(__m512 p, __m512 q, __m512 r, __m512 s) {
  const __m512 pq = _mm512_add_ps(_mm512_unpacklo_ps(p, q), _mm512_unpackhi_ps(p, q));
  const __m512 rs = _mm512_add_ps(_mm512_unpacklo_ps(r, s), _mm512_unpackhi_ps(r, s));
  return _mm512_add_ps(_mm512_shuffle_ps(pq, rs, 0x44), _mm512_shuffle_ps(pq, rs, 0xEE));
}

// Rows of weights to pull into L1 while a tile computes: `rows` rows of k elements, `stride` apart.
template <typename Elem>
struct Prefetch {
  const Elem* first = nullptr;
  int64_t stride = 0;
  int rows = 0;
};

// r[4 * m + j] = dot(x[m], w[j]) for M <= 4 rows of x and 4 weight rows w[j] = w + j * k.
template <typename Ops, int M>
inline void dot_tile(const typename Ops::Elem* w, const typename Ops::Elem* x, int64_t x_stride, int64_t k,
                     const Prefetch<typename Ops::Elem>& prefetch, float* r) {
  constexpr int S = Ops::kStep;
  __m512 acc[kTile][kTile];
  for (int m = 0; m < kTile; ++m)
    for (int j = 0; j < kTile; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + S <= k; kk += S) {
    typename Ops::Vec xv[M];
    for (int m = 0; m < M; ++m) xv[m] = Ops::load(x + m * x_stride + kk);
    for (int i = 0; i < prefetch.rows; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(prefetch.first + i * prefetch.stride + kk), _MM_HINT_T0);
    for (int j = 0; j < kTile; ++j) {
      const auto wv = Ops::load(w + j * k + kk);
      for (int m = 0; m < M; ++m) acc[m][j] = Ops::fma(acc[m][j], xv[m], wv);
    }
  }
  if (kk < k) {
    typename Ops::Vec xv[M];
    for (int m = 0; m < M; ++m) xv[m] = Ops::load_tail(x + m * x_stride + kk, k - kk);
    for (int j = 0; j < kTile; ++j) {
      const auto wv = Ops::load_tail(w + j * k + kk, k - kk);
      for (int m = 0; m < M; ++m) acc[m][j] = Ops::fma(acc[m][j], xv[m], wv);
    }
  }
  // Rows past M stay zero and their sums are never read.
  __m512 partial[kTile];
  for (int j = 0; j < kTile; ++j) partial[j] = partial_sums4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
  _mm512_storeu_ps(r, full_sums4x4(partial[0], partial[1], partial[2], partial[3]));
}

// M staged x rows (original rows [s, s+M)) of a group with expert e against weight rows [n0, n1),
// where n1 - n0 is a multiple of kTile.
template <typename Ops, int M>
void tile_block(const Problem& p, int64_t e, const typename Ops::Elem* x, int64_t x_stride, int64_t s, int64_t n0,
                int64_t n1, const Prefetch<typename Ops::Elem>& prefetch) {
  const auto* w = static_cast<const typename Ops::Elem*>(p.w) + e * p.n * p.k;
  const float* bias = p.bias ? p.bias + e * p.n : nullptr;
  for (int64_t n = n0; n < n1; n += kTile) {
    alignas(64) float r[kTile * kTile];
    dot_tile<Ops, M>(w + n * p.k, x, x_stride, p.k, prefetch, r);
    for (int m = 0; m < M; ++m) {
      float* row = r + kTile * m;
      if (bias)
        for (int j = 0; j < kTile; ++j) row[j] += bias[n + j];
      if (p.scatter_index) {
        float* dst = p.out + p.scatter_index[s + m] * p.out_stride + n;
        const float weight = p.scatter_weight[s + m];
        for (int j = 0; j < kTile; ++j) dst[j] += weight * row[j];
      } else {
        std::memcpy(p.out + (s + m) * p.out_stride + n, row, sizeof(float) * kTile);
      }
    }
  }
}

// Row stride, in elements, of the staged x panel: whole cache lines plus one more. Contiguous rows of
// x are often a multiple of 4 KiB apart (K = 1024, 2048 bf16), which puts every x row of a register
// block in the same L1 sets; with the extra line they spread out, and every load is line-aligned.
// Measured: 4-row groups 17-24 -> 28 GB/s with 2 threads.
template <typename Elem>
int64_t panel_stride(int64_t k) {
  constexpr int64_t kLine = 64 / sizeof(Elem);
  return (k + kLine - 1) / kLine * kLine + kLine;
}

// All groups against this thread's weight rows [n_lo, n_hi); panel is this thread's staging buffer
// of panel_rows rows.
template <typename Ops>
void run_slice(const Problem& p, int64_t n_lo, int64_t n_hi, typename Ops::Elem* panel, int64_t panel_rows) {
  using Elem = typename Ops::Elem;
  const int64_t ps = panel_stride<Elem>(p.k);
  const int64_t tile = std::max<int64_t>(1, kWeightTileBytes / (std::max<int64_t>(p.k, 1) * sizeof(Elem)));
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t e = p.experts[g];
    const int64_t end = p.starts[g] + p.counts[g];
    for (int64_t s0 = p.starts[g]; s0 < end; s0 += panel_rows) {
      const int64_t s1 = std::min(s0 + panel_rows, end);
      for (int64_t s = s0; s < s1; ++s)
        std::memcpy(panel + (s - s0) * ps, static_cast<const Elem*>(p.x) + s * p.x_stride, p.k * sizeof(Elem));
      // Prefill-sized groups: 4x4 tiles over weight rows [n_lo, n_tiled), each tile of weight rows
      // staying in L1 while every row of the panel passes it; leftover rows go the decode way.
      const int64_t n_tiled = p.counts[g] >= kTileMinRows ? n_lo + (n_hi - n_lo) / kTile * kTile : n_lo;
      for (int64_t n0 = n_lo; n0 < n_tiled; n0 += kTile) {
        // The row blocks share out pulling the next tile's weight rows into L1 while this tile
        // computes (block b takes rows b, b + blocks, ...); without it every tile starts stalled on
        // memory. Measured +10-20% on prefill shapes.
        const int64_t blocks = std::min<int64_t>(kTile, (s1 - s0 + kTile - 1) / kTile);
        const bool has_next = n0 + kTile < n_tiled;
        const Elem* next_tile = static_cast<const Elem*>(p.w) + (e * p.n + n0 + kTile) * p.k;
        for (int64_t s = s0; s < s1; s += kTile) {
          const Elem* x = panel + (s - s0) * ps;
          const int64_t block = (s - s0) / kTile;
          Prefetch<Elem> prefetch;
          if (has_next && block < blocks)
            prefetch = {next_tile + block * p.k, blocks * p.k, static_cast<int>((kTile - block + blocks - 1) / blocks)};
          switch (std::min<int64_t>(kTile, s1 - s)) {
            case 4: tile_block<Ops, 4>(p, e, x, ps, s, n0, n0 + kTile, prefetch); break;
            case 3: tile_block<Ops, 3>(p, e, x, ps, s, n0, n0 + kTile, prefetch); break;
            case 2: tile_block<Ops, 2>(p, e, x, ps, s, n0, n0 + kTile, prefetch); break;
            default: tile_block<Ops, 1>(p, e, x, ps, s, n0, n0 + kTile, prefetch); break;
          }
        }
      }
      for (int64_t n0 = n_tiled; n0 < n_hi; n0 += tile) {
        const int64_t n1 = std::min(n0 + tile, n_hi);
        for (int64_t s = s0; s < s1; s += kRowBlock) {
          const Elem* x = panel + (s - s0) * ps;
          switch (std::min<int64_t>(kRowBlock, s1 - s)) {
            case 4: row_block<Ops, 4>(p, e, x, ps, s, n0, n1); break;
            case 3: row_block<Ops, 3>(p, e, x, ps, s, n0, n1); break;
            case 2: row_block<Ops, 2>(p, e, x, ps, s, n0, n1); break;
            default: row_block<Ops, 1>(p, e, x, ps, s, n0, n1); break;
          }
        }
      }
    }
  }
}

// Returns false when the staging buffers cannot be allocated.
template <typename Ops>
bool run(const Problem& p, int64_t rows, int64_t max_group_rows, int nthreads) {
  using Elem = typename Ops::Elem;
  const int64_t work = rows * p.n * p.k * static_cast<int64_t>(sizeof(Elem));
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({nthreads, p.n, work / kMinBytesPerThread}));
  const int64_t panel_rows = std::min(kPanelRows, max_group_rows);
  const int64_t panel_elems = panel_rows * panel_stride<Elem>(p.k);
  std::unique_ptr<Elem, decltype(&std::free)> panels(
      static_cast<Elem*>(std::aligned_alloc(64, nt * panel_elems * sizeof(Elem))), &std::free);
  if (!panels) return false;
  if (nt == 1) {
    run_slice<Ops>(p, 0, p.n, panels.get(), panel_rows);
    return true;
  }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int64_t t = 0; t < nt; ++t)
    run_slice<Ops>(p, p.n * t / nt, p.n * (t + 1) / nt, panels.get() + t * panel_elems, panel_rows);
  return true;
}

}  // namespace

extern "C" {

// Status codes, mirrored in native.py.
enum {
  kOk = 0,
  kBadDtype = 1,
  kBadExpert = 2,
  kBadGroupRows = 3,
  kBadScatterIndex = 4,
  kBadOutRows = 5,
  kOutOfMemory = 6,
};

// dtype: 0 = float32, 1 = bfloat16. Strides are in elements. x has x_rows rows, out has out_rows.
// scatter_index / scatter_weight are both null (out[s] = r) or both set (out[index[s]] += weight[s] * r).
// Every index that will be used is checked before anything is written, so a bad argument returns an
// error, never an out-of-bounds access.
int moerun_grouped_gemv(const void* x, int64_t x_rows, int64_t x_stride, const void* w, int64_t num_experts,
                        int64_t n, int64_t k, const int64_t* group_experts, const int64_t* group_starts,
                        const int64_t* group_counts, int64_t groups, const float* bias, float* out, int64_t out_rows,
                        int64_t out_stride, const int64_t* scatter_index, const float* scatter_weight, int dtype,
                        int nthreads) {
  if (dtype != 0 && dtype != 1) return kBadDtype;
  // Without scatter, row s of x writes row s of out.
  if (!scatter_index && out_rows < x_rows) return kBadOutRows;
  int64_t rows = 0, max_group_rows = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = group_starts[g], count = group_counts[g];
    if (group_experts[g] < 0 || group_experts[g] >= num_experts) return kBadExpert;
    if (start < 0 || count < 0 || count > x_rows - start) return kBadGroupRows;
    if (scatter_index)
      for (int64_t s = start; s < start + count; ++s)
        if (scatter_index[s] < 0 || scatter_index[s] >= out_rows) return kBadScatterIndex;
    rows += count;
    max_group_rows = std::max(max_group_rows, count);
  }
  if (rows == 0 || n <= 0) return kOk;
  const Problem p{x,      x_stride, w,   n,          k,   group_experts, group_starts, group_counts,
                  groups, bias,     out, out_stride, scatter_index, scatter_weight};
  const bool ok = dtype == 1 ? run<Bf16>(p, rows, max_group_rows, nthreads) : run<F32>(p, rows, max_group_rows, nthreads);
  return ok ? kOk : kOutOfMemory;
}

}  // extern "C"
