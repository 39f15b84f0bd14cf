// Quantized layers in LibTorch's torch::nn idiom (Impl + ModuleHolder, the
// same options structs).  Each derives from its torch::nn twin, so it has the
// same parameters and buffers under the same names (state dicts and
// checkpoints move between them) and the same forward result; in training
// mode it keeps a compressed copy of what backward needs instead of the
// input itself (aq/functional.h).  In eval mode it is its twin.
//
// Every layer reads a shared QuantConfig (set_config; unset: level L3) and
// owns a LayerState the adaptive scheme reads and writes.  A configuration
// of scope kNone (-c fanin, and layers outside -c qlinear's scope) makes a
// layer exactly its twin, keeping what LibTorch keeps; otherwise ReLU,
// dropout and max pooling keep their compact exact masks and indices at
// every level, L0 included.
#pragma once

#include "aq/config.h"
#include "aq/functional.h"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/modules/upsampling.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/nn/cloneable.h>

#include <memory>

namespace aq {

using ConfigPtr = std::shared_ptr<const QuantConfig>;

// What every quantized layer has besides its twin's members.
class QLayer {
 public:
  virtual ~QLayer() = default;
  void set_config(ConfigPtr config) { config_ = std::move(config); }
  // The configuration in force (level L3 defaults when none was set).
  const QuantConfig& config() const;
  const LayerStatePtr& state() const { return state_; }
  // Records in state() the geometry its forward records (kernel area,
  // groups, input channels, batch norm), from the layer's own options and
  // weights.  A restored model needs it before the first forward: a layer
  // that shares another's compressed copy adds its sensitivities to the
  // owner's allocation, which runs first.
  virtual void record_geometry() {}

