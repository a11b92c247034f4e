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
// Weights may also be low-bit (moerun/quant/formats.py): each expert's matrix is described by its own
// Matrix entry (pointer, format, scales), so experts of one call may differ in format and need not be
// stacked in one allocation. Decode-sized groups read the packed weights directly and feed VNNI int8 dot
// products with x quantized to int8 in blocks (see "Low-bit weights, decode path"); the offsets and zero
// points are taken out afterwards from sums of x. Low-bit matrices are stored in tiles of 4 rows so that
// one sequential stream feeds 4 rows per x vector loaded (see the layouts below). Prefill-sized groups
// dequantize each register tile's weight rows into an L1-resident scratch in x's dtype and run the same
// tiles as plain weights: the cost is amortised over the group's rows.
//
// Decode of one token through a whole MoE layer (moerun_moe_token) runs its router, softmax top-k, both
// projections and the activation in one call. The ~25 small torch operations it replaces took ~350 us per
// int4 olmoe-1b-7b layer in a decode step (a third of the projections' time), several times their cost when
// run back to back: every layer's weight reads evict their code and data from the caches.
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
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

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

// Status codes, mirrored in native.py.
enum {
  kOk = 0,
  kBadDtype = 1,
  kBadExpert = 2,
  kBadGroupRows = 3,
  kBadScatterIndex = 4,
  kBadOutRows = 5,
  kOutOfMemory = 6,
  kBadActivation = 7,
  kBadShape = 8,
  kBadFormat = 9,
  kBadLogits = 10,
};

// Gated activations the kernel can fuse (codes mirrored in native.py).
enum Glu { kNoGlu = -1, kSilu = 0, kGeluTanh = 1, kSwigluClamped = 2 };

// Dtype codes of x and outputs: 0 float32, 1 bfloat16 (the Format codes of plain matrices).
inline bool known_dtype(int dtype) { return dtype == 0 || dtype == 1; }
inline bool fusable_glu(int glu) { return glu == kSilu || glu == kGeluTanh || glu == kSwigluClamped; }

// Lanes [0, n) of a 16-lane mask, n <= 16.
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
// Lanes [0, min(n, 32)) of a 32-lane mask.
inline __mmask32 lanes32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << n) - 1); }

struct Bf16 {
  using Elem = uint16_t;
  using Vec = __m512i;
  static constexpr int kStep = 32;
  static Vec load(const Elem* p) { return _mm512_loadu_si512(p); }
  static Vec load_tail(const Elem* p, int64_t n) {
    return _mm512_maskz_loadu_epi16(lanes32(n), p);
  }
  static __m512 fma(__m512 acc, Vec a, Vec b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // 32-bit units of K: a pair of bf16.
  static constexpr int kPerUnit = 2;
  static __m512 fma_units(__m512 acc, __m512i x, __m512i w) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
  // Rounds to nearest even, as torch's float -> bfloat16 conversion does.
  static void store16(Elem* dst, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v)); }
  static void store_tail(Elem* dst, __m512 v, __mmask16 mask) {
    _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
  static __m512 load16_f32(const Elem* p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
  }
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
  static void store16(Elem* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
  static void store_tail(Elem* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
  static __m512 load16_f32(const Elem* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
};

// Storage formats of a weight matrix (codes mirrored in native.py).
enum Format { kFormatF32 = 0, kFormatBf16 = 1, kFormatInt8 = 2, kFormatInt4 = 3 };

// One expert's [n, k] weight matrix, as 4 int64 words from Python:
// - kFormatF32 / kFormatBf16: w rows of k values; scales and mins unused.
// - kFormatInt8: w int8, n * k values in the int8 layout (row tiles); scales: n float32.
// - kFormatInt4: w uint8, n * k/2 bytes in the int4 layout (row tiles as int8); scales (and, asymmetric, mins):
//   n rows of k / group_size float16.
// meta = format | group_size << 8.
struct Matrix {
  const void* w;
  const void* scales;
  const void* mins;
  int64_t meta;
  int format() const { return static_cast<int>(meta & 0xff); }
  int64_t group_size() const { return meta >> 8; }
  bool quantized() const { return format() >= kFormatInt8; }
};
static_assert(sizeof(Matrix) == 32, "Matrix must match the [E, 4] int64 table built in native.py");

struct Problem {
  const void* x;
  int64_t x_stride;
  const Matrix* mats;
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
  // Fused gated activation (moerun_grouped_glu): w holds gate rows [0, n/2) then up rows [n/2, n);
  // act[s, i] = glu(r[s, i], r[s, n/2 + i]) in x's dtype replaces out.
  int glu = kNoGlu;
  float glu_alpha = 0.0f;
  float glu_limit = 0.0f;
  void* act = nullptr;
  int64_t act_stride = 0;
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

// Calls f(std::integral_constant<int, M>{}, s) for consecutive blocks [s, s + M) of [s0, s1), M <= kRowBlock.
template <typename F>
inline void for_row_blocks(int64_t s0, int64_t s1, F f) {
  for (int64_t s = s0; s < s1; s += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, s1 - s)) {
      case 4: f(std::integral_constant<int, 4>{}, s); break;
      case 3: f(std::integral_constant<int, 3>{}, s); break;
      case 2: f(std::integral_constant<int, 2>{}, s); break;
      default: f(std::integral_constant<int, 1>{}, s); break;
    }
  }
}

// The decode path's loop: weight rows [n_lo, n_hi) in tiles of `tile` rows (re-read from L1 by each row
// block), each tile against the row blocks of [s0, s1): f(std::integral_constant<int, M>{}, s, n0, n1).
template <typename F>
inline void for_weight_tiles(int64_t n_lo, int64_t n_hi, int64_t tile, int64_t s0, int64_t s1, F f) {
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += tile) {
    const int64_t n1 = std::min(n0 + tile, n_hi);
    for_row_blocks(s0, s1, [&](auto m, int64_t s) { f(m, s, n0, n1); });
  }
}

// Row n's results r[M] for x rows [s, s + M) of a group with expert e, plus the bias, stored or scattered.
template <int M>
inline void store_results(const Problem& p, int64_t e, int64_t s, int64_t n, float* r) {
  if (p.bias)
    for (int m = 0; m < M; ++m) r[m] += p.bias[e * p.n + n];
  if (p.scatter_index) {
    for (int m = 0; m < M; ++m) p.out[p.scatter_index[s + m] * p.out_stride + n] += p.scatter_weight[s + m] * r[m];
  } else {
    for (int m = 0; m < M; ++m) p.out[(s + m) * p.out_stride + n] = r[m];
  }
}

// Weight rows [n0, n1) of expert e against M x rows (original rows [s, s+M)): dot(n, r) fills r[M] with
// row n's products.
template <int M, typename Dot>
inline void rows_against(const Problem& p, int64_t e, int64_t s, int64_t n0, int64_t n1, Dot dot) {
  for (int64_t n = n0; n < n1; ++n) {
    float r[M];
    dot(n, r);
    store_results<M>(p, e, s, n, r);
  }
}

// M staged x rows (original rows [s, s+M)) of a group with expert e against plain weight rows [n0, n1).
template <typename Ops, int M>
void row_block(const Problem& p, int64_t e, const typename Ops::Elem* x, int64_t x_stride, int64_t s, int64_t n0,
               int64_t n1) {
  const auto* w = static_cast<const typename Ops::Elem*>(p.mats[e].w);
  rows_against<M>(p, e, s, n0, n1, [&](int64_t n, float* r) { dot_rows<Ops, M>(w + n * p.k, x, x_stride, p.k, r); });
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
  for_weight_tiles(n_lo, n_hi, tile, s0, s1, [&](auto m, int64_t s, int64_t n0, int64_t n1) {
    row_block<Ops, decltype(m)::value>(p, e, panel + (s - s0) * ps, ps, s, n0, n1);
  });
}

// ---- Low-bit weights, decode path ----
//
// x is quantized to int8 (symmetric, one scale per block of values: a 64-value chunk for int8 weights, a
// lane group for int4, as llama.cpp's Q8_0 does per 32 values), so that one VNNI instruction multiplies
// 64 weight bytes by 64 x bytes and sums them in fours into 32-bit lanes. Against dot products of bf16
// (weights widened to 16 bits first) this halves the instructions per weight byte (int4) or cuts them to a
// third (int8), which is what keeps these kernels at the memory's speed: with the bf16 formulation int4
// streamed 20-26 GB/s of the ~34 a plain read reaches.

// n (<= 64) values of x quantized with one scale: q = round(x * 127 / max|x|) (nearest even), q[n, 64) = 0;
// returns the scale max|x| / 127 (0 for all-zero x, NaN if a value is NaN, so that it reaches the result)
// and the sum of q in *sum.
template <typename Ops>
inline float quantize_block(const typename Ops::Elem* x, int64_t n, int8_t* q, int32_t* sum) {
  __m512 v[4];
  __m512 top = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int i = 0; i < 4; ++i) {
    const int64_t left = n - 16 * i;
    v[i] = left > 0 ? Ops::load16_f32(x + 16 * i, lanes(std::min<int64_t>(16, left))) : _mm512_setzero_ps();
    top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
    nan |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
  }
  const float absmax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(top);
  const __m512 inv = _mm512_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
  __m512i total = _mm512_setzero_si512();
  for (int i = 0; i < 4; ++i) {
    const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));  // rounds to nearest even
    total = _mm512_add_epi32(total, qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtepi32_epi8(qi));
  }
  *sum = _mm512_reduce_add_epi32(total);
  return absmax / 127.0f;
}

