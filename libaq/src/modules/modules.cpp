#include "aq/modules.h"


#include <torch/nn/functional/padding.h>

namespace aq {

const QuantConfig& QLayer::config() const {
  static const QuantConfig kDefault = QuantConfig::for_level(Level::L3);
  return config_ ? *config_ : kDefault;
}

namespace {

std::optional<torch::Tensor> maybe(const torch::Tensor& t) {
  return t.defined() ? std::optional<torch::Tensor>(t) : std::nullopt;
}

}  // namespace

namespace {
// As functional::convolution records it: kernel area and groups of w, and
// the input's channels.
void record_conv(LayerState& st, const torch::Tensor& w, int64_t groups, int64_t input_channels) {
  st.kernel_area = 1;
  for (int64_t i = 2; i < w.dim(); ++i) st.kernel_area *= w.size(i);
  st.conv_groups = groups;
  st.in_channels = input_channels;
}
}  // namespace

void QLinearImpl::record_geometry() {
  LayerState& st = *state();
  st.kernel_area = 1, st.conv_groups = 1, st.in_channels = weight.size(1);
}

template <size_t D, typename Twin>
void QConvImpl<D, Twin>::record_geometry() {
  record_conv(*this->state(), this->weight, this->options.groups(), this->weight.size(1) * this->options.groups());
}

template <size_t D, typename Twin>
void QConvTransposeImpl<D, Twin>::record_geometry() {
  record_conv(*this->state(), this->weight, this->options.groups(), this->weight.size(0));
}

template <size_t D, typename Twin>
void QBatchNormImpl<D, Twin>::record_geometry() {
  LayerState& st = *this->state();
  st.batch_norm = true;
  st.in_channels = this->options.num_features();
}

torch::Tensor QLinearImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return at::linear(input, weight, maybe(bias));
  return functional::linear(input, weight, maybe(bias), config(), state());
}

template <size_t D, typename Twin>
torch::Tensor QConvImpl<D, Twin>::forward(const torch::Tensor& input) {
  if (!this->is_training()) return Twin::forward(input);
  const auto& o = this->options;
  const auto& rp = this->_reversed_padding_repeated_twice;  // [left_D-1, right_D-1, ..., left_0, right_0]
  const bool zeros = std::holds_alternative<torch::enumtype::kZeros>(o.padding_mode());
  bool symmetric = true;
  std::vector<int64_t> padding(D);
  for (size_t i = 0; i < D; ++i) {
    padding[i] = rp[2 * (D - 1 - i)];
    symmetric = symmetric && rp[2 * (D - 1 - i)] == rp[2 * (D - 1 - i) + 1];
  }
  torch::Tensor x = input;
  if (!zeros || !symmetric) {
    namespace NF = torch::nn::functional;
    auto pad = NF::PadFuncOptions(rp);
    if (std::holds_alternative<torch::enumtype::kReflect>(o.padding_mode()))
      pad.mode(torch::kReflect);
    else if (std::holds_alternative<torch::enumtype::kReplicate>(o.padding_mode()))
      pad.mode(torch::kReplicate);
    else if (std::holds_alternative<torch::enumtype::kCircular>(o.padding_mode()))
      pad.mode(torch::kCircular);
    x = NF::pad(input, pad);
    std::fill(padding.begin(), padding.end(), 0);
  }
  return functional::convolution(x, this->weight, maybe(this->bias), *o.stride(), padding, *o.dilation(),
                                 /*transposed=*/false, std::vector<int64_t>(D, 0), o.groups(), config(), state());
}

template <size_t D, typename Twin>
torch::Tensor QConvTransposeImpl<D, Twin>::forward(const torch::Tensor& input) {
  if (!this->is_training()) return Twin::forward(input);
  const auto& o = this->options;
  const auto& padding = std::get<torch::ExpandingArray<D>>(o.padding());
  return functional::convolution(input, this->weight, maybe(this->bias), *o.stride(), *padding, *o.dilation(),
                                 /*transposed=*/true, *o.output_padding(), o.groups(), config(), state());
}

