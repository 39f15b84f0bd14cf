// Transformer layers keeping compressed copies: layer and RMS norm (their
// normalised input), GELU and SiLU (their derivative), softmax (its output) and
// self-attention (its queries, keys and values).  docs/design.md §4.
#include "aq/functional.h"

#include "activation.h"
#include "offer.h"
#include "saved.h"

#include <ATen/ATen.h>
#include <ATen/SDPBackend.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <cmath>
#include <limits>
#include <numeric>

namespace aq {
namespace {

using namespace detail;

// Norms, activations and softmax are compressed where BatchNorm is (L2 and
// above); their exact forms keep what LibTorch keeps.
bool compressing_norm(const QuantConfig& c, const at::Tensor& x, const at::Tensor& w) {
  return c.compress_bn && compressing(c, x, w);
}

// The trailing dimensions a norm reduces over.
std::vector<int64_t> trailing_dims(const at::Tensor& x, size_t k) {
  std::vector<int64_t> dims(k);
  std::iota(dims.begin(), dims.end(), x.dim() - static_cast<int64_t>(k));
  return dims;
}

// What the allocation reads of a layer that is not a conv or linear layer:
// no gradient term, no per-layer reallocation (as BatchNorm, §5).
void record_other(LayerState* st, int64_t features) {
  if (st) st->batch_norm = true, st->in_channels = std::max<int64_t>(1, features);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

at::Tensor cat_parts(std::vector<at::Tensor>& parts) {
  return parts.size() == 1 ? parts[0] : at::cat(parts, 0);
}

// Where a norm's rows split into whole groups, the input itself is
// compressed: a group's bounds then lie within one row, and quantising x over
// them is quantising the normalised row, up to its shift and scale.  A row
// that is not a multiple of the group size (a ViT's 384 or 192) is split into
// the largest power of two that divides it, down to 32: a little more for
// the bounds, against a pass to normalise the input and one to scale its
// gradient.  Else (no such size) the normalised input is kept: every row at
// unit scale, so that a group spanning rows of very different spread (a
// ViT's class token beside its patches) resolves each.  0: that case.
int64_t row_group_size(const QuantConfig& c, const at::Tensor& x, int64_t row) {
  if (!c.pergroup || !x.is_contiguous() || row <= 0) return 0;
  for (int64_t g = c.group_size; g >= QuantConfig::kMinGroupSize; g /= 2)
    if (row % g == 0) return g;
  return 0;
}

// The allocation weighs a norm's samples by the ranges of the normalised
// input (its gradient's error is rstd times the input's): x's per-group
// ranges scaled by their rows' rstd, offered to the allocation as [N, K]
// (rows summing to each sample's).  One pass over x where a kernel takes it.
void offer_normalised_ranges(const at::Tensor& x, const at::Tensor& rstd, int64_t row, int64_t G) {
  const int64_t rows = x.numel() / row;
  at::Tensor r2 = group_range_offer().take(x, G);  // the residual sum's (residual_add)
  if (!(r2.defined() && r2.dim() == 1 && r2.size(0) == rows * (row / G)))
    r2 = squared_group_ranges(x.view({rows, row}), G, true);
  r2 = r2.view({rows, -1});
  group_range_offer().offer(x, r2.mul_(rstd.reshape({rows, 1}).to(at::kFloat).square()).view({x.size(0), -1}), G);
}

struct LayerNormFn : torch::autograd::Function<LayerNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            std::vector<int64_t> shape, double eps, const QuantConfig* c, const LayerStatePtr& st) {
    // at::layer_norm is this op's first output.
    auto [y, mean, rstd] = at::native_layer_norm(x, shape, present(w), present(b), eps);
    put_state(ctx, st);
    const int64_t row = c10::multiply_integers(shape);
    record_other(st.get(), row);
    const int64_t G = row_group_size(*c, x, row);
    const bool input = G > 0;
    if (input) {
      QuantConfig rows = *c;
      rows.group_size = G;
      if (st && adaptive(rows) && !st->bits.defined()) offer_normalised_ranges(x, rstd, row, G);
      save_compressed(ctx, x, rows, st.get());
      ctx->save_for_backward({w, b, mean, rstd});
    } else {
      // LibTorch's own kernel writes the normalised input in one pass (a
      // broadcast subtract and multiply take two, each slower).
      save_compressed(ctx, std::get<0>(at::native_layer_norm(x, shape, {}, {}, eps)), *c, st.get());
      ctx->save_for_backward({w, b, rstd});
    }
    ctx->saved_data["shape"] = shape;
    ctx->saved_data["input"] = input;
    return y;
  }
  // From the restored input: LibTorch's backward as it is.  From the
  // normalised input: LayerNorm's input gradient is rstd times a function of
  // xn, w and g alone, and its parameters' gradients need only xn and g, so
  // LibTorch's backward run on xn with mean 0 and rstd 1, the input gradient
  // scaled by rstd after, is the backward on x without rebuilding x.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor g = grads[0].contiguous();  // the CPU kernel reads it as laid out contiguously
    const auto saved = ctx->get_saved_variables();
    const bool input = ctx->saved_data["input"].toBool();
    const at::Tensor w = present(saved[0]), b = present(saved[1]), rstd = saved.back();
    const at::Tensor mean = input ? saved[2] : at::Tensor();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), w.defined() && ctx->needs_input_grad(1),
                                      b.defined() && ctx->needs_input_grad(2)};
    std::vector<at::Tensor> gx;
    at::Tensor gw, gb;
    const Packed p = packed_of(ctx);
    for_each_micro_batch(ctx, p, input ? p.dtype : rstd.scalar_type(), [&](int64_t s, int64_t e, const at::Tensor& xr) {
      const at::Tensor r = rstd.narrow(0, s, e - s);
      const at::Tensor gs = g.narrow(0, s, e - s);
      auto [gx_part, gw_part, gb_part] =
          input ? at::native_layer_norm_backward(gs, xr, shape, mean.narrow(0, s, e - s), r, w, b, mask)
                : at::native_layer_norm_backward(gs, xr.to(g.scalar_type()), shape, at::zeros_like(r),
                                                 at::ones_like(r), w, b, mask);
      if (gx_part.defined()) gx.push_back(input ? gx_part : gx_part.mul_(r));
      if (gw_part.defined()) gw = gw.defined() ? gw + gw_part : gw_part;
      if (gb_part.defined()) gb = gb.defined() ? gb + gb_part : gb_part;
    });
    return {gx.empty() ? at::Tensor() : cat_parts(gx), gw, gb, {}, {}, {}, {}};
  }
};

