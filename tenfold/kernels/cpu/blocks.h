// Register-blocked building blocks of tenfold's CPU kernels: the shrink (x . a_j) and the expand (h b) of up to
// kBlock tokens against one adapter's table row, fp32 or bf16 tables, fp32 sums. Shared by the low-rank kernels
// (lowrank.cpp) and LoRTA's (lorta.cpp).

#pragma once

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace tenfold_cpu_detail {

constexpr int64_t kBlock = 4;    // tokens per work item: their sums stay in registers
constexpr int64_t kColumns = 64; // output columns per expand pass (4 vectors of 16)

// The next work item's factors (an adapter's table row), prefetched a few cache lines per step of the current
// item: the blocks and passes walk a table row with strides that the hardware prefetchers do not follow, and one
// item alone is too short to hide the trip from memory (into L2: its miss buffers hold more lines in flight).
// sizeof(W) lines per step covers a row of r x in (shrink) or r x p (expand) entries over the item's steps.
struct Ahead {
  const char* p = nullptr;
  const char* end = nullptr;
  template <typename W>
  Ahead(const W* row, int64_t entries) : p(reinterpret_cast<const char*>(row)), end(p + entries * sizeof(W)) {}
  Ahead() = default;
  inline void lines(int n) {
    for (int k = 0; k < n && p < end; ++k, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// h[t * r + j] for j in [j0, j0 + nj), nj <= 4, of the g <= kBlock token rows xs [g, in] (fp32)
template <int G, typename W>
inline void shrink_block(const float* xs, int64_t in, const W* a, int64_t lda, int64_t nj, float* h, int64_t r,
                         Ahead& ahead) {
#if defined(__AVX512F__)
  __m512 sum[G][4];
  for (int t = 0; t < G; ++t)
    for (int j = 0; j < 4; ++j) sum[t][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    ahead.lines(sizeof(W));
    const __mmask16 m = in - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (in - i)) - 1);
    __m512 w[4];
    for (int j = 0; j < 4; ++j) {
      if (j >= nj) {
        w[j] = _mm512_setzero_ps();
      } else if constexpr (std::is_same_v<W, float>) {
        w[j] = _mm512_maskz_loadu_ps(m, a + j * lda + i);
      } else {
        const __m256i v = _mm256_maskz_loadu_epi16(m, a + j * lda + i);
        w[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
      }
    }
    for (int t = 0; t < G; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xs + t * in + i);
      for (int j = 0; j < 4; ++j) sum[t][j] = _mm512_fmadd_ps(xv, w[j], sum[t][j]);
    }
  }
  for (int t = 0; t < G; ++t)
    for (int j = 0; j < nj; ++j) h[t * r + j] = _mm512_reduce_add_ps(sum[t][j]);
#else
  std::vector<float> w(in);
  for (int64_t j = 0; j < nj; ++j) {
    load_row(a + j * lda, in, w.data());
    for (int t = 0; t < G; ++t) {
      const float* xt = xs + t * in;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < in; ++i) s += xt[i] * w[i];
      h[t * r + j] = s;
    }
  }
#endif
}

// y[t, 0..nc) = sum_j h[t * r + j] b[j, c0..c0 + nc), nc <= kColumns, for G tokens
template <int G, typename W>
inline void expand_block(const float* h, int64_t r, const W* b, int64_t ldb, int64_t c0, int64_t nc, float* y,
                         Ahead& ahead) {
#if defined(__AVX512F__)
  __m512 acc[G][4];
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t left = nc - 16 * v;
    m[v] = left >= 16 ? static_cast<__mmask16>(0xFFFF) : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
    for (int t = 0; t < G; ++t) acc[t][v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < r; ++j) {
    ahead.lines(sizeof(W));
    __m512 w[4];
    for (int v = 0; v < 4; ++v) {
      if constexpr (std::is_same_v<W, float>) {
        w[v] = _mm512_maskz_loadu_ps(m[v], b + j * ldb + c0 + 16 * v);
      } else {
        const __m256i raw = _mm256_maskz_loadu_epi16(m[v], b + j * ldb + c0 + 16 * v);
        w[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
    }
    for (int t = 0; t < G; ++t) {
      const __m512 s = _mm512_set1_ps(h[t * r + j]);
      for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_fmadd_ps(s, w[v], acc[t][v]);
    }
  }
  for (int t = 0; t < G; ++t)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + t * kColumns + 16 * v, acc[t][v]);
#else
  float w[kColumns];
  for (int t = 0; t < G; ++t) std::fill(y + t * kColumns, y + t * kColumns + nc, 0.f);
  for (int64_t j = 0; j < r; ++j) {
    load_row(b + j * ldb + c0, nc, w);
    for (int t = 0; t < G; ++t) {
      const float s = h[t * r + j];
      float* yt = y + t * kColumns;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) yt[c] += s * w[c];
    }
  }
#endif
}

template <int G, typename W>
inline void shrink_item(const float* xs, int64_t in, const W* a, int64_t lda, int64_t r, float* h, Ahead ahead) {
  for (int64_t j = 0; j < r; j += 4)
    shrink_block<G>(xs, in, a + j * lda, lda, std::min<int64_t>(4, r - j), h + j, r, ahead);
}

#if defined(__AVX512BF16__)
constexpr bool kDotBf16 = true;
#else
constexpr bool kDotBf16 = false;
#endif

// shrink_block for bf16 token rows and tables with AVX512-BF16's dot products of bf16 pairs: exact products summed
// in fp32, a third of the instructions of converting both sides to fp32 for FMAs (used only where kDotBf16)
template <int G>
inline void shrink_block_bf16(const c10::BFloat16* xs, int64_t in, const c10::BFloat16* a, int64_t lda, int64_t nj,
                              float* h, int64_t r, Ahead& ahead) {
#if defined(__AVX512BF16__)
  __m512 sum[G][4];
  for (int t = 0; t < G; ++t)
    for (int j = 0; j < 4; ++j) sum[t][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 32) {
    ahead.lines(4);  // 64 bytes of 4 rows per step: the next row of r x in bf16 entries over this item's steps
    const __mmask32 m = in - i >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu)
                                     : static_cast<__mmask32>((1u << (in - i)) - 1);
    __m512bh w[4];
    for (int j = 0; j < 4; ++j)
      w[j] = j < nj ? (__m512bh)_mm512_maskz_loadu_epi16(m, a + j * lda + i) : (__m512bh)_mm512_setzero_si512();
    for (int t = 0; t < G; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xs + t * in + i);
      for (int j = 0; j < 4; ++j) sum[t][j] = _mm512_dpbf16_ps(sum[t][j], xv, w[j]);
    }
  }
  for (int t = 0; t < G; ++t)
    for (int j = 0; j < nj; ++j) h[t * r + j] = _mm512_reduce_add_ps(sum[t][j]);