// ---- int8 layout (moerun/quant/formats.py): row tiles of kRowTile rows stored as one stream, each
// tile chunk after chunk of kInt8Chunk values (the last may be shorter), every row of the tile in turn. ----

constexpr int64_t kRowTile = 4;
constexpr int64_t kInt8Chunk = 64;

// Offset of the row tile holding row n, in values of a matrix of k values per row, and its row count.
inline int64_t tile_offset(int64_t n, int64_t k) { return n / kRowTile * kRowTile * k; }
inline int64_t tile_rows(int64_t n, int64_t n_rows) { return std::min(kRowTile, n_rows - n / kRowTile * kRowTile); }

// One x row staged for int8 weights: q [chunks * 64] (zero past k), a scale per chunk, and
// offset = 128 * sum over chunks of scale * sum(q), what the biased weights below add.
struct Int8X {
  const int8_t* q;
  const float* scales;
  float offset;
};

// r[j * M + m] = scale_j * dot(row j of an int8 row tile of RT rows, x row m). Each weight byte is read as
// u = q + 128 (one XOR), so that VNNI's unsigned-by-signed products apply; sum u x = sum q x + 128 sum x
// and the x offsets come off at the end.
template <int M, int RT>
inline void dot_tile_int8(const int8_t* q, const float* scales, const Int8X* x, int64_t k, float* r) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 tot[RT][M];
  for (int j = 0; j < RT; ++j)
    for (int m = 0; m < M; ++m) tot[j][m] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < k; c0 += kInt8Chunk) {
    const int64_t len = std::min(kInt8Chunk, k - c0);
    const __mmask64 mask = len == kInt8Chunk ? ~0ull : (1ull << len) - 1;
    __m512i xv[M];
    __m512 xs[M];
    for (int m = 0; m < M; ++m) {
      xv[m] = _mm512_loadu_si512(x[m].q + c0);
      xs[m] = _mm512_set1_ps(x[m].scales[c0 / kInt8Chunk]);
    }
    for (int j = 0; j < RT; ++j) {
      // Past k: u = 128 against q = 0.
      const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + j * len), flip);
      for (int m = 0; m < M; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv[m]);
        tot[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xs[m], tot[j][m]);
      }
    }
    q += RT * len;
  }
  for (int j = 0; j < RT; ++j)
    for (int m = 0; m < M; ++m) r[j * M + m] = scales[j] * (_mm512_reduce_add_ps(tot[j][m]) - x[m].offset);
}

// ---- int4 layout (moerun/quant/formats.py): row tiles as for int8; along K,
// blocks of 16 groups (the last may have fewer), each cut into chunks of 8 values per group. For each
// chunk, each row of the tile stores 2 ng 16-bit words (ng groups in the block), word 2i + t holding in
// nibble j value 8c + 2j + t of group i. The low nibbles of a row's 64-byte chunk are thus, in 32-bit lane
// i, values (0, 4, 1, 5) of group i's chunk, the high nibbles values (2, 6, 3, 7): dot-product lanes never
// mix groups, and one multiply by the block's 16 scales applies them all. x is quantized and permuted to
// match once per call (stage_int4_x). ----

constexpr int64_t kBlockGroups = 16;

// The layout's group (a dot-product lane's share of a block): groups of 128 are laid out as two lanes of
// 64 sharing one scale, so that a block (16 lanes) spans 1024 values and fills every lane of K = 1024.
constexpr int lane_group(int g) { return g > 64 ? 64 : g; }

// Bytes of an int4-staged x row for lane groups of l values (whole blocks of 16 lane groups), for either
// lane group size, and floats of its per-lane-group scales and sums.
inline int64_t int4_x_bytes(int64_t k, int64_t l) { return (k / l + kBlockGroups - 1) / kBlockGroups * kBlockGroups * l; }
inline int64_t int4_x_bytes(int64_t k) { return std::max(int4_x_bytes(k, 32), int4_x_bytes(k, 64)); }
inline int64_t int4_x_lanes(int64_t k) { return (k / 32 + kBlockGroups - 1) / kBlockGroups * kBlockGroups; }

// One x row staged for int4 weights: per block of 16 lane groups and chunk c, 64 bytes of low-nibble
// partners (lane i: values 8c + 0, 4, 1, 5 of lane group i) then 64 of high-nibble partners (2, 6, 3, 7);
// a scale and a sum of q per lane group.
struct Int4X {
  const int8_t* q;
  const float* scales;
  const float* sums;
};

// Quantizes x [k] per lane group of L values into the Int4X layout at q (int4_x_bytes(k)), scales and sums.
template <typename Ops>
void stage_int4_x(const typename Ops::Elem* x, int64_t k, int L, int8_t* q, float* scales, float* sums) {
  const int64_t lanes_total = k / L;
  std::memset(q, 0, int4_x_bytes(k, L));
  alignas(64) int8_t values[64];
  uint32_t* out = reinterpret_cast<uint32_t*>(q);
  for (int64_t g = 0; g < lanes_total; ++g) {
    int32_t sum;
    scales[g] = quantize_block<Ops>(x + g * L, L, values, &sum);
    sums[g] = static_cast<float>(sum);
    const int64_t block = g / kBlockGroups, lane = g % kBlockGroups;
    for (int c = 0; c < L / 8; ++c) {
      const uint8_t* v = reinterpret_cast<const uint8_t*>(values + 8 * c);
      const uint32_t low = v[0] | v[4] << 8 | v[1] << 16 | static_cast<uint32_t>(v[5]) << 24;
      const uint32_t high = v[2] | v[6] << 8 | v[3] << 16 | static_cast<uint32_t>(v[7]) << 24;
      uint32_t* at = out + ((block * (L / 8) + c) * 2) * kBlockGroups + lane;
      at[0] = low;
      at[kBlockGroups] = high;
    }
  }
}

// 32 words of a row's chunk (2 ng of them; the rest read as zero).
inline __m512i load_int4_chunk(const uint8_t* q, __mmask32 words) {
  return words == 0xFFFFFFFFu ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi16(words, q);
}

// The float16 values (scales or mins) of ng lanes starting at v, each repeated for the R lanes of its group.
template <int R>
inline __m512 lane_scales(const uint16_t* v, int64_t ng) {
  const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes((ng + R - 1) / R), v));
  if constexpr (R == 1) return s;
  return _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 1), s);
}

