// ReLU and dropout keeping 1-bit masks.
#include "aq/functional.h"

#include "aq/sample_bits.h"
#include "offer.h"
#include "saved.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace aq {
namespace {

using namespace detail;

struct ReluFn : torch::autograd::Function<ReluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, bool inplace, const LayerStatePtr& st,
                            int64_t group_size, at::Tensor* group_r2) {
    // ReLU and its mask (and the next layer's group ranges) from one read
    // of x (CUDA).
    auto [y, packed] = relu_and_mask(x, inplace, group_size, group_size > 0 ? group_r2 : nullptr);
    if (inplace) ctx->mark_dirty({x});
    save_packed_mask(ctx, y, packed, 1.0, st.get());
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    return {apply_mask(ctx, grads[0]), {}, {}, {}, {}};
  }
};

// Inverted dropout's kept elements and their scale.
at::Tensor dropout_keep(const at::Tensor& x, double p) {
  return at::empty_like(x, x.options().dtype(at::kBool)).bernoulli_(1.0 - p);
}
double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

struct DropoutFn : torch::autograd::Function<DropoutFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, const LayerStatePtr& st) {
    const at::Tensor keep = dropout_keep(x, p);
    save_mask(ctx, keep, dropout_scale(p), st.get());
    return x * keep * dropout_scale(p);
  }
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    return {apply_mask(ctx, grads[0]), {}, {}};
  }
};

}  // namespace

namespace functional {

at::Tensor relu(const at::Tensor& x, bool inplace, const LayerStatePtr& state, int64_t group_size) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return inplace ? x.relu_() : x.relu();
  at::Tensor r2;
  at::Tensor y = ReluFn::apply(x, inplace, state, group_size, &r2);
  // For the next layer's allocation, if it reads y next (as it is now).
  if (r2.defined()) group_range_offer().offer(y, std::move(r2), group_size);
  return y;
}

at::Tensor dropout(const at::Tensor& x, double p, const LayerStatePtr& state) {
  if (p < 0.0 || p > 1.0) throw std::invalid_argument("aq: dropout probability must be in [0, 1], not " + std::to_string(p));
  if (!at::GradMode::is_enabled() || !x.requires_grad()) return x * dropout_keep(x, p) * dropout_scale(p);
  return DropoutFn::apply(x, p, state);
}

}  // namespace functional
}  // namespace aq
