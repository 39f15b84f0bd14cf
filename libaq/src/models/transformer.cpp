// Vision Transformers and a GPT-2-style decoder built from aq's layers.
#include "transformer.h"

#include "aq/functional.h"
#include "aq/modules.h"
#include "aq/recompute.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/container/modulelist.h>

#include <cmath>
#include <map>
#include <stdexcept>

namespace aq::models::detail {
namespace {

namespace nn = torch::nn;

// Pre-norm block: x + attn(ln1(x)), then + fc2(gelu(fc1(ln2(.)))), MLP 4x wide.
struct BlockImpl : nn::Module {
  QLayerNorm ln1{nullptr}, ln2{nullptr};
  QSelfAttention attn{nullptr};
  QLinear fc1{nullptr}, fc2{nullptr};
  QGELU gelu;
  QDropout drop1{nullptr}, drop2{nullptr};
  int64_t width;
  BlockImpl(int64_t width_, int64_t heads, bool causal, double dropout) : width(width_) {
    ln1 = register_module("ln1", QLayerNorm(nn::LayerNormOptions({width})));
    attn = register_module("attn", QSelfAttention(SelfAttentionOptions(width, heads).causal(causal)));
    drop1 = register_module("drop1", QDropout(nn::DropoutOptions(dropout)));
    ln2 = register_module("ln2", QLayerNorm(nn::LayerNormOptions({width})));
    fc1 = register_module("fc1", QLinear(nn::LinearOptions(width, 4 * width)));
    gelu = register_module("gelu", QGELU());
    fc2 = register_module("fc2", QLinear(nn::LinearOptions(4 * width, width)));
    drop2 = register_module("drop2", QDropout(nn::DropoutOptions(dropout)));
  }
  // One statement per step, so that no intermediate outlives its reader.
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor h = ln1(x);
    h = attn(h);
    h = drop1(h);
    x = add(x, h);
    h = ln2(x);
    h = fc1(h);
    h = gelu(h);
    h = fc2(h);
    h = drop2(h);
    return add(x, h);
  }
  // The residual sum, which a LayerNorm reads next (ln2, or the next
  // block's ln1 or the final norm, configured alike).
  torch::Tensor add(const torch::Tensor& x, const torch::Tensor& h) {
    return ln2->is_training() ? functional::residual_add(x, h, width, ln2->config()) : x + h;
  }
};
TORCH_MODULE(Block);

nn::ModuleList blocks(int64_t layers, int64_t width, int64_t heads, bool causal, double dropout) {
  nn::ModuleList list;
  for (int64_t i = 0; i < layers; ++i) list->push_back(Block(width, heads, causal, dropout));
  return list;
}
torch::Tensor run_blocks(const nn::ModuleList& list, torch::Tensor h, bool recompute) {
  for (const auto& m : *list) {
    if (recompute) h = aq::recompute(std::dynamic_pointer_cast<BlockImpl>(m), h);
    else h = m->as<BlockImpl>()->forward(std::move(h));
  }
  return h;
}

// GPT-2's initialisation: weights N(0, 0.02), biases 0, the projections
// back into the residual stream scaled by 1/sqrt(2 layers); norms 1 and 0.
void init_transformer(nn::Module& model, int64_t layers) {
  torch::NoGradGuard no_grad;
  for (const auto& item : model.named_modules()) {
    nn::Module* m = item.value().get();
    if (auto* l = dynamic_cast<nn::LinearImpl*>(m)) {
      const bool residual = item.key().size() >= 4 && (item.key().rfind("proj") == item.key().size() - 4 ||
                                                        item.key().rfind("fc2") == item.key().size() - 3);
      nn::init::normal_(l->weight, 0.0, residual ? 0.02 / std::sqrt(2.0 * static_cast<double>(layers)) : 0.02);
      if (l->bias.defined()) l->bias.zero_();
    } else if (auto* e = dynamic_cast<nn::EmbeddingImpl*>(m)) {
      nn::init::normal_(e->weight, 0.0, 0.02);
    }
  }
}

int64_t or_default(int64_t v, int64_t d) { return v > 0 ? v : d; }

struct Shape {
  int64_t layers, width, heads;
};
Shape shape_of(const ModelOptions& o, Shape d) {
  const int64_t width = or_default(o.width, d.width);
  Shape s{or_default(o.layers, d.layers), width,
          or_default(o.heads, o.width > 0 ? std::max<int64_t>(1, width / 64) : d.heads)};
  if (s.width % s.heads != 0)
    throw std::invalid_argument("transformer width " + std::to_string(s.width) + " is not a multiple of its " +
                                std::to_string(s.heads) + " heads");
  if (o.dropout < 0 || o.dropout >= 1)
    throw std::invalid_argument("dropout must be in [0, 1), not " + std::to_string(o.dropout));
  return s;
}

// A ViT's patch size for `o`'s image, which it must divide.
int64_t check_patches(const ModelOptions& o) {
  const int64_t h = o.image_height, w = o.image_width;
  const int64_t patch = o.patch_size > 0 ? o.patch_size : std::max(h, w) <= 64 ? 4 : 16;
  if (h % patch || w % patch)
    throw std::invalid_argument("vit: image size " + std::to_string(h) + "x" + std::to_string(w) +
                                " is not a multiple of the patch size " + std::to_string(patch));
  return patch;
}

class ViT : public Model {
 public:
  ViT(int64_t in_channels, int64_t classes, const ModelOptions& o, Shape s) {
    height_ = o.image_height;
    width_ = o.image_width;
    if (height_ < 1 || width_ < 1)
      throw std::invalid_argument("vit: image size " + std::to_string(height_) + "x" + std::to_string(width_) +
                                  " must be positive");
    patch_ = check_patches(o);
    const int64_t tokens = (height_ / patch_) * (width_ / patch_) + (o.class_token ? 1 : 0);
    patch_embed = register_module(
        "patch_embed", QConv2d(nn::Conv2dOptions(in_channels, s.width, patch_).stride(patch_)));
    if (o.class_token) cls_token = register_parameter("cls_token", torch::zeros({1, 1, s.width}));
    pos_embed = register_parameter("pos_embed", torch::randn({1, tokens, s.width}) * 0.02);
    drop = register_module("drop", QDropout(nn::DropoutOptions(o.dropout)));
    layers = register_module("blocks", blocks(s.layers, s.width, s.heads, /*causal=*/false, o.dropout));
    norm = register_module("norm", QLayerNorm(nn::LayerNormOptions({s.width})));
    head = register_module("head", QLinear(nn::LinearOptions(s.width, classes)));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    if (x.dim() != 4 || x.size(2) != height_ || x.size(3) != width_)
      throw std::invalid_argument("vit: expected images [B, C, " + std::to_string(height_) + ", " +
                                  std::to_string(width_) + "], got " + c10::str(x.sizes()));
    torch::Tensor h = patch_embed(x);                   // [B, D, H/p, W/p]
    h = h.flatten(2).transpose(1, 2).contiguous();      // [B, N, D]
    if (cls_token.defined()) h = torch::cat({cls_token.to(h.scalar_type()).expand({h.size(0), 1, h.size(2)}), h}, 1);
    h = h + pos_embed;
    h = drop(h);
    h = run_blocks(layers, std::move(h), recomputes_blocks());
    h = norm(h);
    h = cls_token.defined() ? h.select(1, 0) : h.mean(1);
    return head(h);
  }