// r[j * M + m] = dot(row j of an int4 row tile of RT rows, x row m), for G-value groups. q: the tile;
// scales (and mins): row 0's, `groups` per row. Per block, each lane sums q * xq over its group in int32;
// the weights' dequantization w = s q + low (low = min, or -8 s when symmetric) and x's scale then give
// dot = x_scale (s sum q xq + low sum xq). With one x row, two accumulators per weight row keep enough
// dot-product chains in flight; with two, one each leaves room for the 4 x vectors.
template <int G, int M, int RT>
inline void dot_tile_int4(const uint8_t* q, const uint16_t* scales, const uint16_t* mins, int64_t groups,
                          const Int4X* x, float* r) {
  constexpr int A = M == 1 ? 2 : 1;
  constexpr int L = lane_group(G), R = G / L;
  const int64_t lanes_total = groups * R;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 tot[RT][M];
  for (int j = 0; j < RT; ++j)
    for (int m = 0; m < M; ++m) tot[j][m] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < lanes_total; g0 += kBlockGroups) {
    const int64_t ng = std::min(kBlockGroups, lanes_total - g0);
    const __mmask32 words = lanes32(2 * ng);
    const int64_t xb = g0 / kBlockGroups * L * kBlockGroups;
    __m512i acc[RT][M][A];
    for (int j = 0; j < RT; ++j)
      for (int m = 0; m < M; ++m)
        for (int a = 0; a < A; ++a) acc[j][m][a] = _mm512_setzero_si512();
    for (int c = 0; c < L / 8; ++c) {
      __m512i xlow[M], xhigh[M];
      for (int m = 0; m < M; ++m) {
        xlow[m] = _mm512_load_si512(x[m].q + xb + c * 128);
        xhigh[m] = _mm512_load_si512(x[m].q + xb + c * 128 + 64);
      }
      for (int j = 0; j < RT; ++j) {
        const __m512i w = load_int4_chunk(q, words);
        q += 4 * ng;
        const __m512i low = _mm512_and_si512(w, nibble), high = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
        for (int m = 0; m < M; ++m) {
          acc[j][m][0] = _mm512_dpbusd_epi32(acc[j][m][0], low, xlow[m]);
          acc[j][m][A - 1] = _mm512_dpbusd_epi32(acc[j][m][A - 1], high, xhigh[m]);
        }
      }
    }
    const __mmask16 mask = lanes(ng);
    __m512 xs[M], sums[M];
    for (int m = 0; m < M; ++m) {
      xs[m] = _mm512_maskz_loadu_ps(mask, x[m].scales + g0);
      sums[m] = _mm512_maskz_loadu_ps(mask, x[m].sums + g0);
    }
    for (int j = 0; j < RT; ++j) {
      const __m512 s = lane_scales<R>(scales + j * groups + g0 / R, ng);
      const __m512 low = mins ? lane_scales<R>(mins + j * groups + g0 / R, ng) : _mm512_mul_ps(s, _mm512_set1_ps(-8.0f));
      for (int m = 0; m < M; ++m) {
        const __m512i d = A == 1 ? acc[j][m][0] : _mm512_add_epi32(acc[j][m][0], acc[j][m][A - 1]);
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, _mm512_mul_ps(low, sums[m]));
        tot[j][m] = _mm512_fmadd_ps(t, xs[m], tot[j][m]);
      }
    }
  }
  for (int j = 0; j < RT; ++j)
    for (int m = 0; m < M; ++m) r[j * M + m] = _mm512_reduce_add_ps(tot[j][m]);
}

// f(std::integral_constant<int, RT>{}) for the row count rt (1 to kRowTile) of a row tile.
template <typename F>
inline void with_tile_rows(int64_t rt, F f) {
  switch (rt) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// The low-bit decode loop: weight rows [n_lo, n_hi) (whole row tiles, up to the matrix's last row) in
// L1-sized runs of row tiles of row_bytes per row, each run against the x rows [s0, s1) a pair at a time:
// dot(std::integral_constant<int, M>{}, s, n, rt, r) fills r[j * M + m] for x rows [s, s + M) and the rt
// rows of the tile at row n; the results get the bias and are stored or scattered.
template <typename Dot>
inline void tiles_against(const Problem& p, int64_t e, int64_t row_bytes, int64_t s0, int64_t s1, int64_t n_lo,
                          int64_t n_hi, Dot dot) {
  const int64_t run = std::max<int64_t>(1, kWeightTileBytes / (kRowTile * row_bytes)) * kRowTile;
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += run) {
    for (int64_t s = s0; s < s1; s += 2) {
      const auto rows = [&](auto mc) {
        constexpr int M = decltype(mc)::value;
        for (int64_t n = n0; n < std::min(n0 + run, n_hi); n += kRowTile) {
          float r[kRowTile * M];
          const int64_t rt = tile_rows(n, p.n);
          dot(mc, s, n, rt, r);
          for (int64_t j = 0; j < rt; ++j) store_results<M>(p, e, s, n + j, r + j * M);
        }
      };
      if (s + 1 < s1)
        rows(std::integral_constant<int, 2>{});
      else
        rows(std::integral_constant<int, 1>{});
    }
  }
}

// Bytes one staged x row takes for low-bit weights, either format (64-byte multiples).
inline int64_t quant_x_row_bytes(int64_t k) {
  const int64_t chunks = (k + kInt8Chunk - 1) / kInt8Chunk;
  const int64_t int8 = chunks * kInt8Chunk + (chunks * 4 + 63) / 64 * 64;
  const int64_t int4 = int4_x_bytes(k) + 2 * int4_x_lanes(k) * 4;
  return std::max(int8, int4);
}

// Bytes the decode path stages for up to `rows` rows of a low-bit matrix.
inline int64_t quant_staging_bytes(int64_t k, int64_t rows) { return rows * quant_x_row_bytes(k); }

// The x rows a thread's buffer holds quantized, within one call: groups whose rows are the same memory
// (one token against several experts, x_stride 0) reuse them.
struct StagedX {
  const void* rows = nullptr;  // the first row's address; null: nothing reusable staged
  int64_t count = 0;
  int64_t layout = 0;  // 8 (int8 weights), or the int4 lane group
  Int8X int8[kTileMinRows];
  Int4X int4[kTileMinRows];

  bool holds(const void* first, int64_t n, int64_t code) const { return rows == first && count == n && layout == code; }
};

// Decode path for a low-bit matrix: rows [s0, s1) of x (fewer than kTileMinRows) quantized into buffer
// (see Int8X, Int4X; unless `staged` says the buffer holds them) against weight rows [n_lo, n_hi).
template <typename Ops>
void stream_quant(const Problem& p, int64_t e, void* buffer, int64_t s0, int64_t s1, int64_t n_lo, int64_t n_hi,
                  StagedX& staged_x) {
  using Elem = typename Ops::Elem;
  const Matrix& mat = p.mats[e];
  const Elem* x = static_cast<const Elem*>(p.x);
  const int64_t row_bytes = quant_x_row_bytes(p.k);
  char* staged = static_cast<char*>(buffer);
  const void* first = x + s0 * p.x_stride;
  if (mat.format() == kFormatInt8) {
    const int64_t chunks = (p.k + kInt8Chunk - 1) / kInt8Chunk;
    Int8X* xs = staged_x.int8;
    for (int64_t s = s0; s < s1 && !staged_x.holds(first, s1 - s0, 8); ++s) {
      auto* q = reinterpret_cast<int8_t*>(staged + (s - s0) * row_bytes);
      auto* scales = reinterpret_cast<float*>(q + chunks * kInt8Chunk);
      float offset = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        int32_t sum;
        scales[c] = quantize_block<Ops>(x + s * p.x_stride + c * kInt8Chunk, std::min(kInt8Chunk, p.k - c * kInt8Chunk),
                                        q + c * kInt8Chunk, &sum);
        offset += scales[c] * static_cast<float>(sum);
      }
      xs[s - s0] = {q, scales, 128.0f * offset};
    }
    staged_x.rows = first, staged_x.count = s1 - s0, staged_x.layout = 8;
    const auto* q = static_cast<const int8_t*>(mat.w);
    const auto* scales = static_cast<const float*>(mat.scales);
    tiles_against(p, e, p.k, s0, s1, n_lo, n_hi, [&](auto mc, int64_t s, int64_t n, int64_t rt, float* r) {
      constexpr int M = decltype(mc)::value;
      with_tile_rows(rt, [&](auto rc) {
        dot_tile_int8<M, decltype(rc)::value>(q + tile_offset(n, p.k), scales + n, xs + (s - s0), p.k, r);
      });
    });
    return;
  }
  const int64_t group = mat.group_size(), groups = p.k / group;
  const int lane = lane_group(static_cast<int>(group));
  const Int4X* xs = staged_x.int4;
  for (int64_t s = s0; s < s1 && !staged_x.holds(first, s1 - s0, lane); ++s) {
    auto* q = reinterpret_cast<int8_t*>(staged + (s - s0) * row_bytes);
    auto* scales = reinterpret_cast<float*>(q + int4_x_bytes(p.k));
    float* sums = scales + int4_x_lanes(p.k);
    stage_int4_x<Ops>(x + s * p.x_stride, p.k, lane, q, scales, sums);
    staged_x.int4[s - s0] = {q, scales, sums};
  }
  staged_x.rows = first, staged_x.count = s1 - s0, staged_x.layout = lane;
  const auto* q = static_cast<const uint8_t*>(mat.w);
  const auto* scales = static_cast<const uint16_t*>(mat.scales);
  const auto* mins = static_cast<const uint16_t*>(mat.mins);
  const auto run = [&](auto gc) {
    constexpr int G = decltype(gc)::value;
    tiles_against(p, e, p.k / 2, s0, s1, n_lo, n_hi, [&](auto mc, int64_t s, int64_t n, int64_t rt, float* r) {
      constexpr int M = decltype(mc)::value;
      with_tile_rows(rt, [&](auto rc) {
        dot_tile_int4<G, M, decltype(rc)::value>(q + tile_offset(n, p.k) / 2, scales + n * groups,
                                                 mins ? mins + n * groups : nullptr, groups, xs + (s - s0), r);
      });
    });
  };
  switch (group) {
    case 32: run(std::integral_constant<int, 32>{}); break;
    case 64: run(std::integral_constant<int, 64>{}); break;
    default: run(std::integral_constant<int, 128>{}); break;
  }
}

