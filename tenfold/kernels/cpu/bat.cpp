// tenfold's CPU kernel for Bat (weight-guided block-affine) of one wrapped layer: for every module and each token of
// a bat adapter, with W0 cut into r x r blocks (i: output block, j: input block) and D_i the adapter's block of
// output block i,
//     out_i += sum_j W0_ij (D_i x_j) + D_i sum_j x_j,
// the update of W0 + (W0 blocks) D + D without materializing it per adapter. Both passes cost in * out multiply-adds
// per token, twice the base layer's; the transformed inputs z_ij = D_i x_j are made per output block for a tile of
// tokens and stay in L1/L2 (the torch path writes all of them, in * out / r values per token, to memory twice).
//
// Tables: D^T [R, r, out] per module (column i * r + a of row b is D_i[a, b]), and the frozen weight transposed,
// W0^T [in, out] (a row per input, contiguous along the outputs, so each output block's r columns are whole vectors),
// both in one dtype (fp32 or bf16), summed in fp32 and rounded once into the output's column slice.
// Work items: (module, output block, tile of up to kTile tokens), block-major so that consecutive items reuse the
// block's columns of W0^T; items write disjoint (token, column) ranges.

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace tenfold_cpu_detail;

constexpr int64_t kTile = 8;  // tokens per work item: their sums of the second pass stay in registers

struct BatItem {
  int64_t module, block, begin, end;  // output block; positions [begin, end) in the token list
};

// the kept tokens' rows of x as floats [n, in] and their block sums [n, r] (sum_j x_j), once per call
template <typename X>
void load_tokens(const X* x, int64_t ldx, const std::vector<int64_t>& tokens, int64_t in, int64_t r, float* xs,
                 float* sums) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  at::parallel_for(0, n, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = xs + t * in;
      float* s = sums + t * r;
      load_row(x + tokens[t] * ldx, in, row);
      std::fill(s, s + r, 0.f);
      for (int64_t j = 0; j < in; j += r)
#pragma omp simd
        for (int64_t b = 0; b < r; ++b) s[b] += row[j + b];
    }
  });
}