  QConv2d patch_embed{nullptr};
  torch::Tensor cls_token, pos_embed;
  QDropout drop{nullptr};
  nn::ModuleList layers{nullptr};
  QLayerNorm norm{nullptr};
  QLinear head{nullptr};

 private:
  int64_t height_, width_, patch_;
};

class GPT : public Model {
 public:
  GPT(int64_t vocabulary, const ModelOptions& o, Shape s) : context_(o.context) {
    if (context_ < 1) throw std::invalid_argument("gpt: context must be positive, not " + std::to_string(context_));
    tok_embed = register_module("tok_embed", QEmbedding(nn::EmbeddingOptions(vocabulary, s.width)));
    pos_embed = register_module("pos_embed", QEmbedding(nn::EmbeddingOptions(context_, s.width)));
    drop = register_module("drop", QDropout(nn::DropoutOptions(o.dropout)));
    layers = register_module("blocks", blocks(s.layers, s.width, s.heads, /*causal=*/true, o.dropout));
    norm = register_module("norm", QLayerNorm(nn::LayerNormOptions({s.width})));
    head = register_module("head", QLinear(nn::LinearOptions(s.width, vocabulary).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& tokens) override {
    if (tokens.dim() != 2 || tokens.scalar_type() != torch::kLong)
      throw std::invalid_argument("gpt: expected int64 tokens [B, T], got " + std::string(c10::toString(tokens.scalar_type())) +
                                  " " + c10::str(tokens.sizes()));
    if (tokens.size(1) > context_)
      throw std::invalid_argument("gpt: " + std::to_string(tokens.size(1)) + " tokens exceed the context of " +
                                  std::to_string(context_));
    const torch::Tensor positions = torch::arange(tokens.size(1), tokens.options());
    torch::Tensor h = tok_embed(tokens);
    h = h + pos_embed(positions);
    h = drop(h);
    h = run_blocks(layers, std::move(h), recomputes_blocks());
    h = norm(h);
    return head(h);
  }

  QEmbedding tok_embed{nullptr}, pos_embed{nullptr};
  QDropout drop{nullptr};
  nn::ModuleList layers{nullptr};
  QLayerNorm norm{nullptr};
  QLinear head{nullptr};

 private:
  int64_t context_;
};

// The architecture's own layers, width and heads; false for a non-transformer.
bool default_shape(const std::string& arch, Shape& d) {
  if (arch == "vit_tiny") d = Shape{12, 192, 3};
  else if (arch == "vit_small") d = Shape{12, 384, 6};
  else if (arch == "gpt_small") d = Shape{12, 768, 12};
  else return false;
  return true;
}

}  // namespace

ModelOptions resolved_shape(const std::string& arch, const ModelOptions& o) {
  ModelOptions r = o;
  Shape d{};
  if (!default_shape(arch, d)) return r;
  const Shape s = shape_of(o, d);
  r.layers = s.layers, r.width = s.width, r.heads = s.heads;
  return r;
}

void check_transformer(const std::string& arch, const ModelOptions& o) {
  Shape d{};
  if (!default_shape(arch, d)) return;
  shape_of(o, d);
  if (arch != "gpt_small" && o.image_height > 0 && o.image_width > 0) check_patches(o);
}

ModelPtr build_transformer(const std::string& arch, int64_t in_channels, int64_t num_classes,
                           const ModelOptions& o) {
  Shape d{};
  if (!default_shape(arch, d)) return nullptr;
  const Shape s = shape_of(o, d);
  ModelPtr m = arch == "gpt_small" ? ModelPtr(std::make_shared<GPT>(num_classes, o, s))
                                   : ModelPtr(std::make_shared<ViT>(in_channels, num_classes, o, s));
  init_transformer(*m, s.layers);
  m->set_recompute_blocks(o.recompute_blocks);
  return m;
}

ModelOptions options_from_parameters(const std::string& arch,
                                     const std::vector<std::pair<std::string, torch::Tensor>>& parameters) {
  ModelOptions o;
  std::map<std::string, torch::Tensor> p(parameters.begin(), parameters.end());
  auto dim = [&](const std::string& name, int64_t d) -> int64_t {
    const auto it = p.find(name);
    return it != p.end() && it->second.dim() > d ? it->second.size(d) : 0;
  };
  int64_t layers = 0;
  while (p.count("blocks." + std::to_string(layers) + ".ln1.weight")) ++layers;
  if (arch == "vit_tiny" || arch == "vit_small") {
    o.layers = layers;
    o.width = dim("pos_embed", 2);
    o.class_token = p.count("cls_token") > 0;
    o.patch_size = dim("patch_embed.weight", 2);
    const int64_t patches = dim("pos_embed", 1) - (o.class_token ? 1 : 0);
    const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(std::max<int64_t>(0, patches)))));
    o.image_height = o.image_width = side * o.patch_size;
  } else if (arch == "gpt_small") {
    o.layers = layers;
    o.width = dim("pos_embed.weight", 1);
    o.context = dim("pos_embed.weight", 0);
  }
  return o;
}

}  // namespace aq::models::detail