template <size_t D, typename Twin>
torch::Tensor QBatchNormImpl<D, Twin>::forward(const torch::Tensor& input) {
  if (!this->is_training()) return Twin::forward(input);
  this->_check_input_dim(input);
  const auto& o = this->options;
  double factor = o.momentum() ? *o.momentum() : 0.0;
  if (o.track_running_stats() && this->num_batches_tracked.defined()) {
    this->num_batches_tracked += 1;
    if (!o.momentum()) factor = 1.0 / this->num_batches_tracked.template item<double>();
  }
  if (config().scope == Scope::kSyncBN)  // QSyncBatchNorm: statistics over every rank's batch
    return functional::sync_batch_norm(input, maybe(this->weight), maybe(this->bias), this->running_mean,
                                       this->running_var, factor, o.eps(), config(), state());
  return functional::batch_norm(input, maybe(this->weight), maybe(this->bias), this->running_mean,
                                this->running_var, factor, o.eps(), config(), state(), overwrite_input);
}

torch::Tensor QReLUImpl::forward(torch::Tensor input) {
  if (!is_training() || config().scope == Scope::kNone) return ReLUImpl::forward(std::move(input));
  // The layer after a ReLU (a conv, mostly) shares its configuration.
  const QuantConfig& c = config();
  return functional::relu(input, options.inplace(), state(), adaptive(c) && c.pergroup ? c.group_size : 0);
}

torch::Tensor QDropoutImpl::forward(torch::Tensor input) {
  if (!is_training() || options.p() == 0.0 || config().scope == Scope::kNone)
    return DropoutImpl::forward(std::move(input));
  return functional::dropout(input, options.p(), state());
}

template <size_t D, typename Twin>
torch::Tensor QMaxPoolImpl<D, Twin>::forward(const torch::Tensor& input) {
  if (!this->is_training() || this->config().scope == Scope::kNone) return Twin::forward(input);
  const auto& o = this->options;
  return functional::max_pool(input, *o.kernel_size(), *o.stride(), *o.padding(), *o.dilation(), o.ceil_mode(),
                              state());
}

torch::Tensor QAvgPool2dImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return AvgPool2dImpl::forward(input);
  return functional::avg_pool2d(input, *options.kernel_size(), *options.stride(), *options.padding(),
                                options.ceil_mode(), options.count_include_pad(), options.divisor_override());
}

torch::Tensor QAdaptiveAvgPool2dImpl::forward(const torch::Tensor& input) {
  if (!is_training()) return AdaptiveAvgPool2dImpl::forward(input);
  const auto& want = options.output_size();  // an element may be unset: keep the input's size
  std::vector<int64_t> size(2);
  for (int i = 0; i < 2; ++i) size[i] = (*want)[i] ? *(*want)[i] : input.size(input.dim() - 2 + i);
  return functional::adaptive_avg_pool2d(input, size);
}

template class QMaxPoolImpl<1, torch::nn::MaxPool1dImpl>;
template class QMaxPoolImpl<2, torch::nn::MaxPool2dImpl>;
template class QMaxPoolImpl<3, torch::nn::MaxPool3dImpl>;
template class QConvImpl<1, torch::nn::Conv1dImpl>;
template class QConvImpl<2, torch::nn::Conv2dImpl>;
template class QConvImpl<3, torch::nn::Conv3dImpl>;
template class QConvTransposeImpl<1, torch::nn::ConvTranspose1dImpl>;
template class QConvTransposeImpl<2, torch::nn::ConvTranspose2dImpl>;
template class QConvTransposeImpl<3, torch::nn::ConvTranspose3dImpl>;
template class QBatchNormImpl<1, torch::nn::BatchNorm1dImpl>;
template class QBatchNormImpl<2, torch::nn::BatchNorm2dImpl>;
template class QBatchNormImpl<3, torch::nn::BatchNorm3dImpl>;

}  // namespace aq
