// tenfold's CPU kernels for LoRETTA adp's bottleneck adapters of one wrapped layer: per token with its adapter's
// row and per module m,
//     a_m(x) = [act(x W_down + b_down), 1] W_up'    (W_up' = [s W_up; s b_up], the bucket's Wu table)
// in one pass per work item: the shrink, bias and activation of h stay in registers and a few hundred bytes of
// scratch, and the expand reads W_up' once. What this replaces is the torch glue between a separate shrink and
// expand (bias gathers, the activation, the ones column, index copies: ~40 ops per layer call).
//
// bottleneck_apply: out[m][token] += a_m(x)       (the post-adapter on down_proj, in place)
// bottleneck_pre:   inputs[token] += a_0(x)        (the carrier half of the fused gate_up GEMM's input)
//                   difference[token] = a_1(x) - a_0(x)   (the other half's correction; a_1 = 0 when not given)
// Sums in fp32, each output rounded once. Work items: runs of up to kBlock tokens of one row, every module inside
// the item; items write disjoint rows, and read their own tokens' x before writing (x may be out itself).

#include "blocks.h"

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using namespace tenfold_cpu_detail;

// the activations of transformers' ACT2FN that the kernels compute (the bucket keeps torch's for the others)
enum class Activation { kLinear, kRelu, kTanh, kSigmoid, kSilu, kGelu, kGeluTanh };

Activation parse_activation(const std::string& name) {
  if (name == "linear") return Activation::kLinear;
  if (name == "relu") return Activation::kRelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(false, "tenfold_cpu: activation ", name, " is not one of the bottleneck kernels'");
}

inline float activate(Activation a, float v) {
  switch (a) {
    case Activation::kLinear: return v;
    case Activation::kRelu: return v > 0.f ? v : 0.f;
    case Activation::kTanh: return std::tanh(v);
    case Activation::kSigmoid: return 1.f / (1.f + std::exp(-v));
    case Activation::kSilu: return v / (1.f + std::exp(-v));
    case Activation::kGelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * v * (1.f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  }
  return v;
}

// Table m's row for the item after `it` among a thread's items [.., end), prefetched while item `it` computes (as in
// the low-rank kernels: an item streams an adapter's rows with strides the hardware prefetchers do not follow)
template <typename W>
inline Ahead next_row(const std::vector<int64_t>& starts, const int64_t* rows, int64_t it, int64_t end,
                      const at::Tensor& table) {
  if (it + 1 >= end) return {};
  return Ahead(table.data_ptr<W>() + rows[starts[it + 1]] * table.stride(0), table.size(1) * table.stride(1));
}

// One thread's scratch: the item's token rows of x, and h = [act(x W_down + b_down), 1] per token [G, b + 1]
template <typename X, typename W>
struct Hidden {
  ItemShrink<X, W> shrink;
  std::vector<float> sums, h, bias;
  int64_t b;

  Hidden(int64_t in, int64_t b) : shrink(in), sums(kBlock * b), h(kBlock * (b + 1)), bias(b), b(b) {}

  template <int G>
  void compute(const W* wd_t, int64_t ld, const W* bd, Activation act, Ahead ahead) {
    shrink.template run<G>(wd_t, ld, b, sums.data(), ahead);
    load_row(bd, b, bias.data());
    for (int t = 0; t < G; ++t) {
      for (int64_t j = 0; j < b; ++j) h[t * (b + 1) + j] = activate(act, sums[t * b + j] + bias[j]);
      h[t * (b + 1) + b] = 1.f;
    }
  }
};

void check_tables(const at::Tensor& x, const at::Tensor& rows, const at::TensorList wd_t, const at::TensorList bd,
                  const at::TensorList wu, size_t modules) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, d] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: fp32 or bf16");
  TORCH_CHECK(wd_t.size() == modules && bd.size() == modules && wu.size() == modules,
              "tenfold_cpu: one W_down^T, b_down and W_up' per module");
  const int64_t b = wd_t[0].size(1), R = wd_t[0].size(0);
  for (size_t m = 0; m < modules; ++m) {
    TORCH_CHECK(wd_t[m].dim() == 3 && wd_t[m].stride(2) == 1 && wd_t[m].size(1) == b &&
                    wd_t[m].size(2) == x.size(1) && wd_t[m].size(0) == R,
                "W_down^T: [R, b, d] tables matching x");
    TORCH_CHECK(bd[m].dim() == 2 && bd[m].stride(1) == 1 && bd[m].size(0) == R && bd[m].size(1) == b,
                "b_down: [R, b] tables");
    TORCH_CHECK(wu[m].dim() == 3 && wu[m].stride(2) == 1 && wu[m].size(0) == R && wu[m].size(1) == b + 1,
                "W_up': [R, b + 1, out] tables (the last row s * b_up)");
    for (const auto* t : {&wd_t[m], &bd[m], &wu[m]})
      TORCH_CHECK(t->scalar_type() == wd_t[0].scalar_type(), "tables of one dtype");
  }
  TORCH_CHECK(wd_t[0].scalar_type() == at::kFloat || wd_t[0].scalar_type() == at::kBFloat16, "tables: fp32 or bf16");
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i)
    TORCH_CHECK(rw[i] < R, "tenfold_cpu: table row ", rw[i], " of a table with ", R, " rows");
}

