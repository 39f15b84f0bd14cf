#include "aq/models.h"

#include "aq/modules.h"
#include "aq/recompute.h"
#include "transformer.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/container/sequential.h>

#include <stdexcept>

namespace aq::models {
namespace {

namespace nn = torch::nn;

QConv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1) {
  return QConv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
}
// A BatchNorm whose input nothing else reads (a convolution's output) writes
// its output over it once compressed; one whose input is also a shortcut
// must not.
QBatchNorm2d bn(int64_t c, bool input_shared = false) {
  QBatchNorm2d m{nn::BatchNormOptions(c)};
  m->overwrite_input = !input_shared;
  return m;
}
// In place, as torchvision's: a ReLU follows a BatchNorm or a sum, neither of
// whose backward reads the output it overwrites.
QReLU relu() { return QReLU(nn::ReLUOptions(/*inplace=*/true)); }

// The blocks' forward passes take one statement per step and overwrite their
// running tensor: a nested expression would keep every intermediate until its
// end, and a shortcut computed first would be held through the whole branch.

// A stage of residual blocks; recomputed: each block on its own.
torch::Tensor run_stage(nn::Sequential& stage, torch::Tensor h, bool recompute) {
  if (!recompute) return stage->forward(h);
  for (const auto& block : *stage)
    h = aq::recompute(block.ptr(), [b = block](const torch::Tensor& x) mutable { return b.forward(x); }, h);
  return h;
}

// --- CIFAR-style pre-activation ResNets (He et al., ECCV 2016) -------------

// bn-relu-conv3x3, bn-relu-conv3x3; a 1x1 projection of the pre-activated
// input where the shape changes.
struct PreActBasicImpl : nn::Module {
  static constexpr int64_t kExpansion = 1;
  QBatchNorm2d bn1{nullptr}, bn2{nullptr};
  QReLU relu1, relu2;
  QConv2d conv1{nullptr}, conv2{nullptr}, shortcut{nullptr};
  PreActBasicImpl(int64_t in, int64_t planes, int64_t stride) {
    bn1 = register_module("bn1", bn(in, /*input_shared=*/true));
    relu1 = register_module("relu1", relu());
    conv1 = register_module("conv1", conv(in, planes, 3, stride));
    bn2 = register_module("bn2", bn(planes));
    relu2 = register_module("relu2", relu());
    conv2 = register_module("conv2", conv(planes, planes, 3));
    if (stride != 1 || in != planes) shortcut = register_module("shortcut", conv(in, planes, 1, stride));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto a = relu1(bn1(x));
    auto h = relu2(bn2(conv1(a)));
    h = conv2(h);
    h += shortcut ? shortcut(a) : x;
    return h;
  }
};
TORCH_MODULE(PreActBasic);

struct PreActBottleneckImpl : nn::Module {
  static constexpr int64_t kExpansion = 4;
  QBatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  QReLU relu1, relu2, relu3;
  QConv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr}, shortcut{nullptr};
  PreActBottleneckImpl(int64_t in, int64_t planes, int64_t stride) {
    bn1 = register_module("bn1", bn(in, /*input_shared=*/true));
    relu1 = register_module("relu1", relu());
    conv1 = register_module("conv1", conv(in, planes, 1));
    bn2 = register_module("bn2", bn(planes));
    relu2 = register_module("relu2", relu());
    conv2 = register_module("conv2", conv(planes, planes, 3, stride));
    bn3 = register_module("bn3", bn(planes));
    relu3 = register_module("relu3", relu());
    conv3 = register_module("conv3", conv(planes, planes * kExpansion, 1));
    if (stride != 1 || in != planes * kExpansion)
      shortcut = register_module("shortcut", conv(in, planes * kExpansion, 1, stride));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto a = relu1(bn1(x));
    auto h = relu2(bn2(conv1(a)));
    h = relu3(bn3(conv2(h)));
    h = conv3(h);
    h += shortcut ? shortcut(a) : x;
    return h;
  }
};
TORCH_MODULE(PreActBottleneck);

class PreActResNet : public Model {
 public:
  template <typename Block>
  void make(int64_t in_channels, int64_t num_classes, int64_t blocks) {
    conv1_ = register_module("conv1", conv(in_channels, 16, 3));
    int64_t in = 16;
    const int64_t widths[] = {16, 32, 64};
    for (int s = 0; s < 3; ++s) {
      nn::Sequential stage;
      for (int64_t b = 0; b < blocks; ++b) {
        stage->push_back(Block(in, widths[s], b == 0 && s > 0 ? 2 : 1));
        in = widths[s] * Block::ContainedType::kExpansion;
      }
      layers_.push_back(register_module("layer" + std::to_string(s + 1), stage));
    }
    bn_ = register_module("bn", bn(in));
    relu_ = register_module("relu", relu());
    pool_ = register_module("avgpool", QAdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions(1)));
    fc_ = register_module("fc", QLinear(nn::LinearOptions(in, num_classes)));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    auto h = conv1_(x);
    for (auto& l : layers_) h = run_stage(l, std::move(h), recomputes_blocks());
    return fc_(pool_(relu_(bn_(h))).flatten(1));
  }

 private:
  QConv2d conv1_{nullptr};
  std::vector<nn::Sequential> layers_;
  QBatchNorm2d bn_{nullptr};
  QReLU relu_{nullptr};
  QAdaptiveAvgPool2d pool_{nullptr};
  QLinear fc_{nullptr};
};