// ---- Low-bit weights, prefill path ----

// Row n of an [n_rows, k] int4 matrix (G-value groups) in x's dtype (computed in float32, rounded once).
// Each block's chunks give G/2 vectors whose lane i is a value pair of group i; 16 x 16 transposes turn
// them into 16 consecutive pairs of one group.
template <typename Ops, int G>
void dequantize_int4_row(const Matrix& mat, int64_t n_rows, int64_t k, int64_t n, typename Ops::Elem* dst) {
  constexpr int L = lane_group(G), R = G / L;
  const int64_t groups = k / G, lanes_total = k / L, rt = tile_rows(n, n_rows), r = n % kRowTile;
  const uint8_t* q = static_cast<const uint8_t*>(mat.w) + tile_offset(n, k) / 2;
  const uint16_t* scales = static_cast<const uint16_t*>(mat.scales) + n * groups;
  const uint16_t* mins = mat.mins ? static_cast<const uint16_t*>(mat.mins) + n * groups : nullptr;
  for (int64_t g0 = 0; g0 < lanes_total; g0 += kBlockGroups) {
    const int64_t ng = std::min(kBlockGroups, lanes_total - g0);
    const __mmask32 words = lanes32(2 * ng);
    __m512i pairs[L / 2];  // pairs[u] lane i: values 2u, 2u + 1 of lane group g0 + i
    for (int c = 0; c < L / 8; ++c) {
      const __m512i w = load_int4_chunk(q + (c * rt + r) * 4 * ng, words);
      for (int j = 0; j < 4; ++j)
        pairs[4 * c + j] = _mm512_and_si512(_mm512_srli_epi16(w, 4 * j), _mm512_set1_epi16(0x000F));
    }
    q += rt * ng * L / 2;
    for (int u0 = 0; u0 < L / 2; u0 += kLanes) {
      __m512i values[kLanes];  // values[i]: 32 values of lane group g0 + i from value 2 u0, as 16-bit words
      transpose16(pairs + u0, values);
      for (int64_t i = 0; i < ng; ++i) {
        const int64_t g = (g0 + i) / R;
        const float sc = _cvtsh_ss(scales[g]);
        const __m512 s = _mm512_set1_ps(sc);
        const __m512 low = _mm512_set1_ps(mins ? _cvtsh_ss(mins[g]) : -8.0f * sc);
        for (int h = 0; h < 2; ++h) {
          const __m512i v = _mm512_cvtepu16_epi32(h ? _mm512_extracti64x4_epi64(values[i], 1)
                                                     : _mm512_castsi512_si256(values[i]));
          Ops::store16(dst + (g0 + i) * L + 2 * u0 + 16 * h, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, low));
        }
      }
    }
  }
}

// Rows [n0, n0 + nw) of an [n_rows, k] low-bit matrix in x's dtype, k values apart in dst (computed in
// float32, rounded once).
template <typename Ops>
void dequantize_rows(const Matrix& mat, int64_t n_rows, int64_t k, int64_t n0, int nw, typename Ops::Elem* dst) {
  for (int j = 0; j < nw; ++j) {
    const int64_t n = n0 + j;
    auto* d = dst + j * k;
    if (mat.format() == kFormatInt8) {  // chunk c of row n: after c chunks of the tile's rt rows, r rows in
      const int64_t rt = tile_rows(n, n_rows), r = n % kRowTile;
      const int8_t* tile = static_cast<const int8_t*>(mat.w) + tile_offset(n, k);
      const __m512 s = _mm512_set1_ps(static_cast<const float*>(mat.scales)[n]);
      for (int64_t c0 = 0; c0 < k; c0 += kInt8Chunk) {
        const int64_t len = std::min(kInt8Chunk, k - c0);
        const int8_t* q = tile + rt * c0 + r * len;
        for (int64_t kk = 0; kk < len; kk += 16) {
          const __mmask16 mask = lanes(std::min<int64_t>(16, len - kk));
          const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + kk)));
          Ops::store_tail(d + c0 + kk, _mm512_mul_ps(v, s), mask);
        }
      }
      continue;
    }
    switch (mat.group_size()) {
      case 32: dequantize_int4_row<Ops, 32>(mat, n_rows, k, n, d); break;
      case 64: dequantize_int4_row<Ops, 64>(mat, n_rows, k, n, d); break;
      default: dequantize_int4_row<Ops, 128>(mat, n_rows, k, n, d); break;
    }
  }
}

// Up to kPanelRows x rows of one group, original rows [s, s + rows): the first vec_rows (a multiple of
// kLanes) packed for the register tiles, the rest (fewer than kLanes) staged for dot products.
template <typename Elem>
struct Panel {
  const uint32_t* packed;
  const Elem* staged;
  int64_t s;
  int64_t rows;
  int64_t vec_rows;
};

// Results of a panel against nw <= kTileRows weight rows: r[j * kPanelRows + i] for panel row i.
using TileResult = float[kTileRows * kPanelRows];

// r[j * kPanelRows + i] = dot(x row i, w row j) for `count` x rows `stride` apart and nw weight rows.
template <typename Ops>
void dot_rows_into(const typename Ops::Elem* w, int nw, int64_t k, const typename Ops::Elem* x, int64_t stride,
                   int64_t count, float* r) {
  for_row_blocks(0, count, [&](auto mc, int64_t i) {
    constexpr int M = decltype(mc)::value;
    for (int j = 0; j < nw; ++j) {
      float d[M];
      dot_rows<Ops, M>(w + j * k, x + i * stride, stride, k, d);
      for (int c = 0; c < M; ++c) r[j * kPanelRows + i + c] = d[c];
    }
  });
}

// A panel against nw weight rows starting at w (k values apart). Full tiles run the packed rows through
// the register tiles (prefetching `next`, the following tile's rows, if set) and the staged rows through
// dot products; a partial tile (nw < kTileRows, at most once per thread) takes dot products throughout.
template <typename Ops>
void panel_tile(const Problem& p, const Panel<typename Ops::Elem>& panel, const typename Ops::Elem* w, int nw,
                const typename Ops::Elem* next, float* r) {
  using Elem = typename Ops::Elem;
  const int64_t ps = panel_stride<Elem>(p.k);
  if (nw == kTileRows) {
    switch (panel.vec_rows / kLanes) {
      case 0: break;
      case 1: unit_tile<Ops, 1>(panel.packed, w, p.k, next, r); break;
      case 2: unit_tile<Ops, 2>(panel.packed, w, p.k, next, r); break;
      case 3: unit_tile<Ops, 3>(panel.packed, w, p.k, next, r); break;
      default: unit_tile<Ops, 4>(panel.packed, w, p.k, next, r); break;
    }
  } else {
    const Elem* x = static_cast<const Elem*>(p.x) + panel.s * p.x_stride;
    dot_rows_into<Ops>(w, nw, p.k, x, p.x_stride, panel.vec_rows, r);
  }
  dot_rows_into<Ops>(w, nw, p.k, panel.staged, ps, panel.rows - panel.vec_rows, r + panel.vec_rows);
}

// out[s, n0 + j] = r + bias, or out[index[s], n0 + j] += weight[s] * (r + bias), for a panel's rows.
template <typename Ops>
void store_tile(const Problem& p, int64_t e, const Panel<typename Ops::Elem>& panel, int64_t n0, int nw,
                const float* r) {
  const float* bias = p.bias ? p.bias + e * p.n + n0 : nullptr;
  for (int64_t i = 0; i < panel.rows; ++i) {
    const int64_t s = panel.s + i;
    float* dst = p.out + (p.scatter_index ? p.scatter_index[s] : s) * p.out_stride + n0;
    const float weight = p.scatter_index ? p.scatter_weight[s] : 0.0f;
    for (int j = 0; j < nw; ++j) {
      const float v = r[j * kPanelRows + i] + (bias ? bias[j] : 0.0f);
      if (p.scatter_index)
        dst[j] += weight * v;
      else
        dst[j] = v;
    }
  }
}

// exp(x) for 16 floats: 2^n * exp(f), n = round(x / ln 2), f = x - n ln 2 in two parts (Cody-Waite),
// exp(f) by its degree-6 Taylor polynomial (relative error < 2e-7 on |f| <= ln(2) / 2).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 poly = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(poly, n);  // exact scaling by 2^n, saturating to 0 or inf
}

inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// The gated activation of 16 gate and up values (see moerun/kernels/activation.py).
inline __m512 glu16(const Problem& p, __m512 gate, __m512 up) {
  switch (p.glu) {
    case kSilu:
      return _mm512_mul_ps(_mm512_mul_ps(gate, sigmoid16(gate)), up);
    case kGeluTanh: {
      // 0.5 g (1 + tanh(z)) = g * sigmoid(2 z), z = sqrt(2 / pi) (g + 0.044715 g^3)
      const __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(gate, gate), gate);
      const __m512 z = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, gate));
      return _mm512_mul_ps(_mm512_mul_ps(gate, sigmoid16(_mm512_add_ps(z, z))), up);
    }
    default: {  // kSwigluClamped
      const __m512 limit = _mm512_set1_ps(p.glu_limit);
      const __m512 g = _mm512_min_ps(gate, limit);
      const __m512 u = _mm512_max_ps(_mm512_min_ps(up, limit), _mm512_sub_ps(_mm512_setzero_ps(), limit));
      const __m512 gated = _mm512_mul_ps(g, sigmoid16(_mm512_mul_ps(g, _mm512_set1_ps(p.glu_alpha))));
      return _mm512_mul_ps(_mm512_add_ps(u, _mm512_set1_ps(1.0f)), gated);
    }
  }
}

// act[s, i0 + j] = glu(gate + gate bias, up + up bias) for a panel's rows, from the gate rows' results
// rg and the up rows' results ru.
template <typename Ops>
void glu_tile(const Problem& p, int64_t e, const Panel<typename Ops::Elem>& panel, int64_t i0, int nw, const float* rg,
              const float* ru) {
  using Elem = typename Ops::Elem;
  const int64_t half = p.n / 2;
  alignas(64) Elem a[kTileRows][kPanelRows];
  for (int j = 0; j < nw; ++j) {
    const __m512 gate_bias = _mm512_set1_ps(p.bias ? p.bias[e * p.n + i0 + j] : 0.0f);
    const __m512 up_bias = _mm512_set1_ps(p.bias ? p.bias[e * p.n + half + i0 + j] : 0.0f);
    for (int64_t i = 0; i < panel.rows; i += kLanes) {
      const __m512 gate = _mm512_add_ps(_mm512_loadu_ps(rg + j * kPanelRows + i), gate_bias);
      const __m512 up = _mm512_add_ps(_mm512_loadu_ps(ru + j * kPanelRows + i), up_bias);
      Ops::store16(a[j] + i, glu16(p, gate, up));
    }
  }
  auto* act = static_cast<Elem*>(p.act);
  for (int64_t i = 0; i < panel.rows; ++i)
    for (int j = 0; j < nw; ++j) act[(panel.s + i) * p.act_stride + i0 + j] = a[j][i];
}

// Packs and stages rows [s0, s1) (at most kChunkRows) of a group into panels in buffer; returns how
// many. Whole vectors of kLanes rows are packed, the last rows (fewer than kLanes) staged: they take
// dot products against the same weight tile instead of padding a vector with zeros (padding cost
// ~15% at 64 +- 8 rows per group).
template <typename Ops>
int64_t prepare_panels(const Problem& p, int64_t s0, int64_t s1, void* buffer, Panel<typename Ops::Elem>* panels) {
  using Elem = typename Ops::Elem;
  auto* packed = static_cast<uint32_t*>(buffer);
  const int64_t panel_units = units_of<Ops>(p.k) * kPanelRows;
  const int64_t s_vec = s0 + (s1 - s0) / kLanes * kLanes;
  int64_t count = 0;
  for (int64_t s = s0; s < s_vec; s += kPanelRows, ++count) {
    const int64_t s_end = std::min(s + kPanelRows, s_vec);
    pack_units<Ops>(p, s, s_end, packed + count * panel_units);
    panels[count] = {packed + count * panel_units, nullptr, s, s_end - s, s_end - s};
  }
  Elem* tail = reinterpret_cast<Elem*>(packed + count * panel_units);
  stage_rows<Ops>(p, s_vec, s1, tail);
  if (s_vec < s1) {
    if (count > 0 && panels[count - 1].rows + (s1 - s_vec) <= kPanelRows)
      panels[count - 1].rows += s1 - s_vec;
    else
      panels[count++] = {nullptr, nullptr, s_vec, s1 - s_vec, 0};
    panels[count - 1].staged = tail;
  }
  return count;
}

// Most panels a chunk of kChunkRows rows needs: full panels plus one for the staged rows.
constexpr int64_t kMaxPanels = kChunkRows / kPanelRows + 1;

// Prefill path for rows [s0, s1) (at most kChunkRows) of a group against weight rows [n_lo, n_hi),
// kTileRows at a time; every panel passes a tile of weight rows while it is in L1, so each weight is
// read from memory once per chunk. With a fused activation [n_lo, n_hi) are intermediate rows i, each
// computed against gate row i and up row n/2 + i. Low-bit weight rows are dequantized a tile at a time
// into scratch (2 * kTileRows rows of k values), once for all the chunk's panels.
template <typename Ops>
void tile_rows(const Problem& p, int64_t e, int64_t s0, int64_t s1, int64_t n_lo, int64_t n_hi, void* buffer,
               typename Ops::Elem* scratch) {
  using Elem = typename Ops::Elem;
  Panel<Elem> panels[kMaxPanels];
  const int64_t count = prepare_panels<Ops>(p, s0, s1, buffer, panels);
  const Matrix& mat = p.mats[e];
  const Elem* w = mat.quantized() ? nullptr : static_cast<const Elem*>(mat.w);
  const int64_t up = p.glu == kNoGlu ? 0 : p.n / 2;  // offset of the up rows
  alignas(64) TileResult r, ru;
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += kTileRows) {
    const int nw = static_cast<int>(std::min<int64_t>(kTileRows, n_hi - n0));
    const Elem *w_tile, *w_up_tile;
    if (w) {
      w_tile = w + n0 * p.k;
      w_up_tile = w + (up + n0) * p.k;
    } else {
      dequantize_rows<Ops>(mat, p.n, p.k, n0, nw, scratch);
      w_tile = scratch;
      w_up_tile = scratch + kTileRows * p.k;
      if (p.glu != kNoGlu) dequantize_rows<Ops>(mat, p.n, p.k, up + n0, nw, scratch + kTileRows * p.k);
    }
    // The first panel pulls in the next tile's weight rows, which the hardware prefetchers, following
    // 6 rows 4 bytes a step, bring too late. (Dequantization reads low-bit rows as one sequential stream.)
    const bool has_next = w && n0 + 2 * kTileRows <= n_hi;
    for (int64_t c = 0; c < count; ++c) {
      const bool first = c == 0 && has_next;
      panel_tile<Ops>(p, panels[c], w_tile, nw, first ? w_tile + kTileRows * p.k : nullptr, r);
      if (p.glu == kNoGlu) {
        store_tile<Ops>(p, e, panels[c], n0, nw, r);
      } else {
        panel_tile<Ops>(p, panels[c], w_up_tile, nw, first ? w_up_tile + kTileRows * p.k : nullptr, ru);
        glu_tile<Ops>(p, e, panels[c], n0, nw, r, ru);
      }
    }
  }
}

// All groups against this thread's weight rows [n_lo, n_hi) (intermediate rows with a fused
// activation); buffer is this thread's staging buffer (see buffer_bytes). Decode-sized groups stream
// weight rows, unless the activation is fused, which needs the tiles.
template <typename Ops>
void run_slice(const Problem& p, int64_t n_lo, int64_t n_hi, char* buffer, int64_t scratch_offset) {
  auto* scratch = reinterpret_cast<typename Ops::Elem*>(buffer + scratch_offset);
  StagedX staged;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t e = p.experts[g];
    const int64_t end = p.starts[g] + p.counts[g];
    if (p.mats[e].quantized() && p.counts[g] < kTileMinRows && p.glu == kNoGlu) {
      stream_quant<Ops>(p, e, buffer, p.starts[g], end, n_lo, n_hi, staged);
      continue;
    }
    staged.rows = nullptr;  // the paths below overwrite the buffer
    if (p.counts[g] >= kTileMinRows || p.glu != kNoGlu) {
      for (int64_t s0 = p.starts[g]; s0 < end; s0 += kChunkRows)
        tile_rows<Ops>(p, e, s0, std::min(s0 + kChunkRows, end), n_lo, n_hi, buffer, scratch);
    } else {
      auto* panel = reinterpret_cast<typename Ops::Elem*>(buffer);
      stage_rows<Ops>(p, p.starts[g], end, panel);
      stream_staged<Ops>(p, e, panel, p.starts[g], end, n_lo, n_hi);
    }
  }
}