// eps unset: what at::rms_norm takes, the epsilon of the type it computes in.
double rms_eps(const at::Tensor& x, std::optional<double> eps) {
  if (eps) return *eps;
  return x.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                        : static_cast<double>(std::numeric_limits<float>::epsilon());
}
at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            std::vector<int64_t> shape, std::optional<double> eps, const QuantConfig* c,
                            const LayerStatePtr& st) {
    const at::Tensor y = at::rms_norm(x, shape, present(w), eps);
    const auto dims = trailing_dims(x, shape.size());
    const at::Tensor rstd =
        (x.to(opmath(x.scalar_type())).pow(2).mean(dims, /*keepdim=*/true) + rms_eps(x, eps)).rsqrt();
    ctx->save_for_backward({w, rstd});
    put_state(ctx, st);
    record_other(st.get(), c10::multiply_integers(shape));
    save_compressed(ctx, x.to(rstd.scalar_type()) * rstd, *c, st.get());  // normalised, as LayerNorm's
    ctx->saved_data["ndims"] = static_cast<int64_t>(shape.size());
    return y;
  }
  // y = w x r with r = (mean x^2 + eps)^-1/2:
  //   dL/dw = sum over rows of g x r,
  //   dL/dx = r (w g - x r mean(w g x r)).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const auto saved = ctx->get_saved_variables();
    const at::Tensor w = present(saved[0]), rstd = saved[1];
    const int64_t k = ctx->saved_data["ndims"].toInt();
    const bool need_w = w.defined() && ctx->needs_input_grad(1);
    const at::ScalarType t = rstd.scalar_type();
    const at::Tensor wt = w.defined() ? w.to(t) : at::Tensor();
    std::vector<at::Tensor> gx;
    at::Tensor gw;
    for_each_micro_batch(ctx, packed_of(ctx), t, [&](int64_t s, int64_t e, const at::Tensor& xn) {
      const at::Tensor r = rstd.narrow(0, s, e - s);
      const at::Tensor gs = g.narrow(0, s, e - s).to(t);
      if (need_w) {
        std::vector<int64_t> lead(xn.dim() - k);
        std::iota(lead.begin(), lead.end(), 0);
        const at::Tensor part = (gs * xn).sum(lead);
        gw = gw.defined() ? gw + part : part;
      }
      if (ctx->needs_input_grad(0)) {
        const at::Tensor wg = wt.defined() ? gs * wt : gs;
        const auto dims = trailing_dims(xn, k);
        gx.push_back((r * (wg - xn * (wg * xn).mean(dims, /*keepdim=*/true))).to(g.scalar_type()));
      }
    });
    return {gx.empty() ? at::Tensor() : cat_parts(gx), gw.defined() ? gw.to(w.scalar_type()) : at::Tensor(), {}, {},
            {}, {}};
  }
};