// --- ImageNet-style ResNets (torchvision's layout and names) -----------------

nn::Sequential downsample(int64_t in, int64_t out, int64_t stride) {
  nn::Sequential d;
  d->push_back(conv(in, out, 1, stride));
  d->push_back(bn(out));
  return d;
}

struct BasicImpl : nn::Module {
  static constexpr int64_t kExpansion = 1;
  QConv2d conv1{nullptr}, conv2{nullptr};
  QBatchNorm2d bn1{nullptr}, bn2{nullptr};
  QReLU relu1, relu2;
  nn::Sequential down{nullptr};
  BasicImpl(int64_t in, int64_t planes, int64_t stride) {
    conv1 = register_module("conv1", conv(in, planes, 3, stride));
    bn1 = register_module("bn1", bn(planes));
    relu1 = register_module("relu1", relu());
    conv2 = register_module("conv2", conv(planes, planes, 3));
    bn2 = register_module("bn2", bn(planes));
    relu2 = register_module("relu2", relu());
    if (stride != 1 || in != planes) down = register_module("downsample", downsample(in, planes, stride));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = relu1(bn1(conv1(x)));
    h = bn2(conv2(h));
    h += down ? down->forward(x) : x;
    return relu2(h);
  }
};
TORCH_MODULE(Basic);

struct BottleneckImpl : nn::Module {
  static constexpr int64_t kExpansion = 4;
  QConv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  QBatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  QReLU relu1, relu2, relu3;
  nn::Sequential down{nullptr};
  BottleneckImpl(int64_t in, int64_t planes, int64_t stride) {
    conv1 = register_module("conv1", conv(in, planes, 1));
    bn1 = register_module("bn1", bn(planes));
    relu1 = register_module("relu1", relu());
    conv2 = register_module("conv2", conv(planes, planes, 3, stride));
    bn2 = register_module("bn2", bn(planes));
    relu2 = register_module("relu2", relu());
    conv3 = register_module("conv3", conv(planes, planes * kExpansion, 1));
    bn3 = register_module("bn3", bn(planes * kExpansion));
    relu3 = register_module("relu3", relu());
    if (stride != 1 || in != planes * kExpansion)
      down = register_module("downsample", downsample(in, planes * kExpansion, stride));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = relu1(bn1(conv1(x)));
    h = relu2(bn2(conv2(h)));
    h = bn3(conv3(h));
    h += down ? down->forward(x) : x;
    return relu3(h);
  }
};
TORCH_MODULE(Bottleneck);

class ResNet : public Model {
 public:
  template <typename Block>
  void make(int64_t in_channels, int64_t num_classes, const std::vector<int64_t>& blocks) {
    conv1_ = register_module("conv1", QConv2d(nn::Conv2dOptions(in_channels, 64, 7).stride(2).padding(3).bias(false)));
    bn1_ = register_module("bn1", bn(64));
    relu_ = register_module("relu", relu());
    maxpool_ = register_module("maxpool", QMaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
    int64_t in = 64;
    for (size_t s = 0; s < blocks.size(); ++s) {
      const int64_t planes = 64 << s;
      nn::Sequential stage;
      for (int64_t b = 0; b < blocks[s]; ++b) {
        stage->push_back(Block(in, planes, b == 0 && s > 0 ? 2 : 1));
        in = planes * Block::ContainedType::kExpansion;
      }
      layers_.push_back(register_module("layer" + std::to_string(s + 1), stage));
    }
    pool_ = register_module("avgpool", QAdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions(1)));
    fc_ = register_module("fc", QLinear(nn::LinearOptions(in, num_classes)));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    auto h = relu_(bn1_(conv1_(x)));
    h = maxpool_(h);
    for (auto& l : layers_) h = run_stage(l, std::move(h), recomputes_blocks());
    return fc_(pool_(h).flatten(1));
  }

 private:
  QConv2d conv1_{nullptr};
  QBatchNorm2d bn1_{nullptr};
  QReLU relu_{nullptr};
  QMaxPool2d maxpool_{nullptr};
  std::vector<nn::Sequential> layers_;
  QAdaptiveAvgPool2d pool_{nullptr};
  QLinear fc_{nullptr};
};

