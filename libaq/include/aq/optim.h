// The optimizer and learning-rate schedules of ActNN's training recipe.
#pragma once

#include <torch/optim/sgd.h>

#include <cstdint>
#include <string>
#include <vector>

namespace aq::train {

// LibTorch's SGD (momentum, dampening, Nesterov, weight decay: the same
// options, the same state, so checkpoints do not change) with the update
// made by LibTorch's multi-tensor kernels (at::_foreach_*), as PyTorch's
// own SGD makes it by default: a few launches per step for all the
// parameters of a device and dtype instead of two or three per parameter.
// Gradients are not modified.
class SGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
};

enum class Schedule { kOneCycle, kCosine, kStep, kConstant };
Schedule parse_schedule(const std::string& s);  // onecycle, cosine, step, constant
std::string to_string(Schedule s);

struct LrSchedule {
  Schedule kind = Schedule::kOneCycle;
  double lr = 0.1;                  // peak
  double warmup = 0;                // epochs of linear warm-up (cosine, step, constant)
  std::vector<double> milestones;   // step: epochs where lr drops 10x (default 50%, 75% of epochs)
  int64_t epochs = 20;
  // The lr of optimizer step t (0-based) of `total`, `per_epoch` per epoch.
  // onecycle is PyTorch's OneCycleLR: cosine from lr/25 up to lr over the
  // first 30% of the steps, then down to lr/25/1e4.
  double at(int64_t t, int64_t total, int64_t per_epoch) const;
};

}  // namespace aq::train
