// tenfold's CPU kernels for per-token low-rank updates of one wrapped layer: for every module of the layer, the
// shrink h = x A^T and the expand out += h B of each token with the table row of its adapter, reading the bucket's
// tables in place (fp32 or bf16), summing in fp32 and rounding once into the layer's output. One call per layer
// replaces the gather, batched matmuls, concatenation and index_add of the torch path. The shrink and the expand
// also run alone, for updates with other math between them (LoRETTA adp: bias and activation on h; MiSS: its own
// shrink).
//
// Work is split into items of at most kBlock consecutive tokens of one table row and one module (the caller passes
// the bucket's tokens sorted by row), so each item streams its adapter's factors once for all of its tokens. Items
// write disjoint (token, column) ranges: a bucket's tokens are distinct and the modules' output columns disjoint.

#include "blocks.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using namespace tenfold_cpu_detail;

struct Item {
  int64_t module, row, begin, end;  // module index; table row; positions [begin, end) in the token list
};

// the modules of one token block side by side, so that the threads' contiguous shares of the items hold every
// module alike (q's items are wider than k's and v's)
std::vector<Item> work_items(const at::Tensor& rows_tensor, int64_t modules) {
  const int64_t* rows = rows_tensor.data_ptr<int64_t>();
  const int64_t n = rows_tensor.size(0);
  std::vector<Item> items;
  int64_t i = 0;
  while (i < n) {
    int64_t j = i + 1;
    while (j < n && rows[j] == rows[i] && j - i < kBlock) ++j;
    if (rows[i] >= 0)
      for (int64_t m = 0; m < modules; ++m) items.push_back({m, rows[i], i, j});
    i = j;
  }
  return items;
}

// b[m] [R, r, p] tables (and a[m] [R, r, in] where given) of the same dtype and row count, each output out[m]
// [T, width] with contiguous rows and width a multiple of p; every row index below R
void check_modules(const at::TensorList b, const at::TensorList out, const at::Tensor& rows, int64_t r,
                   int64_t num_tokens) {
  TORCH_CHECK(!b.empty() && b.size() == out.size(), "tenfold_cpu: one output per table");
  for (size_t m = 0; m < b.size(); ++m) {
    TORCH_CHECK(b[m].dim() == 3 && b[m].stride(2) == 1 && b[m].size(1) == r, "b: tables [R, r, p] with rank ", r);
    TORCH_CHECK(b[m].scalar_type() == b[0].scalar_type() && b[m].size(0) == b[0].size(0),
                "b: tables of one dtype and row count");
    TORCH_CHECK(out[m].dim() == 2 && out[m].stride(1) == 1 && out[m].size(0) == num_tokens &&
                    out[m].size(1) % b[m].size(2) == 0 && out[m].scalar_type() == out[0].scalar_type(),
                "out: [T, width] of one dtype, contiguous rows, width a multiple of b's columns");
  }
  TORCH_CHECK(b[0].scalar_type() == at::kFloat || b[0].scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
  TORCH_CHECK(out[0].scalar_type() == at::kFloat || out[0].scalar_type() == at::kBFloat16, "out: fp32 or bf16");
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] < b[0].size(0), "tenfold_cpu: table row ", rw[i], " of a table with ", b[0].size(0), " rows");
}

// the table row that item `it` of a thread's items [.., end) reads from tables t (nothing past the last)
template <typename W>
inline Ahead row_ahead(const std::vector<Item>& items, int64_t it, int64_t end, const std::vector<const W*>& p,
                       const at::TensorList t) {
  if (it >= end) return {};
  const Item& item = items[it];
  const at::Tensor& table = t[item.module];
  return Ahead(p[item.module] + item.row * table.stride(0), table.size(1) * table.stride(1));
}

