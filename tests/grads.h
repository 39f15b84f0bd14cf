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
  c.attention_bits = 0;  // attention at b bits too
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

// Per leaf, over S draws of grads(f): the elementwise mean and sample
// standard deviation (double).
struct Draws {
  std::vector<torch::Tensor> mean, sd;
};
inline Draws draw_grads(const std::function<torch::Tensor()>& f, const std::vector<torch::Tensor>& leaves,
                        const torch::Tensor& probe, int S) {
  std::vector<torch::Tensor> sum, sq;
  for (int s = 0; s < S; ++s) {
    const auto g = grads(f, leaves, probe);
    sum.resize(g.size()), sq.resize(g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      const auto gd = g[i].to(torch::kDouble);
      sum[i] = s ? sum[i] + gd : gd;
      sq[i] = s ? sq[i] + gd * gd : gd * gd;
    }
  }
  Draws d;
  for (size_t i = 0; i < sum.size(); ++i) {
    d.mean.push_back(sum[i] / S);
    d.sd.push_back(torch::sqrt(torch::clamp_min(sq[i] / S - d.mean[i] * d.mean[i], 0) * S / (S - 1)));
  }
  return d;
}
