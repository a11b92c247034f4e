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
// - prefill (many rows, bound by the dot-product units): the x rows of a group are packed so that
//   one 512-bit vector holds one 32-bit unit of K (a bf16 pair, or one float) of 16 consecutive rows;
//   each unit of a weight row is broadcast to all lanes. A register tile of 6 weight rows times up
//   to 64 x rows (24 accumulators) needs 4 vector loads and 6 broadcasts per 24 dot products, needs
//   no horizontal reductions, and reads each weight once per 64 x rows. Measured on one core:
//   ~205 GFLOP/s bf16 (94% of the register-only peak) where 4x4 tiles of dot products over the
//   natural layout (horizontal sums at the end) reached ~150.
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
// x rows per staged or packed panel (see panel_stride, pack_units).
constexpr int64_t kPanelRows = 64;
// Prefill groups are packed and tiled in chunks of this many rows (a few hundred KiB of packed x,
// kept in L2); each weight is read from memory once per chunk.
constexpr int64_t kChunkRows = 256;
// Groups with at least this many rows use the packed-x register tiles; smaller ones stream weight rows.
constexpr int64_t kTileMinRows = 8;
static_assert(kTileMinRows <= kPanelRows, "decode-path groups must fit one staged panel");
// Packed-x tiles: x rows per vector (a panel is up to 4 vectors), weight rows per tile.
constexpr int64_t kLanes = 16;
constexpr int kTileRows = 6;
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
  // 32-bit units of K: a pair of bf16.
  static constexpr int kPerUnit = 2;
  static __m512 fma_units(__m512 acc, __m512i x, __m512i w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
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
  static constexpr int kPerUnit = 1;
  static __m512 fma_units(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
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

// Unit u (a 32-bit group of kPerUnit elements) of a row of k elements; past k reads as zero.
template <typename Ops>
inline uint32_t load_unit(const typename Ops::Elem* row, int64_t u, int64_t k) {
  uint32_t unit = 0;
  const int64_t first = u * Ops::kPerUnit;
  std::memcpy(&unit, row + first, std::min<int64_t>(Ops::kPerUnit, k - first) * sizeof(typename Ops::Elem));
  return unit;
}

template <typename Ops>
inline int64_t units_of(int64_t k) {
  return (k + Ops::kPerUnit - 1) / Ops::kPerUnit;
}

// Transposes a 16 x 16 block of 32-bit values: row i of the input becomes lane i of every output.
inline void transpose16(const __m512i in[16], __m512i out[16]) {
  __m512i a[16], b[16];
  for (int j = 0; j < 8; ++j) {  // 128-bit lane L of a[2j]: units 4L, 4L+1 of rows 2j, 2j+1 interleaved
    a[2 * j] = _mm512_unpacklo_epi32(in[2 * j], in[2 * j + 1]);
    a[2 * j + 1] = _mm512_unpackhi_epi32(in[2 * j], in[2 * j + 1]);
  }
  for (int j = 0; j < 4; ++j) {  // lane L of b[4j+c]: unit 4L+c of rows 4j..4j+3
    b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
    b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
    b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
    b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes across b[c], b[4+c], b[8+c], b[12+c]
    const __m512i p0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i p1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i q0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i q1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    out[c] = _mm512_shuffle_i32x4(p0, q0, 0x88);
    out[4 + c] = _mm512_shuffle_i32x4(p0, q0, 0xDD);
    out[8 + c] = _mm512_shuffle_i32x4(p1, q1, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(p1, q1, 0xDD);
  }
}

// Packs rows [s0, s1) of x (a multiple of kLanes, at most kPanelRows) as
// panel[u * kPanelRows + r] = unit u of row s0 + r, 16 x 16 blocks at a time.
template <typename Ops>
void pack_units(const Problem& p, int64_t s0, int64_t s1, uint32_t* panel) {
  using Elem = typename Ops::Elem;
  const int64_t units = units_of<Ops>(p.k);
  const int64_t blocked = p.k / Ops::kPerUnit / kLanes * kLanes;  // units in whole 16 x 16 blocks
  const Elem* x = static_cast<const Elem*>(p.x);
  for (int64_t r0 = s0; r0 < s1; r0 += kLanes) {
    uint32_t* dst = panel + (r0 - s0);
    for (int64_t u0 = 0; u0 < blocked; u0 += kLanes) {
      __m512i in[kLanes], out[kLanes];
      for (int i = 0; i < kLanes; ++i) in[i] = _mm512_loadu_si512(x + (r0 + i) * p.x_stride + u0 * Ops::kPerUnit);
      transpose16(in, out);
      for (int t = 0; t < kLanes; ++t) _mm512_store_si512(dst + (u0 + t) * kPanelRows, out[t]);
    }
    for (int64_t i = 0; i < kLanes; ++i)
      for (int64_t u = blocked; u < units; ++u) dst[u * kPanelRows + i] = load_unit<Ops>(x + (r0 + i) * p.x_stride, u, p.k);
  }
}

// r[j * kPanelRows + i] = dot(x row i, weight row j) for V * kLanes packed x rows and kTileRows
// weight rows starting at w (rows k elements apart).
// When next is set, the kTileRows weight rows starting there are pulled toward L1 along the way, one
// cache line per unit step.
template <typename Ops, int V>
inline void unit_tile(const uint32_t* panel, const typename Ops::Elem* w, int64_t k, const typename Ops::Elem* next,
                      float* r) {
  constexpr int64_t kLineElems = 64 / sizeof(typename Ops::Elem);
  const int64_t row_lines = (k + kLineElems - 1) / kLineElems;
  const int64_t prefetch_lines = next ? kTileRows * row_lines : 0;
  __m512 acc[kTileRows][V];
  for (int j = 0; j < kTileRows; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  const int64_t whole = k / Ops::kPerUnit;
  for (int64_t u = 0; u < whole; ++u) {
    if (u < prefetch_lines)
      _mm_prefetch(reinterpret_cast<const char*>(next + u / row_lines * k + u % row_lines * kLineElems), _MM_HINT_T0);
    __m512i xv[V];
    for (int v = 0; v < V; ++v) xv[v] = _mm512_load_si512(panel + u * kPanelRows + v * kLanes);
    for (int j = 0; j < kTileRows; ++j) {
      int32_t unit;
      std::memcpy(&unit, w + j * k + u * Ops::kPerUnit, 4);
      const __m512i wv = _mm512_set1_epi32(unit);
      for (int v = 0; v < V; ++v) acc[j][v] = Ops::fma_units(acc[j][v], xv[v], wv);
    }
  }
  if (whole < units_of<Ops>(k)) {  // an odd k of bf16: the last unit is half padding
    __m512i xv[V];
    for (int v = 0; v < V; ++v) xv[v] = _mm512_load_si512(panel + whole * kPanelRows + v * kLanes);
    for (int j = 0; j < kTileRows; ++j) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int32_t>(load_unit<Ops>(w + j * k, whole, k)));
      for (int v = 0; v < V; ++v) acc[j][v] = Ops::fma_units(acc[j][v], xv[v], wv);
    }
  }
  for (int j = 0; j < kTileRows; ++j)
    for (int v = 0; v < V; ++v) _mm512_store_ps(r + j * kPanelRows + v * kLanes, acc[j][v]);
}

// Packed x rows [s, s + rows) of a group with expert e against weight rows [n0, n0 + kTileRows).
template <typename Ops, int V>
void unit_block(const Problem& p, int64_t e, const uint32_t* panel, int64_t s, int64_t rows, int64_t n0,
                const typename Ops::Elem* next) {
  const auto* w = static_cast<const typename Ops::Elem*>(p.w) + (e * p.n + n0) * p.k;
  const float* bias = p.bias ? p.bias + e * p.n + n0 : nullptr;
  alignas(64) float r[kTileRows * kPanelRows];
  unit_tile<Ops, V>(panel, w, p.k, next, r);
  for (int64_t i = 0; i < rows; ++i) {
    float result[kTileRows];
    for (int j = 0; j < kTileRows; ++j) result[j] = r[j * kPanelRows + i] + (bias ? bias[j] : 0.0f);
    if (p.scatter_index) {
      float* dst = p.out + p.scatter_index[s + i] * p.out_stride + n0;
      const float weight = p.scatter_weight[s + i];
      for (int j = 0; j < kTileRows; ++j) dst[j] += weight * result[j];
    } else {
      std::memcpy(p.out + (s + i) * p.out_stride + n0, result, sizeof(result));
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

// Copies rows [s0, s1) of x to panel rows panel_stride apart.
template <typename Ops>
void stage_rows(const Problem& p, int64_t s0, int64_t s1, typename Ops::Elem* panel) {
  using Elem = typename Ops::Elem;
  const int64_t ps = panel_stride<Elem>(p.k);
  for (int64_t s = s0; s < s1; ++s)
    std::memcpy(panel + (s - s0) * ps, static_cast<const Elem*>(p.x) + s * p.x_stride, p.k * sizeof(Elem));
}

// Decode path: staged x rows (original rows [s0, s1)) against weight rows [n_lo, n_hi), one weight
// row at a time, in tiles of weight rows re-read from L1 by every row block.
template <typename Ops>
void stream_staged(const Problem& p, int64_t e, const typename Ops::Elem* panel, int64_t s0, int64_t s1,
                   int64_t n_lo, int64_t n_hi) {
  using Elem = typename Ops::Elem;
  const int64_t ps = panel_stride<Elem>(p.k);
  const int64_t tile = std::max<int64_t>(1, kWeightTileBytes / (std::max<int64_t>(p.k, 1) * sizeof(Elem)));
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += tile) {
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

// Prefill path for rows [s0, s1) (at most kChunkRows) of a group against weight rows [n_lo, n_hi).
// Whole vectors of kLanes rows are packed and run through the register tiles, kTileRows weight rows
// at a time; every panel passes a tile of weight rows while it is in L1, so each weight is read from
// memory once per chunk. The last rows (fewer than kLanes) are staged and take dot products against
// the same tile instead of padding a vector with zeros (padding cost ~15% at 64 +- 8 rows per group).
// Leftover weight rows (fewer than kTileRows) go the decode way.
template <typename Ops>
void tile_rows(const Problem& p, int64_t e, int64_t s0, int64_t s1, int64_t n_lo, int64_t n_hi, void* buffer) {
  using Elem = typename Ops::Elem;
  auto* panels = static_cast<uint32_t*>(buffer);
  const int64_t panel_units = units_of<Ops>(p.k) * kPanelRows;
  const int64_t s_vec = s0 + (s1 - s0) / kLanes * kLanes;  // rows [s_vec, s1) are the tail
  const int64_t num_panels = (s_vec - s0 + kPanelRows - 1) / kPanelRows;
  for (int64_t s = s0; s < s_vec; s += kPanelRows)
    pack_units<Ops>(p, s, std::min(s + kPanelRows, s_vec), panels + (s - s0) / kPanelRows * panel_units);
  Elem* tail = reinterpret_cast<Elem*>(panels + num_panels * panel_units);
  const int64_t ps = panel_stride<Elem>(p.k);
  for (int64_t s = s_vec; s < s1; ++s)
    std::memcpy(tail + (s - s_vec) * ps, static_cast<const Elem*>(p.x) + s * p.x_stride, p.k * sizeof(Elem));
  const int64_t n_tiled = n_lo + (n_hi - n_lo) / kTileRows * kTileRows;
  for (int64_t n0 = n_lo; n0 < n_tiled; n0 += kTileRows) {
    // The first panel pulls in the next tile's weight rows, which the hardware prefetchers, following
    // 6 rows 4 bytes a step, bring too late.
    const Elem* next = n0 + kTileRows < n_tiled ? static_cast<const Elem*>(p.w) + (e * p.n + n0 + kTileRows) * p.k
                                                : nullptr;
    for (int64_t s = s0; s < s_vec; s += kPanelRows) {
      const uint32_t* panel = panels + (s - s0) / kPanelRows * panel_units;
      const int64_t rows = std::min(kPanelRows, s_vec - s);
      const Elem* prefetch = s == s0 ? next : nullptr;
      switch (rows / kLanes) {
        case 4: unit_block<Ops, 4>(p, e, panel, s, rows, n0, prefetch); break;
        case 3: unit_block<Ops, 3>(p, e, panel, s, rows, n0, prefetch); break;
        case 2: unit_block<Ops, 2>(p, e, panel, s, rows, n0, prefetch); break;
        default: unit_block<Ops, 1>(p, e, panel, s, rows, n0, prefetch); break;
      }
    }
    stream_staged<Ops>(p, e, tail, s_vec, s1, n0, n0 + kTileRows);
  }
  if (n_tiled < n_hi) {
    // The packed panels are no longer needed, so the leftover weight rows reuse the buffer.
    for (int64_t s = s0; s < s1; s += kPanelRows) {
      const int64_t s_end = std::min(s + kPanelRows, s1);
      stage_rows<Ops>(p, s, s_end, static_cast<Elem*>(buffer));
      stream_staged<Ops>(p, e, static_cast<Elem*>(buffer), s, s_end, n_tiled, n_hi);
    }
  }
}

// All groups against this thread's weight rows [n_lo, n_hi); buffer is this thread's staging buffer
// (see buffer_bytes).
template <typename Ops>
void run_slice(const Problem& p, int64_t n_lo, int64_t n_hi, void* buffer) {
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t e = p.experts[g];
    const int64_t end = p.starts[g] + p.counts[g];
    if (p.counts[g] >= kTileMinRows) {
      for (int64_t s0 = p.starts[g]; s0 < end; s0 += kChunkRows)
        tile_rows<Ops>(p, e, s0, std::min(s0 + kChunkRows, end), n_lo, n_hi, buffer);
    } else {
      auto* panel = static_cast<typename Ops::Elem*>(buffer);
      stage_rows<Ops>(p, p.starts[g], end, panel);
      stream_staged<Ops>(p, e, panel, p.starts[g], end, n_lo, n_hi);
    }
  }
}

// Bytes of one thread's staging buffer: staged x rows for the decode path; packed panels plus the
// staged tail rows for the tiles.
template <typename Ops>
int64_t buffer_bytes(int64_t k, int64_t max_group_rows) {
  using Elem = typename Ops::Elem;
  const int64_t row_bytes = panel_stride<Elem>(k) * sizeof(Elem);
  const int64_t staged = std::min(kPanelRows, max_group_rows) * row_bytes;
  const int64_t chunk_panels = (std::min(kChunkRows, max_group_rows) + kPanelRows - 1) / kPanelRows;
  const int64_t packed = chunk_panels * units_of<Ops>(k) * kPanelRows * 4 + (kLanes - 1) * row_bytes;
  return (std::max(staged, max_group_rows >= kTileMinRows ? packed : 0) + 63) / 64 * 64;
}

// Returns false when the staging buffers cannot be allocated.
template <typename Ops>
bool run(const Problem& p, int64_t rows, int64_t max_group_rows, int nthreads) {
  const int64_t work = rows * p.n * p.k * static_cast<int64_t>(sizeof(typename Ops::Elem));
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({nthreads, p.n, work / kMinBytesPerThread}));
  const int64_t bytes = buffer_bytes<Ops>(p.k, max_group_rows);
  std::unique_ptr<char, decltype(&std::free)> buffers(static_cast<char*>(std::aligned_alloc(64, nt * bytes)),
                                                      &std::free);
  if (!buffers) return false;
  if (nt == 1) {
    run_slice<Ops>(p, 0, p.n, buffers.get());
    return true;
  }
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int64_t t = 0; t < nt; ++t) run_slice<Ops>(p, p.n * t / nt, p.n * (t + 1) / nt, buffers.get() + t * bytes);
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
