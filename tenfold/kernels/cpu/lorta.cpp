// tenfold's CPU kernels for LoRTA of one wrapped layer, per token with its adapter's row. heads_out: the shared
// shrink u = A x [r], then for every module m and each of its output heads h
//     out_m[h * d_h : (h + 1) * d_h] += (u * w_m[h]) B,
// w_m = c_lm * C_h, the head weights of this layer and matrix (the bucket's HW tables). heads_in: the shrink sums
// the input heads, u = sum_h C_h[h] * (B x_h) = A_in x with A_in the bucket's [r, in] product of C_h and B^T (one
// matrix, read by the register-blocked shrink), then out_m += (u * c_lm[m]) A^T_m. The arithmetic is a few
// thousand multiply-adds per token; what this replaces is the torch path's ~10 ops per layer call (gather, casts,
// batched matmuls, scaled copies, index_add), whose fixed costs dominated LoRTA's decode step on CPU.
//
// Work items: runs of up to kBlock tokens of one row (the caller passes the bucket's tokens sorted by row), every
// module inside the item so the shrink is shared; items write disjoint output rows. The shrink and each head's
// expand are the register-blocked blocks of the low-rank kernels (blocks.h).

#include "blocks.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace tenfold_cpu_detail;

template <typename X, typename W>
void lorta_impl(const at::Tensor& x, const int64_t* tokens, const int64_t* rows, int64_t n, const at::Tensor& a_t,
                const at::Tensor& b, const at::TensorList hw, const at::TensorList out) {
  const int64_t in = x.size(1), r = a_t.size(1), head_dim = b.size(2);
  const auto starts = run_starts(rows, n);
  const X* xp = x.data_ptr<X>();
  const auto hp = pointers<const W>(hw);
  const auto op = pointers<X>(out);
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t i0, int64_t i1) {
    ItemShrink<X, W> shrink(in);
    // u = A x per token; s = u * w_h per token for one head; B in fp32 for the item's heads (a few KB, in L1)
    std::vector<float> u(kBlock * r), s(kBlock * r), bf(r * head_dim), w(r);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t begin = starts[it], row = rows[begin];
      const int64_t end = run_end(rows, n, begin);
      for (int64_t t = begin; t < end; ++t) shrink.load(t - begin, xp + tokens[t] * x.stride(0));
      const W* bp = b.data_ptr<W>() + row * b.stride(0);
      for (int64_t k = 0; k < r; ++k) load_row(bp + k * b.stride(1), head_dim, bf.data() + k * head_dim);
      with_tokens(end - begin, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        shrink.template run<G>(a_t.data_ptr<W>() + row * a_t.stride(0), a_t.stride(1), r, u.data(), Ahead());
        for (size_t m = 0; m < hw.size(); ++m) {
          for (int64_t h = 0; h < hw[m].size(1); ++h) {
            load_row(hp[m] + row * hw[m].stride(0) + h * hw[m].stride(1), r, w.data());
            X* dst[kBlock];
            for (int t = 0; t < G; ++t) {
              for (int64_t k = 0; k < r; ++k) s[t * r + k] = u[t * r + k] * w[k];
              dst[t] = op[m] + tokens[begin + t] * out[m].stride(0) + h * head_dim;
            }
            expand_item<G>(s.data(), r, bf.data(), head_dim, head_dim, dst, head_dim, Ahead());
          }
        }
      });
    }
  });
}