 protected:
  ConfigPtr config_;
  LayerStatePtr state_ = make_layer_state();
};

// Its forward is at::linear's, in training and in evaluation: what
// PyTorch's nn.Linear computes (the bias added in the product's epilogue).
// LibTorch's C++ torch::nn::Linear adds the bias after the product for
// inputs other than 2-D, which on CUDA rounds differently, by an ulp.
class QLinearImpl : public torch::nn::LinearImpl, public QLayer {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
};
TORCH_MODULE(QLinear);

// Convolutions: every padding mode and padding of the twin (zeros with
// symmetric padding goes straight to the convolution; other modes and
// asymmetric 'same' padding are padded first, and the padded input is what
// is compressed).
template <size_t D, typename Twin>
class QConvImpl : public Twin, public QLayer {
 public:
  using Twin::Twin;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
};
class QConv1dImpl : public QConvImpl<1, torch::nn::Conv1dImpl> {
 public:
  using QConvImpl::QConvImpl;
};
class QConv2dImpl : public QConvImpl<2, torch::nn::Conv2dImpl> {
 public:
  using QConvImpl::QConvImpl;
};
class QConv3dImpl : public QConvImpl<3, torch::nn::Conv3dImpl> {
 public:
  using QConvImpl::QConvImpl;
};
TORCH_MODULE(QConv1d);
TORCH_MODULE(QConv2d);
TORCH_MODULE(QConv3d);

// Transposed convolutions (output_padding from the options).
template <size_t D, typename Twin>
class QConvTransposeImpl : public Twin, public QLayer {
 public:
  using Twin::Twin;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
};
class QConvTranspose1dImpl : public QConvTransposeImpl<1, torch::nn::ConvTranspose1dImpl> {
 public:
  using QConvTransposeImpl::QConvTransposeImpl;
};
class QConvTranspose2dImpl : public QConvTransposeImpl<2, torch::nn::ConvTranspose2dImpl> {
 public:
  using QConvTransposeImpl::QConvTransposeImpl;
};
class QConvTranspose3dImpl : public QConvTransposeImpl<3, torch::nn::ConvTranspose3dImpl> {
 public:
  using QConvTransposeImpl::QConvTransposeImpl;
};
TORCH_MODULE(QConvTranspose1d);
TORCH_MODULE(QConvTranspose2d);
TORCH_MODULE(QConvTranspose3d);

// Batch norm: running statistics, momentum (or cumulative average when
// momentum is unset), affine and eval mode exactly as the twin's.
// overwrite_input (off unless set): in training with a compressed copy, the
// output overwrites the input; for a model whose BatchNorm input has no
// other reader (a convolution's output), it saves a tensor of the input's
// size at every BatchNorm.  aq's own models set it where that holds.
template <size_t D, typename Twin>
class QBatchNormImpl : public Twin, public QLayer {
 public:
  using Twin::Twin;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
  bool overwrite_input = false;
};
class QBatchNorm1dImpl : public QBatchNormImpl<1, torch::nn::BatchNorm1dImpl> {
 public:
  using QBatchNormImpl::QBatchNormImpl;
};
class QBatchNorm2dImpl : public QBatchNormImpl<2, torch::nn::BatchNorm2dImpl> {
 public:
  using QBatchNormImpl::QBatchNormImpl;
};
class QBatchNorm3dImpl : public QBatchNormImpl<3, torch::nn::BatchNorm3dImpl> {
 public:
  using QBatchNormImpl::QBatchNormImpl;
};
TORCH_MODULE(QBatchNorm1d);
TORCH_MODULE(QBatchNorm2d);
TORCH_MODULE(QBatchNorm3d);

// ReLU keeping a 1-bit mask (in place when its options say so).
class QReLUImpl : public torch::nn::ReLUImpl, public QLayer {
 public:
  using torch::nn::ReLUImpl::ReLUImpl;
  torch::Tensor forward(torch::Tensor input);
};
TORCH_MODULE(QReLU);

// Dropout keeping a 1-bit mask, scaled by 1/(1-p); the identity in eval mode.
// The inplace option is not honoured in training: a new tensor is returned.
class QDropoutImpl : public torch::nn::DropoutImpl, public QLayer {
 public:
  using torch::nn::DropoutImpl::DropoutImpl;
  torch::Tensor forward(torch::Tensor input);
};
TORCH_MODULE(QDropout);

// Max pooling keeping window argmaxes as ceil(log2(window))-bit integers (any
// kernel, stride, padding, dilation, ceil_mode).
template <size_t D, typename Twin>
class QMaxPoolImpl : public Twin, public QLayer {
 public:
  using Twin::Twin;
  torch::Tensor forward(const torch::Tensor& input);
};
class QMaxPool1dImpl : public QMaxPoolImpl<1, torch::nn::MaxPool1dImpl> {
 public:
  using QMaxPoolImpl::QMaxPoolImpl;
};
class QMaxPool2dImpl : public QMaxPoolImpl<2, torch::nn::MaxPool2dImpl> {
 public:
  using QMaxPoolImpl::QMaxPoolImpl;
};
class QMaxPool3dImpl : public QMaxPoolImpl<3, torch::nn::MaxPool3dImpl> {
 public:
  using QMaxPoolImpl::QMaxPoolImpl;
};
TORCH_MODULE(QMaxPool1d);
TORCH_MODULE(QMaxPool2d);
TORCH_MODULE(QMaxPool3d);

// True averages; only the input's shape is kept for backward.
class QAvgPool2dImpl : public torch::nn::AvgPool2dImpl, public QLayer {
 public:
  using torch::nn::AvgPool2dImpl::AvgPool2dImpl;
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(QAvgPool2d);

class QAdaptiveAvgPool2dImpl : public torch::nn::AdaptiveAvgPool2dImpl, public QLayer {
 public:
  using torch::nn::AdaptiveAvgPool2dImpl::AdaptiveAvgPool2dImpl;
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(QAdaptiveAvgPool2d);

// Nearest and bilinear upsampling: LibTorch's backward already needs shapes
// only, so the twin is used as it is.
class QUpsampleImpl : public torch::nn::UpsampleImpl, public QLayer {
 public:
  using torch::nn::UpsampleImpl::UpsampleImpl;
};
TORCH_MODULE(QUpsample);

// --- Transformer layers (docs/design.md §4) --------------------------------
// Norms, GELU, SiLU and softmax compress from L2 on (where BatchNorm does);
// self-attention's queries, keys and values from L1 on (as linear inputs).

// Layer norm: the twin's options (normalized_shape, eps, elementwise_affine)
// and parameters; keeps its input compressed plus per-row mean and rstd.
class QLayerNormImpl : public torch::nn::LayerNormImpl, public QLayer {
 public:
  using torch::nn::LayerNormImpl::LayerNormImpl;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
};
TORCH_MODULE(QLayerNorm);

// RMS norm (LibTorch's C++ API has no module for it: this one has Python's
// nn.RMSNorm options and its "weight", initialised to ones); at::rms_norm's
// result.  Keeps its input compressed plus the per-row rstd.
struct RMSNormOptions {
  /* implicit */ RMSNormOptions(std::vector<int64_t> normalized_shape) : normalized_shape_(std::move(normalized_shape)) {}
  TORCH_ARG(std::vector<int64_t>, normalized_shape);
  // Unset: the epsilon of the type at::rms_norm computes in.
  TORCH_ARG(std::optional<double>, eps) = std::nullopt;
  TORCH_ARG(bool, elementwise_affine) = true;
};
class QRMSNormImpl : public torch::nn::Cloneable<QRMSNormImpl>, public QLayer {
 public:
  explicit QRMSNormImpl(RMSNormOptions options_);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
  RMSNormOptions options;
  torch::Tensor weight;
};
TORCH_MODULE(QRMSNorm);

// GELU and SiLU keep their derivative at the input, compressed
// (stochastically rounded: the input gradient stays unbiased).
class QGELUImpl : public torch::nn::GELUImpl, public QLayer {
 public:
  using torch::nn::GELUImpl::GELUImpl;
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(QGELU);

class QSiLUImpl : public torch::nn::SiLUImpl, public QLayer {
 public:
  using torch::nn::SiLUImpl::SiLUImpl;
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(QSiLU);

// Softmax keeps its output compressed.
class QSoftmaxImpl : public torch::nn::SoftmaxImpl, public QLayer {
 public:
  using torch::nn::SoftmaxImpl::SoftmaxImpl;
  torch::Tensor forward(const torch::Tensor& input);
};
TORCH_MODULE(QSoftmax);

// An embedding's backward reads only the indices, which LibTorch keeps as
// they are: there is nothing to compress; the layer is its twin, listed so
// that conversions and QModule see an aq layer.
class QEmbeddingImpl : public torch::nn::EmbeddingImpl, public QLayer {
 public:
  using torch::nn::EmbeddingImpl::EmbeddingImpl;
};
TORCH_MODULE(QEmbedding);

// Multi-head self-attention: qkv = Linear(C, 3 C), then
// at::scaled_dot_product_attention per head (causal or not), then
// proj = Linear(C, C).  Its own state is the attention's (queries, keys and
// values compressed as one [B, T, 3 C] tensor); qkv and proj are QLinear
// layers with theirs.  Input and output [B, T, C].
struct SelfAttentionOptions {
  SelfAttentionOptions(int64_t embed_dim, int64_t heads) : embed_dim_(embed_dim), heads_(heads) {}
  TORCH_ARG(int64_t, embed_dim);
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(bool, causal) = false;
  TORCH_ARG(bool, bias) = true;
};
class QSelfAttentionImpl : public torch::nn::Cloneable<QSelfAttentionImpl>, public QLayer {
 public:
  explicit QSelfAttentionImpl(SelfAttentionOptions options_);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void record_geometry() override;
  SelfAttentionOptions options;
  QLinear qkv{nullptr}, proj{nullptr};
};
TORCH_MODULE(QSelfAttention);

// QModule, ActNN's model conversion, as far as C++ allows.  LibTorch's
// forward methods are not virtual and a user module calls its children
// through typed members, so no layer of an arbitrary module tree can be
// swapped for another type behind its owner's back.  Instead:
// - QModule(model, config) gives every aq Q layer in the tree (built from
//   aq's layers, which are torch::nn twins) the shared configuration, and
//   lists the other layers at debug log level (left alone).  It returns the
//   number of Q layers configured.
// - quantized(sequential, config) returns a new Sequential in which every
//   supported torch::nn layer is replaced by its Q twin sharing the same
//   parameter and buffer tensors under the same names; other entries (and
//   modules nested in them: LibTorch Sequentials do not nest) are kept as
//   they are, Q layers among them configured.
int64_t QModule(torch::nn::Module& model, const QuantConfig& config);
torch::nn::Sequential quantized(const torch::nn::Sequential& model, const QuantConfig& config);

}  // namespace aq