// An elementwise activation whose backward is g times its derivative at x:
// the derivative is what is kept (GELU's and SiLU's lie in [-0.17, 1.13] and
// [-0.1, 1.1]: a narrow range, whatever x's).
enum class Activation : int64_t { kGelu, kSilu };

at::Tensor activation(const at::Tensor& x, Activation a, const std::string& approximate) {
  return a == Activation::kGelu ? at::gelu(x, approximate) : at::silu(x);
}
at::Tensor derivative(const at::Tensor& x, Activation a, const std::string& approximate) {
  const at::Tensor one = at::ones({}, x.options()).expand_as(x);
  return a == Activation::kGelu ? at::gelu_backward(one, x, approximate) : at::silu_backward(one, x);
}

// GELU and its derivative from one read of x where a kernel does both (CUDA),
// with the group ranges of each for the allocations that compress them
// (the derivative here, the output in the next layer): r2 [N, groups] when
// the samples are whole groups, else undefined.
struct ActivationValues {
  at::Tensor y, d, r2_y, r2_d;
};
ActivationValues activation_values(const at::Tensor& x, Activation a, const std::string& approximate,
                                   const QuantConfig& c) {
  const auto type = x.device().type();
  const auto dt = x.scalar_type();
  const bool fused = a == Activation::kGelu && kernels::gelu_and_derivative.has(type) && x.is_contiguous() &&
                     (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) &&
                     aligned16(x) &&
                     x.numel() % kernels::activation_chunk(x.element_size()) == 0;
  if (!fused) return {activation(x, a, approximate), derivative(x, a, approximate), {}, {}};
  ActivationValues v{at::empty_like(x, at::MemoryFormat::Contiguous), at::empty_like(x, at::MemoryFormat::Contiguous),
                     {}, {}};
  const int64_t n = x.size(0), per_sample = x.numel() / n, G = c.group_size;
  if (c.pergroup && G % kernels::activation_chunk(x.element_size()) == 0 && per_sample % G == 0) {
    v.r2_y = at::empty({n, per_sample / G}, x.options().dtype(at::kFloat));
    v.r2_d = at::empty_like(v.r2_y);
  }
  kernels::gelu_and_derivative(type, x, approximate == "tanh", v.y, v.d, G,
                               v.r2_y.defined() ? v.r2_y.data_ptr<float>() : nullptr,
                               v.r2_d.defined() ? v.r2_d.data_ptr<float>() : nullptr);
  return v;
}