template <typename X, typename W>
void heads_in_impl(const at::Tensor& x, const int64_t* tokens, const int64_t* rows, int64_t n, const at::Tensor& a_in,
                   const at::TensorList w, const at::TensorList a_t, const at::TensorList out) {
  const int64_t in = x.size(1), r = a_in.size(1);
  const auto starts = run_starts(rows, n);
  const X* xp = x.data_ptr<X>();
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t i0, int64_t i1) {
    ItemShrink<X, W> shrink(in);
    std::vector<float> u(kBlock * r), scaled(kBlock * r), wm(r);  // per token u, and u * c_lm of one module
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t begin = starts[it], row = rows[begin];
      const int64_t end = run_end(rows, n, begin);
      for (int64_t t = begin; t < end; ++t) shrink.load(t - begin, xp + tokens[t] * x.stride(0));
      with_tokens(end - begin, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        shrink.template run<G>(a_in.data_ptr<W>() + row * a_in.stride(0), a_in.stride(1), r, u.data(), Ahead());
        for (size_t m = 0; m < w.size(); ++m) {  // out_m += (u * c_lm[m]) A^T_m
          load_row(w[m].data_ptr<W>() + row * w[m].stride(0), r, wm.data());
          X* dst[kBlock];
          for (int t = 0; t < G; ++t) {
            for (int64_t k = 0; k < r; ++k) scaled[t * r + k] = u[t * r + k] * wm[k];
            dst[t] = out[m].data_ptr<X>() + tokens[begin + t] * out[m].stride(0);
          }
          expand_item<G>(scaled.data(), r, a_t[m].data_ptr<W>() + row * a_t[m].stride(0), a_t[m].stride(1),
                         a_t[m].size(2), dst, out[m].size(1), Ahead());
        }
      });
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
  with_types(xb, wb, [&](auto a_type, auto b_type) {
    lorta_impl<decltype(a_type), decltype(b_type)>(x, tk, rw, n, a_t, b, hw, out);
  });
}

// heads_in: out[m][tokens[i]] += ((A_in x) * w[m]) A^T_m for every module m, in place, with the tables' row rows[i]:
// A_in = a_in[row] [r, in] (C_h[h, k] * B^T[c, k] at column h * d_h + c: the shrink over the input's heads as one
// matrix), w[m] = c_lm of this layer and module [R, r], A^T_m = a_t[m][row] [r, out_m] (k, v: group-averaged rows)
void lorta_in_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& a_in,
                    at::TensorList w, at::TensorList a_t, at::TensorList out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, in] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: fp32 or bf16");
  check_tokens(tokens, rows, x.size(0));
  TORCH_CHECK(a_in.dim() == 3 && a_in.stride(2) == 1 && a_in.size(2) == x.size(1), "a_in: [R, r, in] matching x");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
  const int64_t R = a_in.size(0), r = a_in.size(1);
  TORCH_CHECK(!w.empty() && w.size() == a_t.size() && w.size() == out.size(), "lorta: one w, a_t and out per module");
  for (size_t m = 0; m < w.size(); ++m) {
    TORCH_CHECK(w[m].dim() == 2 && w[m].stride(1) == 1 && w[m].size(0) == R && w[m].size(1) == r &&
                    w[m].scalar_type() == a_in.scalar_type(),
                "lorta: module weights [R, r] with a_in's rows, rank and dtype");
    TORCH_CHECK(a_t[m].dim() == 3 && a_t[m].stride(2) == 1 && a_t[m].size(0) == R && a_t[m].size(1) == r &&
                    a_t[m].scalar_type() == a_in.scalar_type(),
                "a_t: [R, r, out] with a_in's rows, rank and dtype");
    TORCH_CHECK(out[m].dim() == 2 && out[m].stride(1) == 1 && out[m].size(0) == x.size(0) &&
                    out[m].size(1) == a_t[m].size(2) && out[m].scalar_type() == x.scalar_type(),
                "out: [T, out] in the dtype of x, contiguous rows");
  }
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] < R, "tenfold_cpu: table row ", rw[i], " of a table with ", R, " rows");
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t n = tokens.size(0);
  const bool xb = x.scalar_type() == at::kBFloat16, wb = a_in.scalar_type() == at::kBFloat16;
  with_types(xb, wb, [&](auto a_type, auto b_type) {
    heads_in_impl<decltype(a_type), decltype(b_type)>(x, tk, rw, n, a_in, w, a_t, out);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TENFOLD_CPU_OPS, m) {
  m.def("lorta_apply(Tensor x, Tensor tokens, Tensor rows, Tensor a_t, Tensor b, Tensor[] hw, Tensor(a!)[] out) -> ()");
  m.def("lorta_in_apply(Tensor x, Tensor tokens, Tensor rows, Tensor a_in, Tensor[] w, Tensor[] a_t, "
        "Tensor(a!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(TENFOLD_CPU_OPS, CPU, m) {
  m.impl("lorta_apply", &lorta_apply);
  m.impl("lorta_in_apply", &lorta_in_apply);
}