void init_fanin(nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (const auto& m : model.modules(/*include_self=*/false)) {
    if (auto* c = dynamic_cast<nn::Conv2dImpl*>(m.get())) {
      nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanIn, torch::kReLU);
    } else if (auto* b = dynamic_cast<nn::BatchNorm2dImpl*>(m.get())) {
      b->weight.fill_(1);
      b->bias.zero_();
    }
  }
}

}  // namespace

const std::vector<std::string>& architectures() {
  static const std::vector<std::string> names = {
      "preact_resnet20", "preact_resnet32", "preact_resnet44", "preact_resnet56", "preact_resnet110",
      "preact_resnet164", "preact_resnet1001", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
      "vit_tiny",        "vit_small",       "gpt_small"};
  return names;
}

ModelOptions options_from_parameters(const std::string& arch,
                                     const std::vector<std::pair<std::string, torch::Tensor>>& parameters) {
  return detail::options_from_parameters(arch, parameters);
}

ModelOptions resolved_shape(const std::string& arch, const ModelOptions& options) {
  return detail::resolved_shape(arch, options);
}

bool is_vit(const std::string& arch) { return arch == "vit_tiny" || arch == "vit_small"; }

bool is_gpt(const std::string& arch) { return arch == "gpt_small"; }

bool is_transformer(const std::string& arch) { return is_vit(arch) || is_gpt(arch); }

void check_options(const std::string& arch, const ModelOptions& options) {
  const bool vit = is_vit(arch);
  if (!vit && !is_gpt(arch) && (options.layers || options.width || options.heads || options.dropout > 0))
    throw std::invalid_argument("--layers, --width, --heads and --dropout are for transformers (vit_*, gpt_*), not " +
                                arch);
  if (!vit && !options.class_token) throw std::invalid_argument("--pool is for the ViTs (vit_*), not " + arch);
  detail::check_transformer(arch, options);
}

ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes) {
  return build(arch, in_channels, num_classes, ModelOptions());
}

ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const ModelOptions& options) {
  if (in_channels < 1 && !is_gpt(arch))
    throw std::invalid_argument("input channels must be positive, not " + std::to_string(in_channels));
  if (num_classes < 1) throw std::invalid_argument("--num-classes must be positive, not " + std::to_string(num_classes));
  if (ModelPtr t = detail::build_transformer(arch, in_channels, num_classes, options)) return t;
  std::shared_ptr<Model> m;
  const std::string pre = "preact_resnet";
  if (arch.rfind(pre, 0) == 0 && arch.size() > pre.size()) {
    int depth = 0;
    try {
      size_t pos = 0;
      depth = std::stoi(arch.substr(pre.size()), &pos);
      if (pos != arch.size() - pre.size()) depth = 0;
    } catch (const std::exception&) {
    }
    auto net = std::make_shared<PreActResNet>();
    if (depth == 164 || depth == 1001)
      net->make<PreActBottleneck>(in_channels, num_classes, (depth - 2) / 9);
    else if (depth == 20 || depth == 32 || depth == 44 || depth == 56 || depth == 110)
      net->make<PreActBasic>(in_channels, num_classes, (depth - 2) / 6);
    else
      net.reset();
    m = net;
  } else if (arch == "resnet18" || arch == "resnet34") {
    auto net = std::make_shared<ResNet>();
    net->make<Basic>(in_channels, num_classes, arch == "resnet18" ? std::vector<int64_t>{2, 2, 2, 2}
                                                                    : std::vector<int64_t>{3, 4, 6, 3});
    m = net;
  } else if (arch == "resnet50" || arch == "resnet101" || arch == "resnet152") {
    auto net = std::make_shared<ResNet>();
    net->make<Bottleneck>(in_channels, num_classes,
                          arch == "resnet50"    ? std::vector<int64_t>{3, 4, 6, 3}
                          : arch == "resnet101" ? std::vector<int64_t>{3, 4, 23, 3}
                                                : std::vector<int64_t>{3, 8, 36, 3});
    m = net;
  }
  if (!m) {
    std::string known;
    for (const auto& a : architectures()) known += (known.empty() ? "" : ", ") + a;
    throw std::invalid_argument("unknown architecture '" + arch + "' (known: " + known + ")");
  }
  init_fanin(*m);
  m->set_recompute_blocks(options.recompute_blocks);
  return m;
}

ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const QuantConfig& config) {
  return build(arch, in_channels, num_classes, ModelOptions(), config);
}

ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const ModelOptions& options,
               const QuantConfig& config) {
  if (options.recompute_blocks && config.compresses())
    throw std::invalid_argument("recomputed blocks are for the exact model: level " + to_string(config.level) +
                                " compresses (recomputation would compress again)");
  auto m = build(arch, in_channels, num_classes, options);
  QModule(*m, config);
  return m;
}

}  // namespace aq::models
