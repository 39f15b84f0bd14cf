// The training step, one for every tool: aq-train trains with it, aq-eval's
// and aq-train's evaluation share its autocast, aq-variance and aq-calibrate
// take its gradients, aq-bench times and measures it.
#pragma once

#include "aq/adaptive.h"
#include "aq/config.h"
#include "aq/models.h"

#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace aq::train {

class GraphSafeOptimizer;

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
  // CUDA graphs (docs/step-speed.md): after `graph_warmup` eager steps the
  // step (forward, loss, backward, the optimizer's update) is captured once
  // per batch shape and replayed, so that the host no longer sets the pace.
  // The per-layer reallocation then runs before each capture, every
  // `graph_refresh` steps, instead of after every step; the per-sample
  // allocation inside each layer still runs in every step.  Where a step
  // cannot be captured (not CUDA, fp16 loss scaling, L4/L5 swapping,
  // BatchNorm without momentum, recomputed blocks with dropout, an optimizer
  // that is not a GraphSafeOptimizer, a capture that fails) it runs eagerly,
  // said once in the log.
  bool cuda_graphs = false;
  int64_t graph_refresh = 200;
  int64_t graph_warmup = 3;
  // The batch indices are below this (a dataset's size): sizes every
  // layer's per-sample statistics before a capture.  0: unknown; adaptive
  // layers with per-sample gradient statistics are then not captured.
  int64_t index_bound = 0;
  // Gradients scaled to this global L2 norm at most before the update
  // (aq/optim.h's clip_grad_norm); 0: not clipped.
  double clip_grad_norm = 0;
  // Called with the loss (scaled under fp16) just before its backward: a
  // data-parallel run readies its gradient all-reduce here (aq/dist.h).
  std::function<void(const torch::Tensor& loss)> before_backward;
  // A data-parallel run's gather over the ranks (aq/adaptive.h): the
  // adaptive layers' gradient statistics are then updated from every rank's
  // after each backward (share_gradient_stats) and the per-layer
  // reallocation decides from every rank's units, so that all ranks keep
  // the same statistics and budgets.  Steps then run eagerly.
  AllGather all_gather;
};

struct StepResult {
  torch::Tensor loss;        // float, 0-d, detached (on the device: no wait)
  torch::Tensor logits;      // float [N, classes] (token models: [B, T, V]), detached
  torch::Tensor labels;      // the batch's labels (token models: targets [B, T]) on the device
  int64_t activations = 0;   // bytes the forward and loss left allocated for backward
  int64_t aq_saved = 0;      // with count_saved: bytes aq's layers kept
  bool updated = false;      // the optimizer stepped (not skipped by the fp16 scaler, or none given)
  bool replayed = false;     // ran as a CUDA graph (captured now or before)
};

// One step: gradients cleared, the batch's dataset indices set for the
// adaptive layers, forward under autocast, cross-entropy in fp32 (per token
// for token models: aq/loss.h), backward
// (scaled under fp16 autocast), the optimizer's update when one is given
// (else the gradients stay in the parameters' grad), gradient clipping
// before it when asked, and the per-layer
// reallocation of adaptive bits.  Memory figures come from aq/memory.h
// (install_cpu_memory_counter() for the CPU's).
// With cuda_graphs, the step's outputs are copies (the graph's own are
// overwritten by the next replay) and the parameters' gradients live in the
// graph's memory.
class Step {
 public:
  Step(models::Model& model, const c10::Device& device, StepOptions options);
  ~Step();
  Step(const Step&) = delete;
  Step& operator=(const Step&) = delete;
  StepResult operator()(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                        torch::optim::Optimizer* optimizer = nullptr);
  // Why steps run eagerly although cuda_graphs asked for graphs ("" if they
  // do not, or graphs were not asked for).
  const std::string& eager_reason() const { return eager_reason_; }
  // Graphs captured so far (each batch shape and each refresh is one).
  int64_t captures() const { return captures_; }
  const StepOptions& options() const { return options_; }
  // The fp16 scaler (null unless amp is fp16).
  GradScaler* scaler() { return scaler_ ? &*scaler_ : nullptr; }

 private:
  models::Model& model_;
  c10::Device device_;
  StepOptions options_;
  bool reallocates_;
  bool shares_stats() const { return static_cast<bool>(options_.all_gather); }
  std::vector<torch::Tensor> params_;
  std::optional<GradScaler> scaler_;
  struct Graph;  // the captured step (CUDA builds)
  std::unique_ptr<Graph> graph_;
  std::string eager_reason_;
  int64_t captures_ = 0;
  // The forward under autocast and the loss in fp32, with what they left
  // allocated and what aq's layers kept (with count_saved).
  struct Forward {
    torch::Tensor logits, loss;
    int64_t activations = 0, aq_saved = 0;
  };
  Forward forward_loss(const torch::Tensor& x, const torch::Tensor& y);
  StepResult eager(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                   torch::optim::Optimizer* optimizer, bool reallocate);
  StepResult graphed(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                     torch::optim::Optimizer* optimizer);
  void capture_step(const torch::Tensor& x, const torch::Tensor& labels, const torch::Tensor& indices,
                    GraphSafeOptimizer* update);
  void fall_back(const std::string& why);
};

}  // namespace aq::train
