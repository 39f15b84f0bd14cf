// Linear and convolution layers keeping their input compressed.
#include "aq/functional.h"

#include "saved.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace aq {
namespace {

using namespace detail;

struct LinearFn : torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            const QuantConfig* c, const LayerStatePtr& st) {
    ctx->save_for_backward({w});
    put_state(ctx, st);
    if (st) st->kernel_area = 1, st->conv_groups = 1, st->in_channels = w.size(1);
    if (w.requires_grad())  // only the weight's gradient needs x
      save_compressed(ctx, x, *c, st.get());
    else if (st)
      st->saved_bytes = 0;
    return at::linear(x, w, present(b));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const at::Tensor w = ctx->get_saved_variables()[0];
    record_grad(ctx, g);
    const int64_t out = w.size(0), in = w.size(1);
    at::Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0)) gx = g.matmul(w.to(g.scalar_type()));
    if (ctx->needs_input_grad(1)) {
      at::Tensor acc;
      for_each_micro_batch(ctx, packed_of(ctx), g.scalar_type(), [&](int64_t b, int64_t e, const at::Tensor& x) {
        const at::Tensor part = g.narrow(0, b, e - b).reshape({-1, out}).t().matmul(x.reshape({-1, in}));
        acc = acc.defined() ? acc + part : part;
      });
      gw = acc.to(w.scalar_type());
    }
    if (ctx->needs_input_grad(2)) gb = g.reshape({-1, out}).sum(0);
    return {gx, gw, gb, at::Tensor(), at::Tensor()};
  }
};

struct ConvFn : torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, bool transposed, std::vector<int64_t> output_padding,
                            int64_t groups, const QuantConfig* c, const LayerStatePtr& st) {
    ctx->save_for_backward({w});
    put_state(ctx, st);
    if (st) {
      st->kernel_area = 1;
      for (int64_t i = 2; i < w.dim(); ++i) st->kernel_area *= w.size(i);
      st->conv_groups = groups;
      st->in_channels = x.size(1);
    }
    save_compressed(ctx, x, *c, st.get());
    auto& s = ctx->saved_data;
    s["stride"] = stride;
    s["padding"] = padding;
    s["dilation"] = dilation;
    s["transposed"] = transposed;
    s["output_padding"] = output_padding;
    s["groups"] = groups;
    s["bias"] = present(b).defined();
    return at::convolution(x, w, present(b), stride, padding, dilation, transposed, output_padding, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& g = grads[0];
    const at::Tensor w = ctx->get_saved_variables()[0];
    record_grad(ctx, g);
    auto& s = ctx->saved_data;
    const bool transposed = s["transposed"].toBool();
    const int64_t groups = s["groups"].toInt();
    std::optional<std::vector<int64_t>> bias_sizes;
    if (s["bias"].toBool()) bias_sizes = std::vector<int64_t>{transposed ? w.size(1) * groups : w.size(0)};
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    const at::Tensor wg = w.to(g.scalar_type());
    const auto stride = s["stride"].toIntVector(), padding = s["padding"].toIntVector(),
               dilation = s["dilation"].toIntVector(), output_padding = s["output_padding"].toIntVector();
    // The weight's (and bias's) gradient first, from the restored input,
    // which is then let go; the input's gradient after, from the output
    // gradient and the weight alone: the adjoint convolution (transposed for
    // a convolution, plain for a transposed one), which is what the backward
    // op computes.  The restored input and the input gradient, each the
    // input's size, are never held together.
    at::Tensor gx, gw, gb;
    if (mask[1] || mask[2]) {
      for_each_micro_batch(ctx, packed_of(ctx), g.scalar_type(), [&](int64_t b, int64_t e, const at::Tensor& x) {
        auto [unused, gw_part, gb_part] = at::convolution_backward(
            g.narrow(0, b, e - b), x, wg, bias_sizes ? std::optional<at::IntArrayRef>(*bias_sizes) : std::nullopt,
            stride, padding, dilation, transposed, output_padding, groups, {false, mask[1], mask[2]});
        if (gw_part.defined()) gw = gw.defined() ? gw + gw_part : gw_part;
        if (gb_part.defined()) gb = gb.defined() ? gb + gb_part : gb_part;
      });
    }
    if (mask[0]) {
      const auto x_sizes = s["sizes"].toIntVector();
      const int64_t D = static_cast<int64_t>(stride.size());
      std::vector<int64_t> adjoint_padding(D, 0);
      if (!transposed) {  // what the output size leaves of the input's
        for (int64_t d = 0; d < D; ++d)
          adjoint_padding[d] = x_sizes[2 + d] - ((g.size(2 + d) - 1) * stride[d] - 2 * padding[d] +
                                                 dilation[d] * (w.size(2 + d) - 1) + 1);
      }
      gx = at::convolution(g, wg, {}, stride, padding, dilation, !transposed, adjoint_padding, groups);
    }
    if (gw.defined()) gw = gw.to(w.scalar_type());
    return {gx, gw, gb, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

}  // namespace

namespace functional {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const QuantConfig& config, const LayerStatePtr& state) {
  if (!compressing(config, x, weight)) return at::linear(x, weight, maybe_bias(bias));
  // Under autocast the input kept is the lowered one that the product reads,
  // as autocast's own linear keeps for its weight gradient: a float input (a
  // LayerNorm's output) would be read and restored at twice the bytes for
  // the same values.  The weight stays as it is (autocast lowers it inside
  // the product): keeping a lowered copy for backward would hold one more
  // copy of every weight.
  return LinearFn::apply(autocast_lower(x, x), weight, placeholder(bias, x), &config, state);
}

at::Tensor convolution(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       const QuantConfig& config, const LayerStatePtr& state) {
  const at::Tensor xl = autocast_lower(x, x), wl = autocast_lower(weight, x);
  const at::Tensor bl = bias ? autocast_lower(*bias, x) : at::Tensor();
  if (!compressing(config, x, weight))
    return at::convolution(xl, wl, bl, stride, padding, dilation, transposed, output_padding, groups);
  return ConvFn::apply(xl, wl, placeholder(bl, x), stride.vec(), padding.vec(), dilation.vec(), transposed,
                       output_padding.vec(), groups, &config, state);
}

}  // namespace functional
}  // namespace aq
