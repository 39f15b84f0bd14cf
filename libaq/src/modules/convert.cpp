// Model conversion: configuring aq layers in a tree, and rebuilding a
// Sequential with Q twins that share the original tensors.
#include "aq/log.h"
#include "aq/modules.h"
#include "aq/memory.h"

#include <c10/core/AllocatorConfig.h>

#include <algorithm>

namespace aq {
namespace {

// LibTorch registers a name once; a twin takes over the original tensors:
// parameters by replacing the entries its constructor registered (a pointer
// to the protected member, named through a derived class, is legal C++), so
// gradients reach the original variables; buffers (private in LibTorch) by
// aliasing the original storage, which in-place updates of running
// statistics then share.
struct Registry : torch::nn::Module {
  static torch::OrderedDict<std::string, torch::Tensor>& parameters(torch::nn::Module& m) {
    return m.*(&Registry::parameters_);
  }
};

void share_param(torch::nn::Module& to, torch::Tensor& member, const std::string& name, const torch::Tensor& t) {
  auto& params = Registry::parameters(to);
  if (params.contains(name))
    params[name] = t;
  else
    to.register_parameter(name, t, t.defined() && t.requires_grad());
  member = t;
}
void share_buffer(torch::nn::Module& to, const std::string& name, const torch::Tensor& t) {
  torch::Tensor mine = to.named_buffers(/*recurse=*/false)[name];
  torch::NoGradGuard no_grad;
  mine.set_(t);
}

// Conv modules keep their options as detail::ConvNdOptions; their
// constructors take the public option types.
template <size_t D>
torch::nn::ConvOptions<D> conv_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  return torch::nn::ConvOptions<D>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(o.padding())
      .dilation(o.dilation())
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
}
template <size_t D>
torch::nn::ConvTransposeOptions<D> conv_transpose_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  return torch::nn::ConvTransposeOptions<D>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(std::get<torch::ExpandingArray<D>>(o.padding()))
      .output_padding(o.output_padding())
      .dilation(o.dilation())
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
}

template <typename QImpl, typename Twin>
std::shared_ptr<QImpl> twin_of(const std::shared_ptr<Twin>& t, const ConfigPtr& c) {
  std::shared_ptr<QImpl> q;
  if constexpr (std::is_base_of_v<torch::nn::ConvTranspose1dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_transpose_options<1>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::ConvTranspose2dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_transpose_options<2>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::ConvTranspose3dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_transpose_options<3>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::Conv1dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_options<1>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::Conv2dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_options<2>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::Conv3dImpl, Twin>)
    q = std::make_shared<QImpl>(conv_options<3>(t->options));
  else if constexpr (std::is_base_of_v<torch::nn::SiLUImpl, Twin>)
    q = std::make_shared<QImpl>();
  else
    q = std::make_shared<QImpl>(t->options);
  // The twin's own tensors go where the original's are first, so that
  // buffers can alias theirs (set_ needs the same device and dtype).
  for (const auto& ts : {t->parameters(), t->buffers()}) {
    auto it = std::find_if(ts.begin(), ts.end(), [](const torch::Tensor& x) { return x.is_floating_point(); });
    if (it != ts.end()) {
      q->to(it->device(), it->scalar_type());
      break;
    }
  }
  if constexpr (std::is_base_of_v<torch::nn::LinearImpl, Twin> || std::is_base_of_v<torch::nn::Conv1dImpl, Twin> ||
                std::is_base_of_v<torch::nn::Conv2dImpl, Twin> || std::is_base_of_v<torch::nn::Conv3dImpl, Twin> ||
                std::is_base_of_v<torch::nn::ConvTranspose1dImpl, Twin> ||
                std::is_base_of_v<torch::nn::ConvTranspose2dImpl, Twin> ||
                std::is_base_of_v<torch::nn::ConvTranspose3dImpl, Twin>) {
    share_param(*q, q->weight, "weight", t->weight);
    share_param(*q, q->bias, "bias", t->bias);
  }
  if constexpr (std::is_base_of_v<torch::nn::BatchNorm1dImpl, Twin> ||
                std::is_base_of_v<torch::nn::BatchNorm2dImpl, Twin> ||
                std::is_base_of_v<torch::nn::BatchNorm3dImpl, Twin>) {
    if (t->options.affine()) {
      share_param(*q, q->weight, "weight", t->weight);
      share_param(*q, q->bias, "bias", t->bias);
    }
    if (t->options.track_running_stats()) {
      share_buffer(*q, "running_mean", t->running_mean);
      share_buffer(*q, "running_var", t->running_var);
      share_buffer(*q, "num_batches_tracked", t->num_batches_tracked);
    }
  }
  if constexpr (std::is_base_of_v<torch::nn::LayerNormImpl, Twin>) {
    if (t->options.elementwise_affine()) {
      share_param(*q, q->weight, "weight", t->weight);
      share_param(*q, q->bias, "bias", t->bias);
    }
  }
  if constexpr (std::is_base_of_v<torch::nn::EmbeddingImpl, Twin>) share_param(*q, q->weight, "weight", t->weight);
  q->set_config(c);
  q->train(t->is_training());
  return q;
}