struct ActivationFn : torch::autograd::Function<ActivationFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t kind, const std::string& approximate,
                            const QuantConfig* c, const LayerStatePtr& st, at::Tensor* r2_y) {
    ActivationValues v = activation_values(x, static_cast<Activation>(kind), approximate, *c);
    put_state(ctx, st);
    record_other(st.get(), x.dim() > 1 ? x.size(-1) : 1);
    if (v.r2_d.defined()) group_range_offer().offer(v.d, std::move(v.r2_d), c->group_size);
    save_compressed(ctx, v.d, *c, st.get());
    *r2_y = std::move(v.r2_y);
    return v.y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const Packed p = packed_of(ctx);
    if (ctx->saved_data["chunk"].toInt() == 0) {
      // With the product's per-sample norms, for the layer before (a linear
      // layer's gradient statistics), where one pass gives both.
      at::Tensor sq;
      at::Tensor gx = dequantize_mul(p, g, &sq);
      if (sq.defined()) grad_sq_offer().offer(gx, std::move(sq));
      return {gx, {}, {}, {}, {}, {}};
    }
    at::Tensor gx;
    for_each_micro_batch(ctx, p, g.scalar_type(), [&](int64_t s, int64_t e, const at::Tensor& d) {
      if (!gx.defined()) gx = at::empty_like(g);
      at::Tensor part = gx.narrow(0, s, e - s);
      at::mul_out(part, g.narrow(0, s, e - s), d);
    });
    return {gx, {}, {}, {}, {}, {}};
  }
};

// The activation, and its output's group ranges offered to the layer that
// reads it next.
at::Tensor apply_activation(const at::Tensor& x, Activation a, const std::string& approximate,
                            const QuantConfig& config, const LayerStatePtr& state) {
  at::Tensor r2;
  at::Tensor y = ActivationFn::apply(x, static_cast<int64_t>(a), approximate, &config, state, &r2);
  if (r2.defined()) group_range_offer().offer(y, std::move(r2), config.group_size);
  return y;
}

struct SoftmaxFn : torch::autograd::Function<SoftmaxFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t dim, const QuantConfig* c,
                            const LayerStatePtr& st) {
    at::Tensor y = at::softmax(x, dim);
    put_state(ctx, st);
    record_other(st.get(), y.size(dim));
    save_compressed(ctx, y, *c, st.get());
    ctx->saved_data["dim"] = dim;
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    if (dim == 0) {  // the samples' dimension: no micro-batches
      const at::Tensor y = restore(ctx, g.scalar_type());
      return {at::_softmax_backward_data(g, y, dim, y.scalar_type()), {}, {}, {}};
    }
    std::vector<at::Tensor> gx;
    const Packed p = packed_of(ctx);
    for_each_micro_batch(ctx, p, g.scalar_type(), [&](int64_t s, int64_t e, const at::Tensor& ys) {
      gx.push_back(at::_softmax_backward_data(g.narrow(0, s, e - s), ys, dim, ys.scalar_type()));
    });
    return {cat_parts(gx), {}, {}, {}};
  }
};

// A residual stream's sum, written by a kernel that works out its group
// ranges on the way; its gradient is each addend's, as the addition's.
struct ResidualAddFn : torch::autograd::Function<ResidualAddFn> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, const at::Tensor& y, int64_t G, at::Tensor* r2) {
    at::Tensor z = at::empty_like(x, at::MemoryFormat::Contiguous);
    *r2 = at::empty({x.numel() / G}, x.options().dtype(at::kFloat));
    kernels::add_and_ranges(x.device().type(), x, y, z, G, r2->data_ptr<float>());
    return z;
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], grads[0], {}, {}}; }
};

