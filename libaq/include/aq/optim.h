// The optimizers (ActNN's SGD, and AdamW for transformers), learning-rate
// schedules, gradient clipping, and the optimizer state as checkpoints keep it.
#pragma once

#include "aq/checkpoint.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/types.h>

#include <memory>
#include <utility>

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

 protected:
  // step(closure): the closure's loss, then sync() and update().
  torch::Tensor step_with(const torch::optim::Optimizer::LossClosure& closure);
  // The lr of a parameter group on a CUDA device (float: what the fused kernels read).
  at::Tensor& lr_on(size_t group, const c10::Device& device);
  // Sets lr_on() of every group on every CUDA device holding its parameters.
  void sync_lr(const std::vector<torch::optim::OptimizerParamGroup>& groups);

 private:
  std::map<std::tuple<size_t, c10::DeviceType, c10::DeviceIndex>, at::Tensor> lr_;
};

class SGD : public torch::optim::SGD, public GraphSafeOptimizer {
 public:
  using torch::optim::SGD::SGD;
  torch::Tensor step(LossClosure closure = nullptr) override;
  void sync() override;
  void update() override;
  bool ready() const override;
};

// LibTorch's AdamW (decoupled weight decay, bias-corrected moments, amsgrad:
// the same options and state, AdamWParamState) with the update made by
// LibTorch's multi-tensor kernels: the same operations in the same order as
// torch::optim::AdamW::step, on lists of the parameters that share a device,
// dtype and step count.  Gradients are not modified.  On CUDA, parameters
// alike their gradients and moments are updated by one fused launch per
// device and dtype (at::_fused_adamw_), reading the learning rate and each
// parameter's step count from device memory, so that a CUDA graph can
// capture it: update() counts the steps on the device, sync() on the host
// (AdamWParamState::step, what checkpoints keep).  Not ready() while a
// parameter with a gradient would take the multi-tensor path, whose lr and
// bias corrections a capture would keep.
class AdamW : public torch::optim::AdamW, public GraphSafeOptimizer {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;
  void sync() override;
  void update() override;
  bool ready() const override;
};

enum class OptimizerKind { kSGD, kAdamW };
OptimizerKind parse_optimizer(const std::string& s);  // sgd, adamw
std::string to_string(OptimizerKind k);

// What aq-train builds an optimizer from.
struct OptimizerOptions {
  OptimizerKind kind = OptimizerKind::kSGD;
  double lr = 0.1, weight_decay = 1e-4;
  double momentum = 0.9;  // SGD
  bool nesterov = true;   // SGD, with momentum
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // AdamW
};
std::unique_ptr<torch::optim::Optimizer> make_optimizer(std::vector<torch::Tensor> params,
                                                        const OptimizerOptions& options);
// Sets the learning rate of every parameter group (SGD or AdamW).
void set_lr(torch::optim::Optimizer& optimizer, double lr);

// The optimizer's per-parameter state as checkpoints keep it, by parameter
// name: "<name>.momentum_buffer" (SGD); "<name>.exp_avg", "<name>.exp_avg_sq",
// "<name>.max_exp_avg_sq" (amsgrad) and "<name>.step" (int64, 0-d) (AdamW).
ckpt::Tensors optimizer_state(torch::optim::Optimizer& optimizer,
                              const std::vector<std::pair<std::string, torch::Tensor>>& named_params);
// Restores what optimizer_state() wrote; entries of parameters that have no
// state yet are left out.  Throws std::runtime_error naming `source` for a
// shape that does not fit or a step count below 1.
void load_optimizer_state(torch::optim::Optimizer& optimizer,
                          const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                          const ckpt::Tensors& state, const std::string& source);

// Scales the gradients of `params` in place so that their global L2 norm is
// at most `max_norm`, as torch.nn.utils.clip_grad_norm_ does (coefficient
// max_norm / (norm + 1e-6), clamped to 1), without reading anything back
// from the device.  Returns the norm before clipping (float, 0-d, on the
// device); undefined when no parameter has a gradient.
torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

enum class Schedule { kOneCycle, kCosine, kStep, kConstant };
Schedule parse_schedule(const std::string& s);  // onecycle, cosine, step, constant
std::string to_string(Schedule s);

struct LrSchedule {
  Schedule kind = Schedule::kOneCycle;
  double lr = 0.1;                  // peak
  double warmup = 0;                // epochs of linear warm-up (cosine, step, constant)
  int64_t warmup_steps = 0;         // steps of linear warm-up, in place of `warmup` when > 0
  std::vector<double> milestones;   // step: epochs where lr drops 10x (default 50%, 75% of epochs)
  int64_t epochs = 20;
  // The lr of optimizer step t (0-based) of `total`, `per_epoch` per epoch.
  // onecycle is PyTorch's OneCycleLR: cosine from lr/25 up to lr over the
  // first 30% of the steps, then down to lr/25/1e4.  The others rise
  // linearly over the warm-up, lr * (t + 1) / warm-up steps; cosine then
  // falls from lr to 0 at step `total` over the steps left.
  double at(int64_t t, int64_t total, int64_t per_epoch) const;
};

}  // namespace aq::train