#endif
}

// An item's token rows of x as its shrink reads them, and that shrink: fp32 rows for FMAs, or bf16 rows as they are
// for AVX512-BF16's dot products where x and the tables are both bf16
template <typename X, typename W>
struct ItemShrink {
  static constexpr bool kDot = kDotBf16 && std::is_same_v<X, c10::BFloat16> && std::is_same_v<W, c10::BFloat16>;
  std::vector<std::conditional_t<kDot, c10::BFloat16, float>> xs;
  int64_t in;

  explicit ItemShrink(int64_t in) : xs(kBlock * in), in(in) {}

  void load(int64_t t, const X* row) {
    if constexpr (kDot) std::copy(row, row + in, xs.data() + t * in);
    else load_row(row, in, xs.data() + t * in);
  }

  // h[t * r + j] = x_t . a[j] for the G loaded rows
  template <int G>
  void run(const W* a, int64_t lda, int64_t r, float* h, Ahead ahead) {
    if constexpr (kDot) {
      for (int64_t j = 0; j < r; j += 4)
        shrink_block_bf16<G>(xs.data(), in, a + j * lda, lda, std::min<int64_t>(4, r - j), h + j, r, ahead);
    } else {
      shrink_item<G>(xs.data(), in, a, lda, r, h, ahead);
    }
  }
};

// out rows += h b for the item's tokens; b's columns repeat along out when they are fewer (a period, MiSS mini)
template <int G, typename W, typename O>
inline void expand_item(const float* h, int64_t r, const W* b, int64_t ldb, int64_t period, O* const* out,
                        int64_t width, Ahead ahead) {
  float y[G * kColumns], row[kColumns];
  for (int64_t c0 = 0; c0 < period; c0 += kColumns) {
    const int64_t nc = std::min(kColumns, period - c0);
    expand_block<G>(h, r, b, ldb, c0, nc, y, ahead);
    for (int t = 0; t < G; ++t)
      for (int64_t start = c0; start < width; start += period) {
        load_row(out[t] + start, nc, row);
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) row[c] += y[t * kColumns + c];
        store_row(row, nc, out[t] + start);
      }
  }
}

// one compile-time token count per item size, so the sums above live in registers
template <typename F>
inline void with_tokens(int64_t g, F&& f) {
  switch (g) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Work items of kernels that apply every module of a layer per item: runs of up to kBlock consecutive tokens of one
// table row (the caller passes the bucket's tokens sorted by row). The start of each run whose row is >= 0 ...
inline std::vector<int64_t> run_starts(const int64_t* rows, int64_t n) {
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && rows[j] == rows[i] && j - i < kBlock) ++j;
    if (rows[i] >= 0) starts.push_back(i);
    i = j;
  }
  return starts;
}

// ... and the end of the run that starts at `begin`
inline int64_t run_end(const int64_t* rows, int64_t n, int64_t begin) {
  int64_t end = begin + 1;
  while (end < n && rows[end] == rows[begin] && end - begin < kBlock) ++end;
  return end;
}

}  // namespace tenfold_cpu_detail