// The attention itself, the same ops in the exact path, the compressed
// forward and the recomputation in backward: per head, [B, heads, T, C /
// heads], and (attend) back in the tokens' layout [B, T, C].
std::vector<at::Tensor> split_heads(const at::Tensor& qkv, int64_t heads) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  return qkv.view({B, T, 3, heads, C / heads}).permute({2, 0, 3, 1, 4}).unbind(0);
}
at::Tensor attend_heads(const at::Tensor& qkv, int64_t heads, bool causal) {
  const auto parts = split_heads(qkv, heads);
  return at::scaled_dot_product_attention(parts[0], parts[1], parts[2], std::nullopt, 0.0, causal);
}
at::Tensor attend(const at::Tensor& qkv, int64_t heads, bool causal) {
  return attend_heads(qkv, heads, causal).transpose(1, 2).reshape({qkv.size(0), qkv.size(1), qkv.size(2) / 3});
}

// A layer's configuration with what attention keeps at `attention_bits`
// where they are set (uniform), else as it is.
QuantConfig at_attention_bits(QuantConfig c, int attention_bits) {
  if (attention_bits > 0) c.cabits = c.ibits = attention_bits;
  return c;
}

// Keeps self-attention's q, k, v ([B, T, 3 C]) compressed, at
// --attention-bits where they are set, else at the layer's bits.
void save_qkv(AutogradContext* ctx, const at::Tensor& qkv, const QuantConfig& c, const LayerStatePtr& st) {
  put_state(ctx, st);
  record_other(st.get(), qkv.size(2));
  save_compressed(ctx, qkv, at_attention_bits(c, c.attention_bits), st.get());
}

struct AttentionFn : torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, int64_t heads, bool causal,
                            const QuantConfig* c, const LayerStatePtr& st) {
    at::Tensor out = attend(qkv, heads, causal);
    save_qkv(ctx, qkv, *c, st);
    auto& s = ctx->saved_data;
    s["heads"] = heads;
    s["causal"] = causal;
    // Under autocast the attention ran in the lower precision; so does its
    // recomputation (autocast is off in backward).
    s["dtype"] = static_cast<int64_t>(out.scalar_type());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    auto& s = ctx->saved_data;
    const int64_t heads = s["heads"].toInt();
    const bool causal = s["causal"].toBool();
    const auto dtype = static_cast<at::ScalarType>(s["dtype"].toInt());
    std::vector<at::Tensor> gx;
    for_each_micro_batch(ctx, packed_of(ctx), dtype, [&](int64_t b, int64_t e, const at::Tensor& restored) {
      at::AutoGradMode enable(true);
      const at::Tensor x = restored.detach().requires_grad_(true);
      // Recomputed per head only: the gradient in that layout is a view of
      // g (what the layout change's backward would hand over), and the
      // change itself, a copy of the output, is not needed again.
      const at::Tensor o = attend_heads(x, heads, causal);
      const at::Tensor go = g.narrow(0, b, e - b).to(dtype).reshape({e - b, x.size(1), heads, -1}).transpose(1, 2);
      gx.push_back(torch::autograd::grad({o}, {x}, {go})[0]);
    });
    return {cat_parts(gx), {}, {}, {}, {}};
  }
};

// Self-attention and its output projection in one op, where LibTorch runs
// the attention with a kernel whose backward takes the forward's output and
// per-row log-sum-exp (flash, cuDNN, memory-efficient).  The attention's output o, the
// projection's input, is kept compressed once, under the projection's state
// (in a context of its own: save_compressed keeps one copy per context);
// its backward reads the restored o twice: for the projection's weight
// gradient and, with the log-sum-exp, for the attention's backward, which
// then needs no second forward.  q, k and v are kept as AttentionFn keeps
// them, and o at --attention-bits like them (uniform, so the projection
// takes no part in the bit allocation on this path): that
// backward subtracts D = rowsum(dO * o) from every score's gradient of the
// row, where an error in o does not cancel as it does in a recomputed
// forward (o = P V exactly), so o at the layer's few bits would put its
// error into every q and k gradient.  Without --attention-bits the two ops
// run apart.
struct SubContext : torch::CustomClassHolder {
  AutogradContext ctx;
};

