// The training step, one for every tool: aq-train trains with it, aq-eval's
// and aq-train's evaluation share its autocast, aq-variance and aq-calibrate
// take its gradients, aq-bench times and measures it.
#pragma once

#include "aq/config.h"
#include "aq/models.h"

#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace aq::train {

enum class Amp { kOff, kBFloat16, kFloat16 };
Amp parse_amp(const std::string& s);  // off, bf16, fp16
std::string to_string(Amp a);

// Autocast on for a device's type while in scope (off: nothing changes);
// the previous state comes back, and the cast cache is cleared, on exit.
class AutocastScope {
 public:
  AutocastScope(const c10::Device& device, Amp amp);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool on_, prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::kBFloat16;
};

// Dynamic loss scaling for fp16 autocast, as PyTorch's GradScaler does it
// (LibTorch has none): scale 2^16, halved on a non-finite gradient, doubled
// after 2000 finite steps.
class GradScaler {
 public:
  explicit GradScaler(const c10::Device& device);
  const torch::Tensor& scale() const { return scale_; }
  // Unscales the gradients in place; false if any is not finite (the
  // update must be skipped).  Reads one flag back from the device.
  bool unscale(const std::vector<torch::Tensor>& params);

 private:
  torch::Tensor scale_, growth_tracker_;
};

struct StepOptions {
  Amp amp = Amp::kOff;
  double label_smoothing = 0;
  // The model's configuration: per-layer reallocation after backward when
  // it is adaptive and per-layer.
  QuantConfig quant;
  // Reallocated budgets take effect a step later, so that the step waits
  // for nothing (training, benchmarks); false: now (variance, calibration).
  bool defer_reallocation = true;
  // Also sum what aq's layers report keeping (StepResult::aq_saved).
  bool count_saved = false;
  // Called with the loss (scaled under fp16) just before its backward: a
  // data-parallel run readies its gradient all-reduce here (aq/dist.h).
  std::function<void(const torch::Tensor& loss)> before_backward;
};

struct StepResult {
  torch::Tensor loss;        // float, 0-d, detached (on the device: no wait)
  torch::Tensor logits;      // float [N, classes], detached
  torch::Tensor labels;      // the batch's labels on the device
  int64_t activations = 0;   // bytes the forward and loss left allocated for backward
  int64_t aq_saved = 0;      // with count_saved: bytes aq's layers kept
  bool updated = false;      // the optimizer stepped (not skipped by the fp16 scaler, or none given)
};

// One step: gradients cleared, the batch's dataset indices set for the
// adaptive layers, forward under autocast, cross-entropy in fp32, backward
// (scaled under fp16 autocast), the optimizer's update when one is given
// (else the gradients stay in the parameters' grad), and the per-layer
// reallocation of adaptive bits.  Memory figures come from aq/memory.h
// (install_cpu_memory_counter() for the CPU's).
class Step {
 public:
  Step(models::Model& model, const c10::Device& device, StepOptions options);
  StepResult operator()(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                        torch::optim::Optimizer* optimizer = nullptr);
  const StepOptions& options() const { return options_; }
  // The fp16 scaler (null unless amp is fp16).
  GradScaler* scaler() { return scaler_ ? &*scaler_ : nullptr; }

 private:
  models::Model& model_;
  c10::Device device_;
  StepOptions options_;
  bool reallocates_;
  std::vector<torch::Tensor> params_;
  std::optional<GradScaler> scaler_;
};

}  // namespace aq::train
