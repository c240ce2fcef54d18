// tenfold's CPU kernel for LoRTA (heads_out) of one wrapped layer: per token with its adapter's row, the shared
// shrink u = A x [r], then for every module m and each of its output heads h
//     out_m[h * d_h : (h + 1) * d_h] += (u * w_m[h]) B,
// w_m = c_lm * C_h, the head weights of this layer and matrix (the bucket's HW tables). The arithmetic is a few
// thousand multiply-adds per token; what this replaces is the torch path's ~10 ops per layer call (gather, casts,
// batched matmuls, scaled copies, index_add), whose fixed costs dominated LoRTA's decode step on CPU.
//
// Work items: runs of up to kRun tokens of one row (the caller passes the bucket's tokens sorted by row), every
// module inside the item so the shrink is shared; items write disjoint output rows.

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace tenfold_cpu_detail;

constexpr int64_t kRun = 4;

template <typename X, typename W>
void lorta_impl(const at::Tensor& x, const int64_t* tokens, const int64_t* rows, int64_t n, const at::Tensor& a_t,
                const at::Tensor& b, const at::TensorList hw, const at::TensorList out) {
  const int64_t in = x.size(1), r = a_t.size(1), head_dim = b.size(2);
  std::vector<int64_t> starts;  // item boundaries: runs of one row, at most kRun tokens
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && rows[j] == rows[i] && j - i < kRun) ++j;
    if (rows[i] >= 0) starts.push_back(i);
    i = j;
  }
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> xs(kRun * in), a_row(in), u(kRun * r), bf(r * head_dim), y(head_dim), o(head_dim), w(r);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t begin = starts[it], row = rows[begin];
      int64_t end = begin + 1;
      while (end < n && rows[end] == row && end - begin < kRun) ++end;
      for (int64_t t = begin; t < end; ++t)
        load_row(x.data_ptr<X>() + tokens[t] * x.stride(0), in, xs.data() + (t - begin) * in);
      const W* a = a_t.data_ptr<W>() + row * a_t.stride(0);
      for (int64_t k = 0; k < r; ++k) {  // u[t, k] = A[k] . x_t
        load_row(a + k * a_t.stride(1), in, a_row.data());
        for (int64_t t = begin; t < end; ++t) {
          const float* xt = xs.data() + (t - begin) * in;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t c = 0; c < in; ++c) sum += a_row[c] * xt[c];
          u[(t - begin) * r + k] = sum;
        }
      }
      const W* bp = b.data_ptr<W>() + row * b.stride(0);
      for (int64_t k = 0; k < r; ++k) load_row(bp + k * b.stride(1), head_dim, bf.data() + k * head_dim);
      for (size_t m = 0; m < hw.size(); ++m) {
        const W* hp = hw[m].data_ptr<W>() + row * hw[m].stride(0);
        for (int64_t h = 0; h < hw[m].size(1); ++h) {
          load_row(hp + h * hw[m].stride(1), r, w.data());
          for (int64_t t = begin; t < end; ++t) {
            std::fill(y.begin(), y.end(), 0.f);
            for (int64_t k = 0; k < r; ++k) {
              const float scaled = u[(t - begin) * r + k] * w[k];
              const float* bk = bf.data() + k * head_dim;
#pragma omp simd
              for (int64_t c = 0; c < head_dim; ++c) y[c] += scaled * bk[c];
            }
            X* dst = out[m].data_ptr<X>() + tokens[t] * out[m].stride(0) + h * head_dim;
            load_row(dst, head_dim, o.data());
#pragma omp simd
            for (int64_t c = 0; c < head_dim; ++c) o[c] += y[c];
            store_row(o.data(), head_dim, dst);
          }
        }
      }
    }
  });
}

// out[m][tokens[i]] head h += ((A x) * hw[m][rows[i], h]) B for every module m, with A^T = a_t[rows[i]] [r, in] and
// B = b[rows[i]] [r, d_h], in place
void lorta_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& a_t,
                 const at::Tensor& b, at::TensorList hw, at::TensorList out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, in] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: fp32 or bf16");
  check_tokens(tokens, rows, x.size(0));
  TORCH_CHECK(a_t.dim() == 3 && a_t.stride(2) == 1 && a_t.size(2) == x.size(1), "a_t: [R, r, in] matching x");
  TORCH_CHECK(b.dim() == 3 && b.stride(2) == 1 && b.size(1) == a_t.size(1) && b.size(0) == a_t.size(0) &&
                  b.scalar_type() == a_t.scalar_type(),
              "b: [R, r, d_h] with a_t's rows, rank and dtype");
  TORCH_CHECK(a_t.scalar_type() == at::kFloat || a_t.scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
  TORCH_CHECK(!hw.empty() && hw.size() == out.size(), "lorta: one head-weight table per output");
  for (size_t m = 0; m < hw.size(); ++m) {
    TORCH_CHECK(hw[m].dim() == 3 && hw[m].stride(2) == 1 && hw[m].size(0) == a_t.size(0) &&
                    hw[m].size(2) == a_t.size(1) && hw[m].scalar_type() == a_t.scalar_type(),
                "lorta: head weights [R, heads, r] with a_t's rows, rank and dtype");
    TORCH_CHECK(out[m].dim() == 2 && out[m].stride(1) == 1 && out[m].size(0) == x.size(0) &&
                    out[m].size(1) == hw[m].size(1) * b.size(2) && out[m].scalar_type() == x.scalar_type(),
                "out: [T, heads * d_h] in the dtype of x, contiguous rows");
  }
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] < a_t.size(0), "tenfold_cpu: table row ", rw[i], " of a table with ", a_t.size(0), " rows");
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t n = tokens.size(0);
  const bool xb = x.scalar_type() == at::kBFloat16, wb = a_t.scalar_type() == at::kBFloat16;
  if (xb && wb) lorta_impl<c10::BFloat16, c10::BFloat16>(x, tk, rw, n, a_t, b, hw, out);
  else if (xb) lorta_impl<c10::BFloat16, float>(x, tk, rw, n, a_t, b, hw, out);
  else if (wb) lorta_impl<float, c10::BFloat16>(x, tk, rw, n, a_t, b, hw, out);
  else lorta_impl<float, float>(x, tk, rw, n, a_t, b, hw, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TENFOLD_CPU_OPS, m) {
  m.def("lorta_apply(Tensor x, Tensor tokens, Tensor rows, Tensor a_t, Tensor b, Tensor[] hw, Tensor(a!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(TENFOLD_CPU_OPS, CPU, m) { m.impl("lorta_apply", &lorta_apply); }