// What at::scaled_dot_product_attention runs for these inputs, where the op
// takes it over; kNone where it does not.
enum class Sdpa : int64_t { kNone, kFlashCuda, kCudnn, kEfficient, kFlashCpu };
Sdpa sdpa_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  const auto choice = static_cast<at::SDPBackend>(at::_fused_sdp_choice(q, k, v, std::nullopt, 0.0, causal));
  if (q.is_cuda() && choice == at::SDPBackend::cudnn_attention) return Sdpa::kCudnn;
  if (q.is_cuda() && choice == at::SDPBackend::efficient_attention) return Sdpa::kEfficient;
  if (choice != at::SDPBackend::flash_attention) return Sdpa::kNone;
  if (q.is_cpu()) return Sdpa::kFlashCpu;
  return q.is_cuda() && q.size(-1) % 8 == 0 ? Sdpa::kFlashCuda : Sdpa::kNone;  // no padded heads
}

struct AttentionProjectionFn : torch::autograd::Function<AttentionProjectionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& w, const at::Tensor& b,
                            int64_t heads, bool causal, int64_t kernel, const QuantConfig* c, const LayerStatePtr& st,
                            const QuantConfig* pc, const LayerStatePtr& pst) {
    const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3, D = C / heads;
    const auto parts = split_heads(qkv, heads);
    // Each as at::scaled_dot_product_attention calls it when inputs need
    // their gradient, so the same bits.
    at::Tensor out, lse, cum_q, cum_k, seed, offset;
    int64_t max_q = 0, max_k = 0;
    auto keep = [&](const auto& r) {
      out = std::get<0>(r), lse = std::get<1>(r), cum_q = std::get<2>(r), cum_k = std::get<3>(r);
      max_q = std::get<4>(r).expect_int(), max_k = std::get<5>(r).expect_int();
      seed = std::get<6>(r), offset = std::get<7>(r);
    };
    switch (static_cast<Sdpa>(kernel)) {
      case Sdpa::kFlashCuda:
        keep(at::_scaled_dot_product_flash_attention(parts[0], parts[1], parts[2], 0.0, causal, false,
                                                     1.0 / std::sqrt(static_cast<double>(D))));
        break;
      case Sdpa::kCudnn:
        keep(at::_scaled_dot_product_cudnn_attention(parts[0], parts[1], parts[2], std::nullopt, true, 0.0, causal));
        break;
      case Sdpa::kEfficient:
        std::tie(out, lse, seed, offset) =
            at::_scaled_dot_product_efficient_attention(parts[0], parts[1], parts[2], std::nullopt, true, 0.0, causal);
        break;
      default:
        std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(parts[0], parts[1], parts[2], 0.0, causal);
    }
    const at::Tensor o = out.transpose(1, 2).reshape({B, T, C});
    at::Tensor y = at::linear(o, w, present(b));

    save_qkv(ctx, qkv, *c, st);
    auto sub = c10::make_intrusive<SubContext>();
    put_state(&sub->ctx, pst);
    save_compressed(&sub->ctx, o, at_attention_bits(*pc, c->attention_bits), pst.get());
    ctx->save_for_backward({w, lse, cum_q, cum_k, seed, offset});
    auto& s = ctx->saved_data;
    s["projection"] = c10::IValue::make_capsule(sub);
    s["heads"] = heads;
    s["causal"] = causal;
    s["kernel"] = kernel;
    s["max"] = std::vector<int64_t>{max_q, max_k};
    s["bias"] = present(b).defined();
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    auto& s = ctx->saved_data;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &w = saved[0], &lse = saved[1];
    auto sub = c10::static_intrusive_pointer_cast<SubContext>(s["projection"].toCapsule());
    record_grad(&sub->ctx, g);
    const Packed po = packed_of(&sub->ctx);
    const at::Tensor o = dequantize(po).to(po.dtype);
    const int64_t heads = s["heads"].toInt(), out_features = w.size(0), C = w.size(1);
    // The projection's gradients, as LinearFn's.
    at::Tensor gw, gb;
    const at::Tensor g2 = g.reshape({-1, out_features});
    if (ctx->needs_input_grad(1)) gw = g2.t().matmul(o.reshape({-1, C}).to(g.scalar_type())).to(w.scalar_type());
    if (s["bias"].toBool() && ctx->needs_input_grad(2)) gb = g2.sum(0);
    at::Tensor gqkv;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor qkv = restore(ctx, po.dtype);
      const int64_t B = qkv.size(0), T = qkv.size(1), D = C / heads;
      const auto parts = split_heads(qkv, heads);
      auto per_head = [&](const at::Tensor& t) { return t.view({B, T, heads, D}).transpose(1, 2); };
      const at::Tensor go = per_head(g.matmul(w.to(g.scalar_type())).to(po.dtype));
      const bool causal = s["causal"].toBool();
      const auto mx = s["max"].toIntVector();
      at::Tensor gq, gk, gv;
      switch (static_cast<Sdpa>(s["kernel"].toInt())) {
        case Sdpa::kFlashCuda:
          std::tie(gq, gk, gv) = at::_scaled_dot_product_flash_attention_backward(
              go, parts[0], parts[1], parts[2], per_head(o), lse, saved[2], saved[3], mx[0], mx[1], 0.0, causal,
              saved[4], saved[5], 1.0 / std::sqrt(static_cast<double>(D)));
          break;
        case Sdpa::kCudnn:
          std::tie(gq, gk, gv) = at::_scaled_dot_product_cudnn_attention_backward(
              go, parts[0], parts[1], parts[2], per_head(o), lse, saved[4], saved[5], at::Tensor(), saved[2], saved[3],
              mx[0], mx[1], 0.0, causal);
          break;
        case Sdpa::kEfficient: {
          at::Tensor unused;
          std::tie(gq, gk, gv, unused) = at::_scaled_dot_product_efficient_attention_backward(
              go, parts[0], parts[1], parts[2], at::Tensor(), per_head(o), lse, saved[4], saved[5], 0.0,
              {true, true, true, false}, causal);
          break;
        }
        default:
          std::tie(gq, gk, gv) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
              go, parts[0], parts[1], parts[2], per_head(o), lse, 0.0, causal);
      }
      gqkv = at::stack({gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)}, 2).view({B, T, 3 * C});
    }
    return {gqkv, gw, gb, {}, {}, {}, {}, {}, {}, {}};
  }
};

}  // namespace