template <typename X, typename W>
void apply_impl(const at::Tensor& x, const int64_t* tokens, const std::vector<Item>& items, const at::TensorList a,
                const at::TensorList b, const at::TensorList out) {
  const int64_t in = x.size(1), ldx = x.stride(0), r = a[0].size(1);
  const X* xp = x.data_ptr<X>();
  const auto ap = pointers<const W>(a);
  const auto bp = pointers<const W>(b);
  const auto op = pointers<X>(out);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    ItemShrink<X, W> shrink(in);
    std::vector<float> h(kBlock * r);
    for (int64_t it = i0; it < i1; ++it) {
      const Item& item = items[it];
      const int64_t g = item.end - item.begin, m = item.module;
      X* rows_out[kBlock];
      for (int64_t t = 0; t < g; ++t) {
        shrink.load(t, xp + tokens[item.begin + t] * ldx);
        rows_out[t] = op[m] + tokens[item.begin + t] * out[m].stride(0);
      }
      with_tokens(g, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        shrink.template run<G>(ap[m] + item.row * a[m].stride(0), a[m].stride(1), r, h.data(),
                               row_ahead(items, it + 1, i1, ap, a));
        expand_item<G>(h.data(), r, bp[m] + item.row * b[m].stride(0), b[m].stride(1), b[m].size(2), rows_out,
                       out[m].size(1), row_ahead(items, it + 1, i1, bp, b));
      });
    }
  });
}

template <typename W, typename O>
void expand_impl(const float* h, int64_t r, const int64_t* tokens, const std::vector<Item>& items,
                 const at::TensorList b, const at::TensorList out) {
  const auto bp = pointers<const W>(b);
  const auto op = pointers<O>(out);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const Item& item = items[it];
      const int64_t g = item.end - item.begin, m = item.module;
      O* rows_out[kBlock];
      for (int64_t t = 0; t < g; ++t) rows_out[t] = op[m] + tokens[item.begin + t] * out[m].stride(0);
      with_tokens(g, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        expand_item<G>(h + item.begin * r, r, bp[m] + item.row * b[m].stride(0), b[m].stride(1), b[m].size(2),
                       rows_out, out[m].size(1), row_ahead(items, it + 1, i1, bp, b));
      });
    }
  });
}

template <typename X, typename W>
void shrink_impl(const at::Tensor& x, const int64_t* tokens, const std::vector<Item>& items, const at::TensorList a,
                 const at::TensorList h) {
  const int64_t in = x.size(1), ldx = x.stride(0), r = a[0].size(1);
  const X* xp = x.data_ptr<X>();
  const auto ap = pointers<const W>(a);
  const auto hp = pointers<float>(h);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    ItemShrink<X, W> shrink(in);
    std::vector<float> sums(kBlock * r);
    for (int64_t it = i0; it < i1; ++it) {
      const Item& item = items[it];
      const int64_t g = item.end - item.begin, m = item.module;
      for (int64_t t = 0; t < g; ++t) shrink.load(t, xp + tokens[item.begin + t] * ldx);
      with_tokens(g, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        shrink.template run<G>(ap[m] + item.row * a[m].stride(0), a[m].stride(1), r, sums.data(),
                               row_ahead(items, it + 1, i1, ap, a));
      });
      for (int64_t t = 0; t < g; ++t)
        std::copy(sums.data() + t * r, sums.data() + (t + 1) * r, hp[m] + (item.begin + t) * h[m].stride(0));
    }
  });
}

// x [T, in] with contiguous rows in fp32 or bf16, and a[m] [R, r, in] tables of one dtype and shape beside it
void check_shrink(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, const at::TensorList a) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, in] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: fp32 or bf16");
  check_tokens(tokens, rows, x.size(0));
  TORCH_CHECK(!a.empty(), "tenfold_cpu: no tables");
  for (const auto& t : a)
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1 && t.size(2) == x.size(1) && t.size(1) == a[0].size(1) &&
                    t.scalar_type() == a[0].scalar_type() && t.size(0) == a[0].size(0),
                "a: tables [R, r, in] of one dtype and shape, matching x");
  TORCH_CHECK(a[0].scalar_type() == at::kFloat || a[0].scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
}