// Bytes of the part of one thread's buffer before the dequantization scratch: staged x rows for the
// decode path (wider for low-bit weights); packed panels plus the staged rows for the tiles.
template <typename Ops>
int64_t staging_bytes(int64_t k, int64_t max_group_rows, bool tiles) {
  using Elem = typename Ops::Elem;
  const int64_t row_bytes = panel_stride<Elem>(k) * sizeof(Elem);
  const int64_t decode_rows = std::min(kPanelRows, max_group_rows);
  const int64_t staged = std::max(decode_rows * row_bytes, quant_staging_bytes(k, decode_rows));
  const int64_t panels = (std::min(kChunkRows, max_group_rows) + kPanelRows - 1) / kPanelRows;
  const int64_t packed = panels * units_of<Ops>(k) * kPanelRows * 4 + (kLanes - 1) * row_bytes;
  return (std::max(staged, tiles ? packed : 0) + 63) / 64 * 64;
}

// Returns false when the staging buffers cannot be allocated.
template <typename Ops>
bool run(const Problem& p, int64_t rows, int64_t max_group_rows, bool quantized, int nthreads) {
  const int64_t outputs = p.glu == kNoGlu ? p.n : p.n / 2;  // what the threads split
  const int64_t work = rows * p.n * p.k * static_cast<int64_t>(sizeof(typename Ops::Elem));
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({nthreads, outputs, work / kMinBytesPerThread}));
  const bool tiles = p.glu != kNoGlu || max_group_rows >= kTileMinRows;
  const int64_t scratch_offset = staging_bytes<Ops>(p.k, max_group_rows, tiles);
  const int64_t scratch = tiles && quantized ? 2 * kTileRows * p.k * sizeof(typename Ops::Elem) : 0;
  const int64_t bytes = (scratch_offset + scratch + 63) / 64 * 64;
  std::unique_ptr<char, decltype(&std::free)> buffers(static_cast<char*>(std::aligned_alloc(64, nt * bytes)),
                                                      &std::free);
  if (!buffers) return false;
  if (nt == 1) {
    run_slice<Ops>(p, 0, outputs, buffers.get(), scratch_offset);
    return true;
  }
  // The decode path reads low-bit weights a whole int4 row tile at a time, so slices start at one.
  const int64_t align = quantized && p.glu == kNoGlu ? kRowTile : 1;
  const auto bound = [&](int64_t t) { return t == nt ? outputs : outputs * t / nt / align * align; };
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int64_t t = 0; t < nt; ++t) run_slice<Ops>(p, bound(t), bound(t + 1), buffers.get() + t * bytes, scratch_offset);
  return true;
}

// act[s, i] = glu(h[s, i], h[s, half + i]) in Elem for rows s of float32 gate/up results (p.glu set): the
// activation of the unfused gate/up projection, with the fused path's arithmetic.
template <typename Ops>
void glu_rows(const Problem& p, const float* h, int64_t rows, int64_t half, int64_t h_stride, typename Ops::Elem* act,
              int64_t act_stride) {
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t i = 0; i < half; i += kLanes) {
      const __mmask16 mask = lanes(std::min<int64_t>(kLanes, half - i));
      const __m512 gate = _mm512_maskz_loadu_ps(mask, h + s * h_stride + i);
      const __m512 up = _mm512_maskz_loadu_ps(mask, h + s * h_stride + half + i);
      Ops::store_tail(act + s * act_stride + i, glu16(p, gate, up), mask);
    }
}

// ---- One token through a whole MoE layer (decode): router, softmax top-k, both projections, combine ----

// The softmax_topk routing of one token (moerun/routing.py: route_topk_softmax) from its float32 router
// logits: ids[k] and weights[k], highest first. The experts are chosen exactly as torch.topk chooses them
// on the CPU (a selection, then a sort of the first k - 1, both comparing values only), so that ties
// between equal logits, common in bfloat16, resolve as they do in transformers.
inline void softmax_topk(const float* logits, int64_t num_experts, int top_k, bool renormalize, float scaling,
                         int64_t* ids, float* weights) {
  const float top = *std::max_element(logits, logits + num_experts);
  std::vector<std::pair<float, int64_t>> probs(num_experts);
  float sum = 0.0f;
  for (int64_t e = 0; e < num_experts; ++e) {
    probs[e] = {std::exp(logits[e] - top), e};
    sum += probs[e].first;
  }
  for (auto& q : probs) q.first /= sum;
  const auto higher = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first;
  };
  if (static_cast<int64_t>(top_k) * 64 <= num_experts) {
    std::partial_sort(probs.begin(), probs.begin() + top_k, probs.end(), higher);
  } else {
    std::nth_element(probs.begin(), probs.begin() + top_k - 1, probs.end(), higher);
    std::sort(probs.begin(), probs.begin() + top_k - 1, higher);
  }
  float chosen = 0.0f;
  for (int j = 0; j < top_k; ++j) chosen += probs[j].first;
  for (int j = 0; j < top_k; ++j) {
    ids[j] = probs[j].second;
    weights[j] = renormalize ? probs[j].first / chosen : probs[j].first;
    if (scaling != 1.0f) weights[j] *= scaling;
  }
}

// A finite float rounded to the nearest bfloat16 (ties to even), as a float.
inline float round_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &bits, sizeof(bits));
  return v;
}

// Router logits of one token x[k], rounded to Elem as a torch linear layer in that dtype returns them.
// Returns kBadLogits if one is not finite (route() refuses those).
template <typename Ops>
int router_logits(const typename Ops::Elem* x, int64_t k, const typename Ops::Elem* router, int64_t num_experts,
                   float* logits, int nthreads) {
  const Matrix table{router, nullptr, nullptr, std::is_same_v<Ops, Bf16> ? kFormatBf16 : kFormatF32};
  const int64_t zero = 0, one = 1;
  Problem p{x, k, &table, num_experts, k, &zero, &zero, &one, 1, nullptr, logits, num_experts};
  if (!run<Ops>(p, 1, 1, false, nthreads)) return kOutOfMemory;
  for (int64_t e = 0; e < num_experts; ++e) {
    if (!std::isfinite(logits[e])) return kBadLogits;
    if constexpr (std::is_same_v<Ops, Bf16>) logits[e] = round_to_bf16(logits[e]);
  }
  return kOk;
}

