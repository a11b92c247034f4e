// Grouped matrix-vector products for MoE decode on AVX-512 (BF16 dot products or FP32 FMA).
//
// For each group g (one expert e, rows [start, start+count) of x) and each output row n:
//     r = dot(x[s, :], w[e, n, :]) + bias[e, n]
// then either out[s, n] = r, or (scatter) out[index[s], n] += weight[s] * r.
//
// Decode is bound by reading the expert weights once, so the work is split by output rows n:
// each thread owns one contiguous range of n for every group and streams that slice of each
// selected expert's matrix front to back. Because a thread owns its n range across all groups,
// two groups scattering into the same destination row never race.
//
// Plain C ABI over raw pointers: loaded with ctypes, no torch or Python headers needed.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

constexpr int kRowBlock = 4;  // weight rows per register block
constexpr int kTokBlock = 4;  // x rows per register block

struct Args {
  const void* x;
  int64_t x_stride;
  const void* w;
  int64_t n_rows;
  int64_t k;
  const float* bias;
  float* out;
  int64_t out_stride;
  const int64_t* scatter_index;
  const float* scatter_weight;
};

inline void store(const Args& a, int64_t expert, int64_t s, int64_t n, float r) {
  if (a.bias) r += a.bias[expert * a.n_rows + n];
  if (a.scatter_index) {
    a.out[a.scatter_index[s] * a.out_stride + n] += a.scatter_weight[s] * r;
  } else {
    a.out[s * a.out_stride + n] = r;
  }
}

// BF16: 32 elements per step; vdpbf16ps multiplies bf16 pairs and accumulates in fp32.
template <int R, int M>
inline void block_bf16(const Args& a, int64_t expert, int64_t s0, int64_t n0) {
  const uint16_t* w = static_cast<const uint16_t*>(a.w) + (expert * a.n_rows + n0) * a.k;
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + s0 * a.x_stride;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 <= a.k; kk += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_loadu_si512(w + r * a.k + kk);
      _mm_prefetch(reinterpret_cast<const char*>(w + r * a.k + kk) + 1024, _MM_HINT_T0);
    }
    for (int m = 0; m < M; ++m) {
      __m512i xv = _mm512_loadu_si512(x + m * a.x_stride + kk);
      for (int r = 0; r < R; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  if (kk < a.k) {
    __mmask32 mask = (__mmask32)((1ull << (a.k - kk)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * a.k + kk);
    for (int m = 0; m < M; ++m) {
      __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * a.x_stride + kk);
      for (int r = 0; r < R; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) store(a, expert, s0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
}

// FP32: 16 elements per step with FMA.
template <int R, int M>
inline void block_f32(const Args& a, int64_t expert, int64_t s0, int64_t n0) {
  const float* w = static_cast<const float*>(a.w) + (expert * a.n_rows + n0) * a.k;
  const float* x = static_cast<const float*>(a.x) + s0 * a.x_stride;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 <= a.k; kk += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_loadu_ps(w + r * a.k + kk);
      _mm_prefetch(reinterpret_cast<const char*>(w + r * a.k + kk) + 1024, _MM_HINT_T0);
    }
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * a.x_stride + kk);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (kk < a.k) {
    __mmask16 mask = (__mmask16)((1u << (a.k - kk)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * a.k + kk);
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * a.x_stride + kk);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) store(a, expert, s0 + m, n0 + r, _mm512_reduce_add_ps(acc[r][m]));
}

template <bool BF16, int R, int M>
inline void block(const Args& a, int64_t expert, int64_t s0, int64_t n0) {
  if constexpr (BF16) {
    block_bf16<R, M>(a, expert, s0, n0);
  } else {
    block_f32<R, M>(a, expert, s0, n0);
  }
}

// All rows of x in [s0, s0+count) against weight rows [n0, n0+R).
template <bool BF16, int R>
inline void rows_block(const Args& a, int64_t expert, int64_t s0, int64_t count, int64_t n0) {
  int64_t s = s0;
  const int64_t end = s0 + count;
  for (; s + kTokBlock <= end; s += kTokBlock) block<BF16, R, kTokBlock>(a, expert, s, n0);
  switch (end - s) {
    case 3: block<BF16, R, 3>(a, expert, s, n0); break;
    case 2: block<BF16, R, 2>(a, expert, s, n0); break;
    case 1: block<BF16, R, 1>(a, expert, s, n0); break;
    default: break;
  }
}

template <bool BF16>
void run(const Args& a, const int64_t* experts, const int64_t* starts, const int64_t* counts, int64_t groups,
         int nthreads) {
  // Split n into one contiguous, kRowBlock-aligned range per thread.
  const int64_t blocks = (a.n_rows + kRowBlock - 1) / kRowBlock;
  if (nthreads > blocks) nthreads = static_cast<int>(blocks);
  if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
    const int64_t lo = blocks * t / nt * kRowBlock;
    int64_t hi = blocks * (t + 1) / nt * kRowBlock;
    if (hi > a.n_rows) hi = a.n_rows;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t n = lo;
      for (; n + kRowBlock <= hi; n += kRowBlock) rows_block<BF16, kRowBlock>(a, experts[g], starts[g], counts[g], n);
      for (; n < hi; ++n) rows_block<BF16, 1>(a, experts[g], starts[g], counts[g], n);
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16. Returns 0, or -1 for an unknown dtype.
int moerun_grouped_gemv(const void* x, int64_t x_stride, const void* w, int64_t n_rows, int64_t k,
                        const int64_t* group_experts, const int64_t* group_starts, const int64_t* group_counts,
                        int64_t groups, const float* bias, float* out, int64_t out_stride,
                        const int64_t* scatter_index, const float* scatter_weight, int dtype, int nthreads) {
  const Args a{x, x_stride, w, n_rows, k, bias, out, out_stride, scatter_index, scatter_weight};
  if (groups <= 0 || n_rows <= 0) return 0;
  if (dtype == 1) {
    run<true>(a, group_experts, group_starts, group_counts, groups, nthreads);
  } else if (dtype == 0) {
    run<false>(a, group_experts, group_starts, group_counts, groups, nthreads);
  } else {
    return -1;
  }
  return 0;
}

}  // extern "C"
