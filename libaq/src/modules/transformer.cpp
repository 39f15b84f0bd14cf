// The transformer layers' modules (aq/modules.h).
#include "aq/modules.h"

#include <c10/util/accumulate.h>
#include <torch/nn/init.h>

#include <stdexcept>

namespace aq {
namespace {

std::optional<torch::Tensor> maybe(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

// Eval mode: the exact op.
const QuantConfig& exact() {
  static const QuantConfig c = [] {
    QuantConfig e;
    e.scope = Scope::kNone;
    return e;
  }();
  return c;
}

// As the ops record it: no gradient term, no per-layer reallocation.
void record_other(LayerState& st, int64_t features) {
  st.batch_norm = true;
  st.in_channels = std::max<int64_t>(1, features);
}

}  // namespace

void QLayerNormImpl::record_geometry() {
  record_other(*state(), c10::multiply_integers(options.normalized_shape()));
}

torch::Tensor QLayerNormImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return LayerNormImpl::forward(input);
  return functional::layer_norm(input, options.normalized_shape(), maybe(weight), maybe(bias), options.eps(),
                                config(), state());
}

QRMSNormImpl::QRMSNormImpl(RMSNormOptions options_) : options(std::move(options_)) { reset(); }

void QRMSNormImpl::reset() {
  for (int64_t d : options.normalized_shape())
    if (d < 1) throw std::invalid_argument("aq: RMSNorm's normalized_shape needs positive sizes");
  if (options.elementwise_affine())
    weight = register_parameter("weight", torch::ones(options.normalized_shape()));
  else
    weight = torch::Tensor();
}

void QRMSNormImpl::record_geometry() {
  record_other(*state(), c10::multiply_integers(options.normalized_shape()));
}

torch::Tensor QRMSNormImpl::forward(const torch::Tensor& input) {
  return functional::rms_norm(input, options.normalized_shape(), maybe(weight), options.eps(),
                              is_training() ? config() : exact(), state());
}

torch::Tensor QGELUImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return GELUImpl::forward(input);
  return functional::gelu(input, options.approximate(), config(), state());
}

torch::Tensor QSiLUImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return SiLUImpl::forward(input);
  return functional::silu(input, config(), state());
}

torch::Tensor QSoftmaxImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return SoftmaxImpl::forward(input);
  return functional::softmax(input, options.dim(), config(), state());
}

QSelfAttentionImpl::QSelfAttentionImpl(SelfAttentionOptions options_) : options(std::move(options_)) { reset(); }

void QSelfAttentionImpl::reset() {
  const int64_t C = options.embed_dim(), H = options.heads();
  if (C < 1 || H < 1 || C % H != 0)
    throw std::invalid_argument("aq: self-attention needs a width (" + std::to_string(C) +
                                ") that is a positive multiple of its heads (" + std::to_string(H) + ")");
  qkv = register_module("qkv", QLinear(torch::nn::LinearOptions(C, 3 * C).bias(options.bias())));
  proj = register_module("proj", QLinear(torch::nn::LinearOptions(C, C).bias(options.bias())));
}

void QSelfAttentionImpl::record_geometry() { record_other(*state(), 3 * options.embed_dim()); }

torch::Tensor QSelfAttentionImpl::forward(const torch::Tensor& input) {
  if (input.dim() != 3 || input.size(2) != options.embed_dim())
    throw std::invalid_argument("aq: self-attention of width " + std::to_string(options.embed_dim()) +
                                " needs input [B, T, " + std::to_string(options.embed_dim()) + "], not " +
                                c10::str(input.sizes()));
  torch::Tensor h = qkv(input);
  if (!is_training()) return proj(functional::self_attention(h, options.heads(), options.causal(), exact(), state()));
  return functional::self_attention_projected(h, options.heads(), options.causal(), config(), state(), proj->weight,
                                              maybe(proj->bias), proj->is_training() ? proj->config() : exact(),
                                              proj->state());
}

}  // namespace aq