// The routed experts of one token x[k] chosen by route (ids, weights: top_k of them, any order): gate/up
// projection (1 row per expert, all reading x), activation, down projection scattered with the weights, in
// the order of ascending expert ids, as moerun.kernels.experts.experts_native computes a one-token plan.
// out: k values of Elem.
template <typename Ops>
bool routed_experts(const typename Ops::Elem* x, int64_t k, const int64_t* ids, const float* weights, int top_k,
                    const Matrix* gate_up, int64_t two_i, const float* gate_up_bias, const Matrix* down,
                    const float* down_bias, bool quantized, int glu, float alpha, float limit,
                    typename Ops::Elem* out, int nthreads) {
  using Elem = typename Ops::Elem;
  const int64_t half = two_i / 2;
  std::vector<int64_t> order(top_k), experts(top_k), starts(top_k), counts(top_k, 1), token(top_k, 0);
  for (int j = 0; j < top_k; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::vector<float> slot_weights(top_k);
  for (int j = 0; j < top_k; ++j) {
    experts[j] = ids[order[j]];
    starts[j] = j;
    slot_weights[j] = weights[order[j]];
  }
  std::vector<float> h(top_k * two_i), y(k, 0.0f);
  std::vector<Elem> act(top_k * half);
  // x_stride 0: every expert's row reads the one token.
  Problem up{x, 0, gate_up, two_i, k, experts.data(), starts.data(), counts.data(), top_k, gate_up_bias,
             h.data(), two_i};
  if (!run<Ops>(up, top_k, 1, quantized, nthreads)) return false;
  Problem act_fn{};
  act_fn.glu = glu;
  act_fn.glu_alpha = alpha;
  act_fn.glu_limit = limit;
  glu_rows<Ops>(act_fn, h.data(), top_k, half, two_i, act.data(), half);
  Problem dn{act.data(), half, down, k, half, experts.data(), starts.data(), counts.data(), top_k, down_bias,
             y.data(), k};
  dn.scatter_index = token.data();
  dn.scatter_weight = slot_weights.data();
  if (!run<Ops>(dn, top_k, 1, quantized, nthreads)) return false;
  for (int64_t i = 0; i < k; i += kLanes) {
    const __mmask16 mask = lanes(std::min<int64_t>(kLanes, k - i));
    Ops::store_tail(out + i, _mm512_maskz_loadu_ps(mask, y.data() + i), mask);
  }
  return true;
}

// ---- Decode glue of a llama-like layer: RMS norm, and q/k/v of one position into the KV cache ----

// Values of a bfloat16 or float32 array as float32 (dtype code 1 or 0).
inline float value_at(const void* v, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(v)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(v)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store_value(void* v, int dtype, int64_t i, float f) {
  if (dtype == 0) {
    static_cast<float*>(v)[i] = f;
  } else {
    const float rounded = round_to_bf16(f);
    uint32_t bits;
    std::memcpy(&bits, &rounded, sizeof(bits));
    static_cast<uint16_t*>(v)[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// x [n] float32 scaled in place by rsqrt(mean(x^2) + eps) (rounded to bf16 if round_bf16) and the weight
// (w_dtype).
inline void rms_norm_inplace(float* x, int64_t n, const void* w, int w_dtype, float eps, bool round_bf16 = false) {
  float squares = 0.0f;
  for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
  const float r = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float normed = x[i] * r;
    x[i] = value_at(w, w_dtype, i) * (round_bf16 ? round_to_bf16(normed) : normed);
  }
}

// RoPE of heads x [heads, d] in place: x cos + rotate_half(x) signed_sin (signed_sin: sin, first half negated).
inline void rope_inplace(float* x, int64_t heads, int64_t d, const float* cos, const float* signed_sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* head = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = head[i], b = head[half + i];
      head[i] = a * cos[i] + b * signed_sin[i];
      head[half + i] = b * cos[half + i] + a * signed_sin[half + i];
    }
  }
}

}  // namespace

extern "C" {


// Checks every expert's matrix descriptor against x's dtype and k; sets *quantized if any is low-bit.
static int check_matrices(const Matrix* mats, int64_t num_experts, int64_t k, int dtype, bool* quantized) {
  for (int64_t e = 0; e < num_experts; ++e) {
    const Matrix& m = mats[e];
    const int64_t g = m.group_size();
    if (!m.w) return kBadFormat;
    switch (m.format()) {
      case kFormatF32:
      case kFormatBf16:
        if (m.format() != dtype) return kBadFormat;  // plain weights share x's dtype code
        break;
      case kFormatInt8:
        if (!m.scales) return kBadFormat;
        *quantized = true;
        break;
      case kFormatInt4:
        if (!m.scales || (g != 32 && g != 64 && g != 128) || k % 64 || k % g)
          return kBadFormat;
        *quantized = true;
        break;
      default:
        return kBadFormat;
    }
  }
  return kOk;
}

// Checks every group against x's rows and the expert count; totals the rows. Returns a status code.
static int check_groups(int64_t x_rows, int64_t num_experts, const int64_t* group_experts,
                        const int64_t* group_starts, const int64_t* group_counts, int64_t groups, int64_t* rows,
                        int64_t* max_group_rows) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = group_starts[g], count = group_counts[g];
    if (group_experts[g] < 0 || group_experts[g] >= num_experts) return kBadExpert;
    if (start < 0 || count < 0 || count > x_rows - start) return kBadGroupRows;
    *rows += count;
    *max_group_rows = std::max(*max_group_rows, count);
  }
  return kOk;
}

// dtype: 0 = float32, 1 = bfloat16 (x). mats: num_experts Matrix descriptors ([E, 4] int64), each an
// [n, k] matrix. Strides are in elements. x has x_rows rows, out has out_rows.
// scatter_index / scatter_weight are both null (out[s] = r) or both set (out[index[s]] += weight[s] * r).
// Every index that will be used is checked before anything is written, so a bad argument returns an
// error, never an out-of-bounds access.
int moerun_grouped_gemv(const void* x, int64_t x_rows, int64_t x_stride, const int64_t* mats, int64_t num_experts,
                        int64_t n, int64_t k, const int64_t* group_experts, const int64_t* group_starts,
                        const int64_t* group_counts, int64_t groups, const float* bias, float* out, int64_t out_rows,
                        int64_t out_stride, const int64_t* scatter_index, const float* scatter_weight, int dtype,
                        int nthreads) {
  if (!known_dtype(dtype)) return kBadDtype;
  // Without scatter, row s of x writes row s of out.
  if (!scatter_index && out_rows < x_rows) return kBadOutRows;
  int64_t rows = 0, max_group_rows = 0;
  const int status = check_groups(x_rows, num_experts, group_experts, group_starts, group_counts, groups, &rows,
                                  &max_group_rows);
  if (status != kOk) return status;
  if (scatter_index)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t s = group_starts[g]; s < group_starts[g] + group_counts[g]; ++s)
        if (scatter_index[s] < 0 || scatter_index[s] >= out_rows) return kBadScatterIndex;
  bool quantized = false;
  const Matrix* matrices = reinterpret_cast<const Matrix*>(mats);
  const int format_status = check_matrices(matrices, num_experts, k, dtype, &quantized);
  if (format_status != kOk) return format_status;
  if (rows == 0 || n <= 0) return kOk;
  Problem p{x, x_stride, matrices, n, k, group_experts, group_starts, group_counts, groups, bias, out, out_stride};
  p.scatter_index = scatter_index;
  p.scatter_weight = scatter_weight;
  const bool ok = dtype == 1 ? run<Bf16>(p, rows, max_group_rows, quantized, nthreads)
                             : run<F32>(p, rows, max_group_rows, quantized, nthreads);
  return ok ? kOk : kOutOfMemory;
}

// The gate/up projection fused with the gated activation: each matrix is [2I, K], gate rows then up rows;
// act[s, i] = glu(x[s] . w[e, i] + bias[e, i], x[s] . w[e, I + i] + bias[e, I + i]) for each group's
// rows s, written in x's dtype to act (act_stride elements apart, at least x_rows rows). glu is a Glu
// code; alpha and limit parameterise kSwigluClamped.
int moerun_grouped_glu(const void* x, int64_t x_rows, int64_t x_stride, const int64_t* mats, int64_t num_experts,
                       int64_t two_i, int64_t k, const int64_t* group_experts, const int64_t* group_starts,
                       const int64_t* group_counts, int64_t groups, const float* bias, int glu, float alpha,
                       float limit, void* act, int64_t act_stride, int dtype, int nthreads) {
  if (!known_dtype(dtype)) return kBadDtype;
  if (!fusable_glu(glu)) return kBadActivation;
  if (two_i % 2) return kBadShape;
  int64_t rows = 0, max_group_rows = 0;
  const int status = check_groups(x_rows, num_experts, group_experts, group_starts, group_counts, groups, &rows,
                                  &max_group_rows);
  if (status != kOk) return status;
  bool quantized = false;
  const Matrix* matrices = reinterpret_cast<const Matrix*>(mats);
  const int format_status = check_matrices(matrices, num_experts, k, dtype, &quantized);
  if (format_status != kOk) return format_status;
  if (rows == 0 || two_i == 0) return kOk;
  Problem p{x, x_stride, matrices, two_i, k, group_experts, group_starts, group_counts, groups, bias, nullptr, 0};
  p.glu = glu;
  p.glu_alpha = alpha;
  p.glu_limit = limit;
  p.act = act;
  p.act_stride = act_stride;
  const bool ok = dtype == 1 ? run<Bf16>(p, rows, max_group_rows, quantized, nthreads)
                             : run<F32>(p, rows, max_group_rows, quantized, nthreads);
  return ok ? kOk : kOutOfMemory;
}

// Gated activation of float32 gate/up rows h [rows, 2I] (h_stride apart): act[s, i] = glu(h[s, i], h[s, I + i])
// in the dtype code's type, act_stride apart; the arithmetic of moerun_grouped_glu.
int moerun_glu(const float* h, int64_t rows, int64_t two_i, int64_t h_stride, int glu, float alpha, float limit,
               void* act, int64_t act_stride, int dtype) {
  if (!known_dtype(dtype)) return kBadDtype;
  if (!fusable_glu(glu)) return kBadActivation;
  if (two_i % 2) return kBadShape;
  Problem p{};
  p.glu = glu;
  p.glu_alpha = alpha;
  p.glu_limit = limit;
  if (dtype == 1)
    glu_rows<Bf16>(p, h, rows, two_i / 2, h_stride, static_cast<uint16_t*>(act), act_stride);
  else
    glu_rows<F32>(p, h, rows, two_i / 2, h_stride, static_cast<float*>(act), act_stride);
  return kOk;
}

