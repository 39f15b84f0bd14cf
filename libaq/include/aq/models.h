// ActNN's architectures, built from aq's layers so that the quantization
// configuration (QModule) decides what is compressed:
//   preact_resnet20/32/44/56/110 (basic blocks), preact_resnet164/1001
//   (bottlenecks): CIFAR-style pre-activation ResNets (3x3 stem, three stages
//   of 16/32/64 channels, x4 for bottlenecks);
//   resnet18/34 (basic), resnet50/101/152 (bottleneck, stride on the 3x3):
//   ImageNet-style ResNets (7x7 stem and max pooling), torchvision's names.
//   vit_tiny (192 wide, 12 layers, 3 heads), vit_small (384, 12, 6): Vision
//   Transformers (patch embedding, learned position embeddings, pre-norm
//   blocks, a class token or mean pooling); images [B, C, H, W] of the size
//   in ModelOptions, logits [B, classes].
//   gpt_small: a GPT-2-style decoder (768 wide, 12 layers, 12 heads,
//   context 1024): int64 tokens [B, T] (T <= context, values below the
//   vocabulary), logits [B, T, vocabulary]; its vocabulary is num_classes
//   and in_channels is not read.
// Input channels and the class count come from the dataset; the ResNets take
// any input size (global average pooling before the classifier).
#pragma once

#include "aq/config.h"

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

namespace aq::models {

class Model : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  // Activation checkpointing (aq/recompute.h): each block (a ResNet's
  // residual block, a transformer block) keeps only its input for backward
  // and is run again there.  For a model whose layers do not compress: a
  // compressing layer would compress in the recomputation as well.
  void set_recompute_blocks(bool on) { recompute_blocks_ = on; }
  bool recomputes_blocks() const { return recompute_blocks_; }

 private:
  bool recompute_blocks_ = false;
};
using ModelPtr = std::shared_ptr<Model>;

// What the transformers take besides channels and classes (0: the
// architecture's own), and what every architecture takes.
struct ModelOptions {
  int64_t image_height = 224, image_width = 224;  // ViT: the images' size
  int64_t patch_size = 0;  // ViT: 0: 4 for images up to 64 pixels a side, else 16
  bool class_token = true;  // ViT: classify the class token (false: the mean of the patch tokens)
  int64_t context = 1024;   // GPT: the longest sequence
  // 0: the architecture's own; heads: width / 64 (64-wide heads) when the
  // width is given and the heads are not.
  int64_t layers = 0, width = 0, heads = 0;
  double dropout = 0;       // after embeddings, attention and MLP (GPT and ViT)
  bool recompute_blocks = false;  // Model::set_recompute_blocks
};

// Builds `arch` (see architectures()); throws std::invalid_argument for an
// unknown name or bad channel/class counts.  Convolutions get Kaiming
// normal fan-in initialisation (ActNN's `-c fanin` scheme), BatchNorm
// weight 1 and bias 0; the last BatchNorm of each residual branch of the
// ImageNet-style nets starts at 1 as well (no zero-init trick).
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes);
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const ModelOptions& options);

// Builds and applies the configuration: QModule(model, config); throws
// std::invalid_argument for recompute_blocks with a configuration that
// compresses.
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const QuantConfig& config);
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const ModelOptions& options,
               const QuantConfig& config);

// The options a transformer of `arch` was built with, read off its
// parameters (name, tensor), as a checkpoint holds them: layers, width,
// context, patch size, class token, and a square image of the patch grid's
// size; heads as the width implies (see ModelOptions).  Default options for
// any other architecture.
ModelOptions options_from_parameters(const std::string& arch,
                                     const std::vector<std::pair<std::string, torch::Tensor>>& parameters);

// The layers, width and heads a transformer of `arch` is built with from
// `options` (its zeros resolved as build() resolves them); `options`
// unchanged for any other architecture.  Throws std::invalid_argument as
// build() does for heads that do not divide the width.
ModelOptions resolved_shape(const std::string& arch, const ModelOptions& options);

// Whether `arch` is a transformer that reads images (vit_*) or tokens (gpt_*).
bool is_vit(const std::string& arch);
bool is_gpt(const std::string& arch);
bool is_transformer(const std::string& arch);  // either

// What the tools refuse: a transformer's shape (layers, width, heads,
// dropout) for another architecture, and no class token for all but the
// ViTs.  Throws std::invalid_argument naming the options (build() ignores
// what an architecture does not take); also for what build() would refuse
// in a transformer's options (heads that do not divide the width, dropout
// outside [0, 1), a ViT's image size, when set, not a multiple of its patch).
void check_options(const std::string& arch, const ModelOptions& options);
const std::vector<std::string>& architectures();

}  // namespace aq::models
