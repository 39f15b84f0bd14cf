// Adaptive precision across a model (docs/design.md §5): bits per layer,
// reallocated once per step after backward, and the adaptive state that
// checkpoints keep.  The bits of each sample inside a layer are chosen in
// its forward (aq/sample_bits.h).
//
// A training loop (aq::train::Step does it) tells aq which dataset samples
// the batch holds (set_batch_indices) before the forward, and calls
// adapt_layers(model) after the backward when the configuration is
// per-layer.
#pragma once

#include "aq/config.h"
#include "aq/layer_state.h"
#include "aq/sample_bits.h"

#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace aq {

// Per-layer reallocation across the model's adaptive conv/linear layers
// (perlayer): units are (layer, sample) weighted by elements per sample,
// budget cabits x all elements; each layer's next budget is the mean of its
// samples' bits.  Allocates on the device.  Returns the number of layers
// involved.
//
// defer = false: the budgets are read back (a wait for the device) and set
// now.  defer = true (training loops): they are copied to the host without
// waiting and set by the next call, which applies them before computing its
// own; a step then waits for nothing, and a budget takes effect one step
// later (the forward after next).  Checkpoints keep the pending budgets
// (adaptive_state), so a resumed run continues exactly.
int64_t adapt_layers(torch::nn::Module& model, bool defer = false);
// Sets the budgets a deferred adapt_layers() left pending (waiting for their
// copy if it has not finished).
void apply_pending_budgets(torch::nn::Module& model);

// Per-layer summary of what the last forward chose, for reports.
struct LayerBits {
  std::string name;
  int64_t elements = 0;      // per sample
  double sensitivity = 0;    // mean over the last batch's samples
  double bits = 0;           // mean bits of the last forward
  double budget = 0;         // the layer's budget for the next forward
  std::string shares;        // the layer whose compressed copy of the same input it used ("" : its own)
};
std::vector<LayerBits> layer_bits(torch::nn::Module& model);

// The adaptive state of every aq layer (budgets and gradient statistics) as
// named tensors "<layer>.aq_budget", "<layer>.aq_budget_next" (a deferred
// budget not applied yet), "<layer>.aq_sample_stat", "<layer>.aq_grad_mean"
// (on the CPU) and "<layer>.aq_shared_from" (uint8: the name of the layer
// whose compressed copy it used last), for checkpoints; and back.  Loading
// also records every layer's geometry (QLayer::record_geometry), so that
// the first step after it allocates exactly as the run that saved it.
std::vector<std::pair<std::string, at::Tensor>> adaptive_state(torch::nn::Module& model);
void load_adaptive_state(torch::nn::Module& model, const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace aq