// D_i of one token as floats, dcol[b * r + a] = D_i[a, b]
template <typename W>
inline void load_block(const W* dt, int64_t ldd, int64_t r, float* dcol) {
  for (int64_t b = 0; b < r; ++b) load_row(dt + b * ldd, r, dcol + b * r);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// v = sum_b dc[b] * u[b] for r = 16 * NV lanes (a): D_i's columns dc, held in registers where they fit (NV = 1)
template <int NV>
inline void transform16(const __m512 (&dc)[16 * NV][NV], const float* u, __m512* v) {
  constexpr int R = 16 * NV;
  for (int k = 0; k < NV; ++k) v[k] = _mm512_setzero_ps();
  for (int b = 0; b < R; ++b) {
    const __m512 ub = _mm512_set1_ps(u[b]);
    for (int k = 0; k < NV; ++k) v[k] = _mm512_fmadd_ps(dc[b][k], ub, v[k]);
  }
}

// y[t, 0..r) = sum_k W0^T[k, block] z[t, k] + D_i s_t for the kTile tokens (r = 16 * NV)
template <int NV, typename W>
void block_avx512(const float* xs, const float* sums, int64_t in, const W* const* d, int64_t ldd, const W* w0t,
                  int64_t ldw, int64_t g, float* dcol, float* z, float* y) {
  constexpr int R = 16 * NV, G = NV <= 2 ? 8 : 4;  // G * NV sums in registers, at most 16 of the 32
  static_assert(kTile % G == 0, "tiles split into register groups");
  for (int64_t t = 0; t < g; ++t) {
    load_block(d[t], ldd, R, dcol);
    __m512 dc[R][NV], v[NV];
    for (int b = 0; b < R; ++b)
      for (int k = 0; k < NV; ++k) dc[b][k] = _mm512_loadu_ps(dcol + b * R + 16 * k);
    for (int64_t j = 0; j < in; j += R) {
      transform16<NV>(dc, xs + t * in + j, v);
      for (int k = 0; k < NV; ++k) _mm512_storeu_ps(z + t * in + j + 16 * k, v[k]);
    }
    transform16<NV>(dc, sums + t * R, v);
    for (int k = 0; k < NV; ++k) _mm512_storeu_ps(y + t * R + 16 * k, v[k]);
  }
  for (int64_t t0 = 0; t0 < g; t0 += G) {
    __m512 acc[G][NV];
    for (int t = 0; t < G; ++t)
      for (int k = 0; k < NV; ++k) acc[t][k] = _mm512_setzero_ps();
    const float* zt = z + t0 * in;  // rows past g hold zeros or an earlier item's values: their sums are dropped
    for (int64_t c = 0; c < in; ++c) {
      __m512 w[NV];
      for (int k = 0; k < NV; ++k) w[k] = load16(w0t + c * ldw + 16 * k);
      for (int t = 0; t < G; ++t) {
        const __m512 zb = _mm512_set1_ps(zt[t * in + c]);
        for (int k = 0; k < NV; ++k) acc[t][k] = _mm512_fmadd_ps(w[k], zb, acc[t][k]);
      }
    }
    for (int t = 0; t < G && t0 + t < g; ++t)
      for (int k = 0; k < NV; ++k) {
        float* yt = y + (t0 + t) * R + 16 * k;
        _mm512_storeu_ps(yt, _mm512_add_ps(_mm512_loadu_ps(yt), acc[t][k]));
      }
  }
}
#endif

// the same for any r, plain loops
template <typename W>
void block_portable(const float* xs, const float* sums, int64_t in, int64_t r, const W* const* d, int64_t ldd,
                    const W* w0t, int64_t ldw, int64_t g, float* dcol, float* z, float* y) {
  std::vector<float> w(r);
  for (int64_t t = 0; t < g; ++t) {
    load_block(d[t], ldd, r, dcol);
    float* zt = z + t * in;
    float* yt = y + t * r;
    std::fill(zt, zt + in, 0.f);
    std::fill(yt, yt + r, 0.f);
    for (int64_t b = 0; b < r; ++b) {
      const float* db = dcol + b * r;
      for (int64_t j = 0; j < in; j += r) {
        const float u = xs[t * in + j + b];
#pragma omp simd
        for (int64_t a = 0; a < r; ++a) zt[j + a] += db[a] * u;
      }
      const float s = sums[t * r + b];
#pragma omp simd
      for (int64_t a = 0; a < r; ++a) yt[a] += db[a] * s;
    }
  }
  for (int64_t c = 0; c < in; ++c) {
    load_row(w0t + c * ldw, r, w.data());
    for (int64_t t = 0; t < g; ++t) {
      const float u = z[t * in + c];
      float* yt = y + t * r;
#pragma omp simd
      for (int64_t a = 0; a < r; ++a) yt[a] += w[a] * u;
    }
  }
}

template <typename W>
void bat_impl(const at::Tensor& x, const std::vector<int64_t>& tokens, const std::vector<int64_t>& rows,
              const std::vector<BatItem>& items, int64_t r, const at::TensorList d, const at::TensorList w0t,
              const at::TensorList out) {
  const int64_t in = x.size(1), ldx = x.stride(0), n = static_cast<int64_t>(tokens.size());
  const bool xb = x.scalar_type() == at::kBFloat16;
  const auto dp = pointers<const W>(d);
  const auto wp = pointers<const W>(w0t);
  std::vector<float> x_all(n * in), sums_all(n * r);
  if (xb) load_tokens(x.data_ptr<c10::BFloat16>(), ldx, tokens, in, r, x_all.data(), sums_all.data());
  else load_tokens(x.data_ptr<float>(), ldx, tokens, in, r, x_all.data(), sums_all.data());
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> z(kTile * in, 0.f), y(kTile * r), dcol(r * r), row(r);
    for (int64_t it = i0; it < i1; ++it) {
      const BatItem& item = items[it];
      const int64_t m = item.module, g = item.end - item.begin, col0 = item.block * r;
      const float* xs = x_all.data() + item.begin * in;
      const float* sums = sums_all.data() + item.begin * r;
      const W* blocks[kTile];
      for (int64_t t = 0; t < g; ++t) blocks[t] = dp[m] + rows[item.begin + t] * d[m].stride(0) + col0;
      const W* w = wp[m] + col0;
      const int64_t ldd = d[m].stride(1), ldw = w0t[m].stride(0);
      bool done = false;
#if defined(__AVX512F__)
      done = true;
      switch (r) {
        case 16: block_avx512<1>(xs, sums, in, blocks, ldd, w, ldw, g, dcol.data(), z.data(), y.data()); break;
        case 32: block_avx512<2>(xs, sums, in, blocks, ldd, w, ldw, g, dcol.data(), z.data(), y.data()); break;
        case 64: block_avx512<4>(xs, sums, in, blocks, ldd, w, ldw, g, dcol.data(), z.data(), y.data()); break;
        default: done = false;
      }
#endif
      if (!done) block_portable(xs, sums, in, r, blocks, ldd, w, ldw, g, dcol.data(), z.data(), y.data());
      for (int64_t t = 0; t < g; ++t) {
        const int64_t token = tokens[item.begin + t];
        const float* yt = y.data() + t * r;
        auto add = [&](auto* o) {
          auto* p = o + token * out[m].stride(0) + col0;
          load_row(p, r, row.data());
#pragma omp simd
          for (int64_t a = 0; a < r; ++a) row[a] += yt[a];
          store_row(row.data(), r, p);
        };
        if (xb) add(static_cast<c10::BFloat16*>(out[m].data_ptr()));
        else add(static_cast<float*>(out[m].data_ptr()));
      }
    }
  });
}