// Appends the Q twin of a supported torch::nn layer to `out` (with its
// static type, which Sequential's forward needs); false if unsupported.
bool push_twin(torch::nn::Sequential& out, const std::string& name, const std::shared_ptr<torch::nn::Module>& m,
               const ConfigPtr& c) {
  if (std::dynamic_pointer_cast<QLayer>(m)) return false;  // already an aq layer
#define AQ_TWIN(Q, T)                                                 \
  if (auto t = std::dynamic_pointer_cast<torch::nn::T##Impl>(m)) {    \
    out->push_back(name, twin_of<Q##Impl>(t, c));                     \
    return true;                                                      \
  }
  AQ_TWIN(QLinear, Linear)
  AQ_TWIN(QConv1d, Conv1d)
  AQ_TWIN(QConv2d, Conv2d)
  AQ_TWIN(QConv3d, Conv3d)
  AQ_TWIN(QConvTranspose1d, ConvTranspose1d)
  AQ_TWIN(QConvTranspose2d, ConvTranspose2d)
  AQ_TWIN(QConvTranspose3d, ConvTranspose3d)
  AQ_TWIN(QBatchNorm1d, BatchNorm1d)
  AQ_TWIN(QBatchNorm2d, BatchNorm2d)
  AQ_TWIN(QBatchNorm3d, BatchNorm3d)
  AQ_TWIN(QReLU, ReLU)
  AQ_TWIN(QDropout, Dropout)
  AQ_TWIN(QMaxPool1d, MaxPool1d)
  AQ_TWIN(QMaxPool2d, MaxPool2d)
  AQ_TWIN(QMaxPool3d, MaxPool3d)
  AQ_TWIN(QAvgPool2d, AvgPool2d)
  AQ_TWIN(QAdaptiveAvgPool2d, AdaptiveAvgPool2d)
  AQ_TWIN(QLayerNorm, LayerNorm)
  AQ_TWIN(QGELU, GELU)
  AQ_TWIN(QSiLU, SiLU)
  AQ_TWIN(QSoftmax, Softmax)
  AQ_TWIN(QEmbedding, Embedding)
#undef AQ_TWIN
  return false;
}

// Whether `scope` converts a layer of this kind (qlinear: conv/linear only).
bool in_scope(const torch::nn::Module& m, Scope scope) {
  if (scope == Scope::kNone) return false;
  if (scope != Scope::kLinear) return true;
  return dynamic_cast<const torch::nn::LinearImpl*>(&m) || dynamic_cast<const torch::nn::Conv1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::Conv2dImpl*>(&m) || dynamic_cast<const torch::nn::Conv3dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose2dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose3dImpl*>(&m);
}

// L5's defragmentation is LibTorch's own: expandable segments in the CUDA
// caching allocator (a process-wide setting, for segments allocated from
// now on; the tools turn it on for every level, see
// aq::use_expandable_segments).
void apply_level_extras(const QuantConfig& c) {
  if (c.defrag && !c10::CachingAllocator::AcceleratorAllocatorConfig::use_expandable_segments() &&
      !use_expandable_segments())
    log().warn("{}: the environment's allocator settings keep expandable segments off: no defragmentation",
               to_string(c.level));
}

// A configuration that compresses nothing, for layers outside the scope.
ConfigPtr exact_config() {
  static const ConfigPtr c = [] {
    auto e = std::make_shared<QuantConfig>();
    e->scope = Scope::kNone;
    return e;
  }();
  return c;
}

}  // namespace

int64_t QModule(torch::nn::Module& model, const QuantConfig& config) {
  config.validate();
  apply_level_extras(config);
  const auto shared = std::make_shared<const QuantConfig>(config);
  int64_t n = 0;
  for (const auto& item : model.named_modules("model")) {
    const auto& m = item.value();
    if (auto* q = dynamic_cast<QLayer*>(m.get())) {
      q->set_config(in_scope(*m, config.scope) ? shared : exact_config());
      ++n;
    } else if (m->children().empty()) {
      log().debug("QModule: {} ({}) is not an aq layer; left as it is", item.key(), m->name());
    }
  }
  return n;
}

torch::nn::Sequential quantized(const torch::nn::Sequential& model, const QuantConfig& config) {
  config.validate();
  apply_level_extras(config);
  const auto shared = std::make_shared<const QuantConfig>(config);
  torch::nn::Sequential out;
  const auto children = model->named_children();
  size_t i = 0;
  for (const auto& any : *model) {
    const std::string& name = children[i++].key();
    const std::shared_ptr<torch::nn::Module> m = any.ptr();
    if (!(in_scope(*m, config.scope) && push_twin(out, name, m, shared))) {
      if (auto* q = dynamic_cast<QLayer*>(m.get())) q->set_config(in_scope(*m, config.scope) ? shared : exact_config());
      else log().debug("quantized: {} ({}) left as it is", name, m->name());
      out->push_back(name, any);
    }
  }
  out->train(model->is_training());
  return out;
}

}  // namespace aq