template <typename X, typename W>
void apply_impl(const at::Tensor& x, const int64_t* tokens, const int64_t* rows, int64_t n, const at::TensorList wd_t,
                const at::TensorList bd, const at::TensorList wu, Activation act, const at::TensorList out) {
  const int64_t in = x.size(1), b = wd_t[0].size(1);
  const auto starts = run_starts(rows, n);
  const X* xp = x.data_ptr<X>();
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t i0, int64_t i1) {
    Hidden<X, W> hidden(in, b);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t begin = starts[it], row = rows[begin];
      const int64_t end = run_end(rows, n, begin);
      for (int64_t t = begin; t < end; ++t) hidden.shrink.load(t - begin, xp + tokens[t] * x.stride(0));
      with_tokens(end - begin, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        for (size_t m = 0; m < wd_t.size(); ++m) {
          hidden.template compute<G>(wd_t[m].data_ptr<W>() + row * wd_t[m].stride(0), wd_t[m].stride(1),
                                     bd[m].data_ptr<W>() + row * bd[m].stride(0), act,
                                     next_row<W>(starts, rows, it, i1, wd_t[m]));
          X* dst[kBlock];
          for (int t = 0; t < G; ++t) dst[t] = out[m].data_ptr<X>() + tokens[begin + t] * out[m].stride(0);
          expand_item<G>(hidden.h.data(), b + 1, wu[m].data_ptr<W>() + row * wu[m].stride(0), wu[m].stride(1),
                         wu[m].size(2), dst, out[m].size(1), next_row<W>(starts, rows, it, i1, wu[m]));
        }
      });
    }
  });
}

template <typename X, typename W, typename D>
void pre_impl(const at::Tensor& x, const int64_t* tokens, const int64_t* rows, int64_t n, const at::TensorList wd_t,
              const at::TensorList bd, const at::TensorList wu, Activation act, const at::Tensor& inputs,
              const at::Tensor& difference) {
  const int64_t in = x.size(1), b = wd_t[0].size(1);
  const auto starts = run_starts(rows, n);
  const X* xp = x.data_ptr<X>();
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t i0, int64_t i1) {
    Hidden<X, W> hidden(in, b);
    std::vector<float> carrier(kBlock * in), diff(kBlock * in), row_buffer(in);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t begin = starts[it], row = rows[begin];
      const int64_t end = run_end(rows, n, begin);
      for (int64_t t = begin; t < end; ++t) hidden.shrink.load(t - begin, xp + tokens[t] * x.stride(0));
      std::fill(carrier.begin(), carrier.end(), 0.f);
      std::fill(diff.begin(), diff.end(), 0.f);
      with_tokens(end - begin, [&](auto tokens_in_item) {
        constexpr int G = decltype(tokens_in_item)::value;
        for (size_t m = 0; m < wd_t.size(); ++m) {  // a_0 into `carrier`, a_1 into `diff`
          hidden.template compute<G>(wd_t[m].data_ptr<W>() + row * wd_t[m].stride(0), wd_t[m].stride(1),
                                     bd[m].data_ptr<W>() + row * bd[m].stride(0), act,
                                     next_row<W>(starts, rows, it, i1, wd_t[m]));
          float* dst[kBlock];
          for (int t = 0; t < G; ++t) dst[t] = (m == 0 ? carrier.data() : diff.data()) + t * in;
          expand_item<G>(hidden.h.data(), b + 1, wu[m].data_ptr<W>() + row * wu[m].stride(0), wu[m].stride(1),
                         in, dst, in, next_row<W>(starts, rows, it, i1, wu[m]));
        }
      });
      for (int64_t t = begin; t < end; ++t) {
        const float* a0 = carrier.data() + (t - begin) * in;
        float* d = diff.data() + (t - begin) * in;
        X* dst = inputs.data_ptr<X>() + tokens[t] * inputs.stride(0);
        load_row(xp + tokens[t] * x.stride(0), in, row_buffer.data());  // x + a_0, rounded once
        for (int64_t c = 0; c < in; ++c) row_buffer[c] += a0[c];
        store_row(row_buffer.data(), in, dst);
        for (int64_t c = 0; c < in; ++c) d[c] -= a0[c];
        store_row(d, in, difference.data_ptr<D>() + tokens[t] * difference.stride(0));
      }
    }
  });
}