// out[m][tokens[i]] += the Bat update of x[tokens[i]] with D = d[m][rows[i]] and W0^T = w0t[m], in place
void bat_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList d,
               at::TensorList w0t, at::TensorList out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, in] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: fp32 or bf16");
  check_tokens(tokens, rows, x.size(0));
  TORCH_CHECK(!d.empty() && d.size() == w0t.size() && d.size() == out.size(), "tenfold_cpu: one W0^T and output per D table");
  const int64_t in = x.size(1), r = d[0].size(1);
  TORCH_CHECK(r > 0 && in % r == 0, "bat: the input width ", in, " is not a multiple of the block size ", r);
  for (size_t m = 0; m < d.size(); ++m) {
    const int64_t width = out[m].dim() == 2 ? out[m].size(1) : -1;
    TORCH_CHECK(d[m].dim() == 3 && d[m].stride(2) == 1 && d[m].size(1) == r && d[m].size(2) == width &&
                    d[m].scalar_type() == d[0].scalar_type() && d[m].size(0) == d[0].size(0),
                "bat: D tables [R, r, out] of one dtype, row count and block size, as wide as their outputs");
    TORCH_CHECK(width % r == 0, "bat: the output width ", width, " is not a multiple of the block size ", r);
    TORCH_CHECK(w0t[m].dim() == 2 && w0t[m].stride(1) == 1 && w0t[m].size(0) == in && w0t[m].size(1) == width &&
                    w0t[m].scalar_type() == d[0].scalar_type(),
                "bat: W0^T [in, out] with contiguous rows, in the tables' dtype");
    TORCH_CHECK(out[m].stride(1) == 1 && out[m].size(0) == x.size(0) && out[m].scalar_type() == x.scalar_type(),
                "out: [T, out] in the dtype of x, contiguous rows");
  }
  TORCH_CHECK(d[0].scalar_type() == at::kFloat || d[0].scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* tk = tokens.data_ptr<int64_t>();
  std::vector<int64_t> kept;  // positions of the tokens with a row (a row below 0: no adapter)
  for (int64_t i = 0; i < rows.size(0); ++i) {
    TORCH_CHECK(rw[i] < d[0].size(0), "tenfold_cpu: table row ", rw[i], " of a table with ", d[0].size(0), " rows");
    if (rw[i] >= 0) kept.push_back(i);
  }
  std::vector<int64_t> kept_tokens, kept_rows;
  for (int64_t i : kept) kept_tokens.push_back(tk[i]), kept_rows.push_back(rw[i]);
  std::vector<BatItem> items;
  const int64_t n = static_cast<int64_t>(kept.size());
  for (size_t m = 0; m < d.size(); ++m)
    for (int64_t i = 0; i < out[m].size(1) / r; ++i)
      for (int64_t t = 0; t < n; t += kTile) items.push_back({static_cast<int64_t>(m), i, t, std::min(n, t + kTile)});
  if (d[0].scalar_type() == at::kBFloat16)
    bat_impl<c10::BFloat16>(x, kept_tokens, kept_rows, items, r, d, w0t, out);
  else
    bat_impl<float>(x, kept_tokens, kept_rows, items, r, d, w0t, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TENFOLD_CPU_OPS, m) {
  m.def("bat_apply(Tensor x, Tensor tokens, Tensor rows, Tensor[] d, Tensor[] w0t, Tensor(a!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(TENFOLD_CPU_OPS, CPU, m) { m.impl("bat_apply", &bat_apply); }
