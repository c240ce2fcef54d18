// Helpers shared by tenfold's CPU kernels: bf16 <-> fp32 rows, argument checks, pointer lists.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// the op namespace; tests build a portable variant (no AVX-512) under another name beside the native build
#ifndef TENFOLD_CPU_OPS
#define TENFOLD_CPU_OPS tenfold_cpu
#endif

namespace tenfold_cpu_detail {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// `n` values starting at p as floats into dst, and back (bf16: rounded to nearest even)
inline void load_row(const float* p, int64_t n, float* dst) { std::memcpy(dst, p, n * sizeof(float)); }
inline void store_row(const float* src, int64_t n, float* p) { std::memcpy(p, src, n * sizeof(float)); }

inline void load_row(const c10::BFloat16* p, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = to_float(p[i]);
}

inline void store_row(const float* src, int64_t n, c10::BFloat16* p) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) p[i] = c10::BFloat16(src[i]);
}

inline void check_tokens(const at::Tensor& tokens, const at::Tensor& rows, int64_t num_tokens) {
  TORCH_CHECK(tokens.device().is_cpu() && rows.device().is_cpu(), "tenfold_cpu: CPU tensors only");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && rows.scalar_type() == at::kLong, "tokens and rows are int64");
  TORCH_CHECK(tokens.dim() == 1 && tokens.is_contiguous() && rows.sizes() == tokens.sizes() && rows.is_contiguous(),
              "tokens and rows: contiguous [n]");
  const int64_t* tk = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens.size(0); ++i)
    TORCH_CHECK(tk[i] >= 0 && tk[i] < num_tokens, "tenfold_cpu: token ", tk[i], " of ", num_tokens);
}

// f(A{}, B{}) with A, B the C++ types (float or c10::BFloat16) of two operands' dtypes: one call per kernel instead
// of four branches of template arguments
template <typename F>
inline void with_types(bool a_bf16, bool b_bf16, F&& f) {
  using Bf16 = c10::BFloat16;
  if (a_bf16 && b_bf16) f(Bf16{}, Bf16{});
  else if (a_bf16) f(Bf16{}, float{});
  else if (b_bf16) f(float{}, Bf16{});
  else f(float{}, float{});
}

template <typename T>
std::vector<T*> pointers(const at::TensorList tensors) {
  std::vector<T*> p;
  for (const auto& t : tensors) p.push_back(static_cast<T*>(t.data_ptr()));
  return p;
}

}  // namespace tenfold_cpu_detail