namespace functional {

at::Tensor layer_norm(const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, const QuantConfig& config,
                      const LayerStatePtr& state) {
  const at::Tensor w = maybe_bias(weight), b = maybe_bias(bias);
  if (!compressing_norm(config, x, w) || x.dim() <= static_cast<int64_t>(normalized_shape.size()) || x.size(0) == 0)
    return at::layer_norm(x, normalized_shape, w, b, eps);
  // LibTorch's autocast runs layer_norm in float; native_layer_norm, which
  // the compressed op calls, is not on its lists.
  at::Tensor xf = x, wf = w, bf = b;
  const auto type = x.device().type();
  if (at::autocast::is_autocast_enabled(type) && x.is_floating_point() && x.scalar_type() != at::kDouble) {
    xf = x.to(at::kFloat);
    if (w.defined()) wf = w.to(at::kFloat);
    if (b.defined()) bf = b.to(at::kFloat);
  }
  return LayerNormFn::apply(xf, placeholder(wf, x), placeholder(bf, x), normalized_shape.vec(), eps, &config, state);
}

at::Tensor rms_norm(const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                    std::optional<double> eps, const QuantConfig& config, const LayerStatePtr& state) {
  const at::Tensor w = maybe_bias(weight);
  if (!compressing_norm(config, x, w) || x.dim() <= static_cast<int64_t>(normalized_shape.size()) || x.size(0) == 0)
    return at::rms_norm(x, normalized_shape, w, eps);
  return RmsNormFn::apply(x, placeholder(w, x), normalized_shape.vec(), eps, &config, state);
}

at::Tensor gelu(const at::Tensor& x, const std::string& approximate, const QuantConfig& config,
                const LayerStatePtr& state) {
  if (!compressing_norm(config, x, at::Tensor()) || x.dim() == 0 || x.size(0) == 0) return at::gelu(x, approximate);
  return apply_activation(x, Activation::kGelu, approximate, config, state);
}

at::Tensor silu(const at::Tensor& x, const QuantConfig& config, const LayerStatePtr& state) {
  if (!compressing_norm(config, x, at::Tensor()) || x.dim() == 0 || x.size(0) == 0) return at::silu(x);
  return apply_activation(x, Activation::kSilu, "none", config, state);
}

at::Tensor softmax(const at::Tensor& x, int64_t dim, const QuantConfig& config, const LayerStatePtr& state) {
  if (!compressing_norm(config, x, at::Tensor()) || x.dim() == 0 || x.size(0) == 0) return at::softmax(x, dim);
  return SoftmaxFn::apply(x, c10::maybe_wrap_dim(dim, x.dim()), &config, state);
}

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& y, int64_t row, const QuantConfig& config) {
  const auto type = x.device().type();
  const int64_t G = row > 0 && x.dim() > 0 && x.size(-1) == row ? row_group_size(config, x, row) : 0;
  const auto yt = y.scalar_type();
  const bool takes = G > 0 && adaptive(config) && compressing_norm(config, x, at::Tensor()) &&
                     kernels::add_and_ranges.has(type) && x.scalar_type() == at::kFloat &&
                     (yt == at::kFloat || yt == at::kBFloat16 || yt == at::kHalf) && y.sizes() == x.sizes() &&
                     y.device() == x.device() && y.is_contiguous() &&
                     (type != c10::kCUDA || (G % kernels::kAddChunk == 0 && aligned16(x) && aligned16(y)));
  if (!takes) return x + y;
  at::Tensor r2;
  at::Tensor z = ResidualAddFn::apply(x, y, G, &r2);
  group_range_offer().offer(z, std::move(r2), G);
  return z;
}

