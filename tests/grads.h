// What the op tests compare: a uniform bit width, and the gradients of a
// function's output projected on a probe.
#pragma once

#include "aq/config.h"

#include <torch/torch.h>

#include <functional>
#include <vector>

// cabits = ibits = b: uniform precision, nothing reallocated.
inline aq::QuantConfig bits(int b) {
  aq::QuantConfig c;
  c.cabits = c.ibits = b;
  return c;
}

// Gradients of sum(f() * probe) with respect to `leaves`.
inline std::vector<torch::Tensor> grads(const std::function<torch::Tensor()>& f,
                                        const std::vector<torch::Tensor>& leaves, const torch::Tensor& probe) {
  for (auto t : leaves) t.mutable_grad() = torch::Tensor();
  auto out = f();
  (out * probe).sum().backward();
  std::vector<torch::Tensor> g;
  for (const auto& t : leaves) g.push_back(t.grad().clone());
  return g;
}
