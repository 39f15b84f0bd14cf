#include "aq/loss.h"

#include <torch/nn/functional/loss.h>

#include <stdexcept>

namespace aq::train {

torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets, double label_smoothing,
                            bool sum) {
  namespace F = torch::nn::functional;
  auto options = F::CrossEntropyFuncOptions().label_smoothing(label_smoothing);
  if (sum) options.reduction(torch::kSum);
  auto x = logits.to(torch::kFloat);
  if (x.dim() == 3) {
    if (targets.dim() != 2 || targets.size(0) != x.size(0) || targets.size(1) != x.size(1))
      throw std::invalid_argument("cross_entropy: logits [B, T, V] need targets [B, T]");
    return F::cross_entropy(x.flatten(0, 1), targets.flatten(), options);
  }
  return F::cross_entropy(x, targets, options);
}

torch::Tensor correct(const torch::Tensor& logits, const torch::Tensor& targets) {
  return logits.argmax(-1).eq(targets).sum();
}

bool takes_tokens(const std::string& arch) { return arch.rfind("gpt", 0) == 0; }

}  // namespace aq::train