// softmax_topk routing of one token x [k] with router weights [num_experts, k] of x's dtype: ids [top_k] and
// weights [top_k], highest first (see softmax_topk).
int moerun_route_token(const void* x, int64_t k, const void* router, int64_t num_experts, int top_k,
                       int renormalize, float scaling, int64_t* ids, float* weights, int dtype, int nthreads) {
  if (!known_dtype(dtype)) return kBadDtype;
  if (top_k < 1 || top_k > num_experts) return kBadShape;
  std::vector<float> logits(num_experts);
  const int status = dtype == 1 ? router_logits<Bf16>(static_cast<const uint16_t*>(x), k,
                                                      static_cast<const uint16_t*>(router), num_experts,
                                                      logits.data(), nthreads)
                                : router_logits<F32>(static_cast<const float*>(x), k, static_cast<const float*>(router),
                                                     num_experts, logits.data(), nthreads);
  if (status != kOk) return status;
  softmax_topk(logits.data(), num_experts, top_k, renormalize != 0, scaling, ids, weights);
  return kOk;
}

// The routed experts of one token x [k] for a given routing (ids, weights [top_k], any order):
// out [k] in x's dtype, exactly as moerun_moe_token computes it after routing.
int moerun_token_experts(const void* x, int64_t k, const int64_t* ids, const float* weights, int top_k,
                         int64_t num_experts, const int64_t* gate_up, int64_t two_i, const float* gate_up_bias,
                         const int64_t* down, const float* down_bias, int glu, float alpha, float limit, void* out,
                         int dtype, int nthreads) {
  if (!known_dtype(dtype)) return kBadDtype;
  if (!fusable_glu(glu)) return kBadActivation;
  if (two_i % 2 || two_i == 0) return kBadShape;
  for (int j = 0; j < top_k; ++j)
    if (ids[j] < 0 || ids[j] >= num_experts) return kBadExpert;
  bool quantized = false;
  const Matrix* up = reinterpret_cast<const Matrix*>(gate_up);
  const Matrix* dn = reinterpret_cast<const Matrix*>(down);
  int status = check_matrices(up, num_experts, k, dtype, &quantized);
  if (status == kOk) status = check_matrices(dn, num_experts, two_i / 2, dtype, &quantized);
  if (status != kOk) return status;
  const bool ok = dtype == 1 ? routed_experts<Bf16>(static_cast<const uint16_t*>(x), k, ids, weights, top_k, up, two_i,
                                                    gate_up_bias, dn, down_bias, quantized, glu, alpha, limit,
                                                    static_cast<uint16_t*>(out), nthreads)
                             : routed_experts<F32>(static_cast<const float*>(x), k, ids, weights, top_k, up, two_i,
                                                   gate_up_bias, dn, down_bias, quantized, glu, alpha, limit,
                                                   static_cast<float*>(out), nthreads);
  return ok ? kOk : kOutOfMemory;
}

// One token x [k] through a whole softmax_topk MoE layer's routed experts, as moerun_route_token followed by
// experts_native on the one-token plan: out [k] in x's dtype; ids and weights [top_k] receive the routing.
// gate_up: num_experts [2I, k] matrices (gate rows, then up rows), down: [k, I]; biases float32 or null.
int moerun_moe_token(const void* x, int64_t k, const void* router, int64_t num_experts, int top_k, int renormalize,
                     float scaling, const int64_t* gate_up, int64_t two_i, const float* gate_up_bias,
                     const int64_t* down, const float* down_bias, int glu, float alpha, float limit, void* out,
                     int64_t* ids, float* weights, int dtype, int nthreads) {
  const int status = moerun_route_token(x, k, router, num_experts, top_k, renormalize, scaling, ids, weights, dtype,
                                        nthreads);
  if (status != kOk) return status;
  return moerun_token_experts(x, k, ids, weights, top_k, num_experts, gate_up, two_i, gate_up_bias, down, down_bias,
                              glu, alpha, limit, out, dtype, nthreads);
}

// transformers' RMSNorm of rows of x: out = weight * round_x(x * rsqrt(mean(x^2) + eps)), computed in float32
// (round_x: to x's dtype), stored in out's dtype. Dtype codes: 0 float32, 1 bfloat16.
int moerun_rms_norm(const void* x, int64_t rows, int64_t n, int64_t x_stride, int x_dtype, const void* weight,
                    int w_dtype, float eps, void* out, int64_t out_stride, int out_dtype) {
  if (!known_dtype(x_dtype) || !known_dtype(w_dtype) || !known_dtype(out_dtype)) return kBadDtype;
  std::vector<float> row(n);
  for (int64_t s = 0; s < rows; ++s) {
    for (int64_t i = 0; i < n; ++i) row[i] = value_at(x, x_dtype, s * x_stride + i);
    rms_norm_inplace(row.data(), n, weight, w_dtype, eps, x_dtype == 1);
    for (int64_t i = 0; i < n; ++i) store_value(out, out_dtype, s * out_stride + i, row[i]);
  }
  return kOk;
}

// One decode position's attention inputs from its float32 q|k|v projections qkv [(hq + 2 hkv) d], which are
// modified in place: q and k RMS-normed (norm 1: over all heads, weights [hq d] and [hkv d]; 2: per head,
// weights [d]; 0: none), q, k and v clamped to +-clip (clip > 0), RoPE on q and k (cos, signed_sin [d]); then
// q in the cache dtype to q_out [hq, d], k to keys + h * key_stride and v to values + h * value_stride +
// i * value_step (the position's key row and value column of each kv head). w_dtype: the norm weights'.
int moerun_attention_inputs(float* qkv, int64_t hq, int64_t hkv, int64_t d, int norm, const void* q_norm,
                            const void* k_norm, int w_dtype, float eps, float clip, const float* cos,
                            const float* signed_sin, void* q_out, void* keys, int64_t key_stride, void* values,
                            int64_t value_stride, int64_t value_step, int dtype) {
  if (!known_dtype(dtype) || !known_dtype(w_dtype)) return kBadDtype;
  if (d % 2 || norm < 0 || norm > 2) return kBadShape;
  float* q = qkv;
  float* k = qkv + hq * d;
  float* v = k + hkv * d;
  if (norm == 1) {
    rms_norm_inplace(q, hq * d, q_norm, w_dtype, eps);
    rms_norm_inplace(k, hkv * d, k_norm, w_dtype, eps);
  } else if (norm == 2) {
    for (int64_t h = 0; h < hq; ++h) rms_norm_inplace(q + h * d, d, q_norm, w_dtype, eps);
    for (int64_t h = 0; h < hkv; ++h) rms_norm_inplace(k + h * d, d, k_norm, w_dtype, eps);
  }
  if (clip > 0.0f)
    for (int64_t i = 0; i < (hq + 2 * hkv) * d; ++i) qkv[i] = std::min(std::max(qkv[i], -clip), clip);
  rope_inplace(q, hq, d, cos, signed_sin);
  rope_inplace(k, hkv, d, cos, signed_sin);
  for (int64_t i = 0; i < hq * d; ++i) store_value(q_out, dtype, i, q[i]);
  for (int64_t h = 0; h < hkv; ++h)
    for (int64_t i = 0; i < d; ++i) {
      store_value(keys, dtype, h * key_stride + i, k[h * d + i]);
      store_value(values, dtype, h * value_stride + i * value_step, v[h * d + i]);
    }
  return kOk;
}

// Softmax of rows of float32 scores times scale: out[s] = softmax(scale * scores[s, :n]), in the dtype code's
// type (rounded once), rows scores_stride and out_stride elements apart.
int moerun_softmax(const float* scores, int64_t rows, int64_t n, int64_t scores_stride, float scale, void* out,
                   int64_t out_stride, int dtype) {
  if (!known_dtype(dtype)) return kBadDtype;
  std::vector<float> e(n);
  for (int64_t s = 0; s < rows; ++s) {
    const float* row = scores + s * scores_stride;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n; i += kLanes)
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, lanes(std::min<int64_t>(kLanes, n - i)), row + i));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top) * scale), k = _mm512_set1_ps(scale);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += kLanes) {
      const __mmask16 mask = lanes(std::min<int64_t>(kLanes, n - i));
      const __m512 v = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, row + i), k, shift));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, v));
      _mm512_mask_storeu_ps(e.data() + i, mask, v);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t i = 0; i < n; i += kLanes) {
      const __mmask16 mask = lanes(std::min<int64_t>(kLanes, n - i));
      const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, e.data() + i), inv);
      if (dtype == 1)
        Bf16::store_tail(static_cast<uint16_t*>(out) + s * out_stride + i, p, mask);
      else
        F32::store_tail(static_cast<float*>(out) + s * out_stride + i, p, mask);
    }
  }
  return kOk;
}

}  // extern "C"