// out[m][tokens[i]] += a_m(x[tokens[i]]) with the tables' row rows[i], for every module m, in place
void bottleneck_apply(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList wd_t,
                      at::TensorList bd, at::TensorList wu, c10::string_view activation, at::TensorList out) {
  TORCH_CHECK(!out.empty(), "tenfold_cpu: no outputs");
  check_tokens(tokens, rows, x.size(0));
  check_tables(x, rows, wd_t, bd, wu, out.size());
  for (size_t m = 0; m < out.size(); ++m)
    TORCH_CHECK(out[m].dim() == 2 && out[m].stride(1) == 1 && out[m].size(0) == x.size(0) &&
                    out[m].size(1) == wu[m].size(2) && out[m].scalar_type() == x.scalar_type(),
                "out: [T, out] in the dtype of x, contiguous rows");
  const Activation act = parse_activation(std::string(activation));
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t n = tokens.size(0);
  const bool xb = x.scalar_type() == at::kBFloat16, wb = wd_t[0].scalar_type() == at::kBFloat16;
  with_types(xb, wb, [&](auto a_type, auto b_type) {
    apply_impl<decltype(a_type), decltype(b_type)>(x, tk, rw, n, wd_t, bd, wu, act, out);
  });
}

// inputs[tokens[i]] = x[tokens[i]] + a_0(x), difference[tokens[i]] = a_1(x) - a_0(x) (a_1 = 0 with one module)
void bottleneck_pre(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& rows, at::TensorList wd_t,
                    at::TensorList bd, at::TensorList wu, c10::string_view activation, const at::Tensor& inputs,
                    const at::Tensor& difference) {
  TORCH_CHECK(wd_t.size() == 1 || wd_t.size() == 2, "tenfold_cpu: the carrier module, and the other one if targeted");
  check_tokens(tokens, rows, x.size(0));
  check_tables(x, rows, wd_t, bd, wu, wd_t.size());
  const int64_t d = x.size(1);
  for (const auto& w : wu) TORCH_CHECK(w.size(2) == d, "W_up': a pre-adapter's output is its layer's input width");
  TORCH_CHECK(inputs.sizes() == x.sizes() && inputs.stride(1) == 1 && inputs.scalar_type() == x.scalar_type(),
              "inputs: [T, d] like x, contiguous rows");
  TORCH_CHECK(difference.dim() == 2 && difference.size(0) == x.size(0) && difference.size(1) == d &&
                  difference.stride(1) == 1 &&
                  (difference.scalar_type() == at::kFloat || difference.scalar_type() == at::kBFloat16),
              "difference: fp32 or bf16 [T, d], contiguous rows");
  const Activation act = parse_activation(std::string(activation));
  const int64_t* tk = tokens.data_ptr<int64_t>();
  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t n = tokens.size(0);
  const bool xb = x.scalar_type() == at::kBFloat16, wb = wd_t[0].scalar_type() == at::kBFloat16,
             db = difference.scalar_type() == at::kBFloat16;
  using B = c10::BFloat16;
  if (xb && wb && db) pre_impl<B, B, B>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (xb && wb) pre_impl<B, B, float>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (xb && db) pre_impl<B, float, B>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (xb) pre_impl<B, float, float>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (wb && db) pre_impl<float, B, B>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (wb) pre_impl<float, B, float>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else if (db) pre_impl<float, float, B>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
  else pre_impl<float, float, float>(x, tk, rw, n, wd_t, bd, wu, act, inputs, difference);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TENFOLD_CPU_OPS, m) {
  m.def("bottleneck_apply(Tensor x, Tensor tokens, Tensor rows, Tensor[] wd_t, Tensor[] bd, Tensor[] wu, "
        "str activation, Tensor(a!)[] out) -> ()");
  m.def("bottleneck_pre(Tensor x, Tensor tokens, Tensor rows, Tensor[] wd_t, Tensor[] bd, Tensor[] wu, "
        "str activation, Tensor(a!) inputs, Tensor(b!) difference) -> ()");
}

TORCH_LIBRARY_IMPL(TENFOLD_CPU_OPS, CPU, m) {
  m.impl("bottleneck_apply", &bottleneck_apply);
  m.impl("bottleneck_pre", &bottleneck_pre);
}
