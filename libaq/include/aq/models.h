// ActNN's architectures, built from aq's layers so that the quantization
// configuration (QModule) decides what is compressed:
//   preact_resnet20/32/44/56/110 (basic blocks), preact_resnet164/1001
//   (bottlenecks): CIFAR-style pre-activation ResNets (3x3 stem, three stages
//   of 16/32/64 channels, x4 for bottlenecks);
//   resnet18/34 (basic), resnet50/101/152 (bottleneck, stride on the 3x3):
//   ImageNet-style ResNets (7x7 stem and max pooling), torchvision's names.
// Input channels and the class count come from the dataset; any input size
// works (global average pooling before the classifier).
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
};
using ModelPtr = std::shared_ptr<Model>;

// Builds `arch` (see architectures()); throws std::invalid_argument for an
// unknown name or bad channel/class counts.  Convolutions get Kaiming
// normal fan-in initialisation (ActNN's `-c fanin` scheme), BatchNorm
// weight 1 and bias 0; the last BatchNorm of each residual branch of the
// ImageNet-style nets starts at 1 as well (no zero-init trick).
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes);

// Builds and applies the configuration: QModule(model, config).
ModelPtr build(const std::string& arch, int64_t in_channels, int64_t num_classes, const QuantConfig& config);

const std::vector<std::string>& architectures();

}  // namespace aq::models