at::Tensor self_attention_projected(const at::Tensor& qkv, int64_t heads, bool causal, const QuantConfig& config,
                                    const LayerStatePtr& state, const at::Tensor& proj_weight,
                                    const std::optional<at::Tensor>& proj_bias, const QuantConfig& proj_config,
                                    const LayerStatePtr& proj_state) {
  const at::Tensor b = maybe_bias(proj_bias);
  auto separate = [&] {
    return linear(self_attention(qkv, heads, causal, config, state), proj_weight, b, proj_config, proj_state);
  };
  if (qkv.dim() != 3 || heads < 1 || qkv.size(2) % (3 * heads) != 0 || qkv.size(0) == 0 ||
      proj_weight.dim() != 2 || proj_weight.size(1) * 3 != qkv.size(2) || !compressing(config, qkv, at::Tensor()) ||
      !proj_config.compresses() || config.attention_bits <= 0 || config.micro_batch_backward || config.swap ||
      proj_config.micro_batch_backward || proj_config.swap)
    return separate();
  const auto parts = split_heads(qkv, heads);
  const Sdpa kernel = sdpa_kernel(parts[0], parts[1], parts[2], causal);
  if (kernel == Sdpa::kNone) return separate();
  return AttentionProjectionFn::apply(qkv, proj_weight, placeholder(b, qkv), heads, causal,
                                      static_cast<int64_t>(kernel), &config, state, &proj_config, proj_state);
}

at::Tensor self_attention(const at::Tensor& qkv, int64_t heads, bool causal, const QuantConfig& config,
                          const LayerStatePtr& state) {
  if (qkv.dim() != 3 || heads < 1 || qkv.size(2) % (3 * heads) != 0)
    throw std::invalid_argument("aq: self_attention needs qkv [B, T, 3 C] with C a multiple of heads (" +
                                std::to_string(heads) + "), not " + c10::str(qkv.sizes()));
  if (!compressing(config, qkv, at::Tensor()) || qkv.size(0) == 0) return attend(qkv, heads, causal);
  return AttentionFn::apply(qkv, heads, causal, &config, state);
}

}  // namespace functional
}  // namespace aq