// out[m][tokens[i]] += (x[tokens[i]] @ a[m][rows[i]]^T) @ b[m][rows[i]] for every module m, in place
void lowrank_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList a,
                   at::TensorList b, at::TensorList out) {
  TORCH_CHECK(a.size() == b.size(), "tenfold_cpu: one a table per b table");
  check_shrink(x, tokens, rows, a);
  check_modules(b, out, rows, a[0].size(1), x.size(0));
  TORCH_CHECK(a[0].scalar_type() == b[0].scalar_type() && a[0].size(0) == b[0].size(0),
              "a: tables of the b tables' dtype and row count");
  TORCH_CHECK(out[0].scalar_type() == x.scalar_type(), "out: the dtype of x");
  const auto items = work_items(rows, static_cast<int64_t>(a.size()));
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const bool xb = x.scalar_type() == at::kBFloat16, wb = b[0].scalar_type() == at::kBFloat16;
  with_types(xb, wb, [&](auto a_type, auto b_type) {
    apply_impl<decltype(a_type), decltype(b_type)>(x, tk, items, a, b, out);
  });
}

// out[m][tokens[i]] += h[i] @ b[m][rows[i]] for every module m, in place; h [n, r] fp32 shared by the modules
void lowrank_expand(const at::Tensor& h, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList b,
                    at::TensorList out) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 2 && h.size(0) == tokens.size(0),
              "h: contiguous fp32 [n, r]");
  TORCH_CHECK(!out.empty(), "tenfold_cpu: no outputs");
  check_tokens(tokens, rows, out[0].size(0));
  check_modules(b, out, rows, h.size(1), out[0].size(0));
  const auto items = work_items(rows, static_cast<int64_t>(b.size()));
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const bool bb = b[0].scalar_type() == at::kBFloat16, ob = out[0].scalar_type() == at::kBFloat16;
  const float* hp = h.data_ptr<float>();
  with_types(bb, ob, [&](auto a_type, auto b_type) {
    expand_impl<decltype(a_type), decltype(b_type)>(hp, h.size(1), tk, items, b, out);
  });
}

// h[m][i] = x[tokens[i]] @ a[m][rows[i]]^T for every module m (fp32 [n, r], written; rows < 0 left as they are)
void lowrank_shrink(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList a,
                    at::TensorList h) {
  check_shrink(x, tokens, rows, a);
  TORCH_CHECK(h.size() == a.size(), "tenfold_cpu: one h per a table");
  for (const auto& t : h)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == tokens.size(0) &&
                    t.size(1) == a[0].size(1) && t.stride(1) == 1,
                "h: fp32 [n, r] with contiguous rows");
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] < a[0].size(0), "tenfold_cpu: table row ", rw[i], " of a table with ", a[0].size(0), " rows");
  const auto items = work_items(rows, static_cast<int64_t>(a.size()));
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const bool xb = x.scalar_type() == at::kBFloat16, wb = a[0].scalar_type() == at::kBFloat16;
  with_types(xb, wb, [&](auto a_type, auto b_type) {
    shrink_impl<decltype(a_type), decltype(b_type)>(x, tk, items, a, h);
  });
}

}  // namespace

TORCH_LIBRARY(TENFOLD_CPU_OPS, m) {
  m.def("lowrank_apply(Tensor x, Tensor tokens, Tensor rows, Tensor[] a, Tensor[] b, Tensor(a!)[] out) -> ()");
  m.def("lowrank_expand(Tensor h, Tensor tokens, Tensor rows, Tensor[] b, Tensor(a!)[] out) -> ()");
  m.def("lowrank_shrink(Tensor x, Tensor tokens, Tensor rows, Tensor[] a, Tensor(a!)[] h) -> ()");
}

TORCH_LIBRARY_IMPL(TENFOLD_CPU_OPS, CPU, m) {
  m.impl("lowrank_apply", &lowrank_apply);
  m.impl("lowrank_expand", &lowrank_expand);
  m.impl("lowrank_shrink", &lowrank_shrink);
}
