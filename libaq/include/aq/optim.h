// The optimizer and learning-rate schedules of ActNN's training recipe.
#pragma once

#include <torch/optim/sgd.h>

#include <cstdint>
#include <map>
#include <tuple>
#include <string>
#include <vector>

namespace aq::train {

// LibTorch's SGD (momentum, dampening, Nesterov, weight decay: the same
// options, the same state, so checkpoints do not change) with the update
// made by LibTorch's multi-tensor kernels (at::_foreach_*), as PyTorch's
// own SGD makes it by default: a few launches per step for all the
// parameters of a device and dtype instead of two or three per parameter.
// Gradients are not modified.  On CUDA, once every parameter of a list has
// its momentum buffer, the update is one fused launch (at::_fused_sgd_)
// reading the learning rate from device memory, which is what lets a CUDA
// graph capture it (GraphSafeOptimizer).
class GraphSafeOptimizer {
 public:
  virtual ~GraphSafeOptimizer() = default;
  // Outside a graph: copy what changes between steps (the learning rate)
  // into the device memory that update() reads.
  virtual void sync() = 0;
  // The update alone; capturable once the state exists (after one step).
  virtual void update() = 0;
  // Whether update() makes no host decision that a replay would repeat
  // stale: every parameter with a gradient has its state.
  virtual bool ready() const = 0;
};

class SGD : public torch::optim::SGD, public GraphSafeOptimizer {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
  void sync() override;
  void update() override;
  bool ready() const override;

 private:
  // The lr of a parameter group on a CUDA device (float: what the fused kernel reads).
  at::Tensor& lr_on(size_t group, const c10::Device& device);
  std::map<std::tuple<size_t, c10::DeviceType, c10::DeviceIndex>, at::Tensor> lr_;
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
