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

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace aq {

// Data-parallel runs (docs/distributed.md): every rank's `tensor` (the same
// shape and device on each) stacked along a new first dimension in rank
// order, as aq::dist::Group::all_gather.  The functions that take one are
// called by every rank, on the same model, after the same step.
using AllGather = std::function<at::Tensor(const at::Tensor&)>;

// Marks every aq layer of `model`: on, its backward leaves the gradient
// statistics to share_gradient_stats; off (the default), it updates them
// itself.
void set_shared_gradient_stats(torch::nn::Module& model, bool on);

// After each backward of a model marked so: every rank's per-sample squared
// output-gradient norms of each adaptive layer are gathered, scaled by
// 1/ranks^2 (a rank's loss is its own batch's mean, 1/ranks of the union
// batch's), and every rank updates its statistics from all of them, keyed
// by dataset index, in rank order: each then holds what one process over
// the union batch (rank 0's samples first) would, and a sample's history is
// there for whichever rank sees it next.  index_bound > 0 (the dataset's
// size) sizes the tables without reading indices back from a device.  A
// null gather: this process's update alone.
void share_gradient_stats(torch::nn::Module& model, const AllGather& gather = {}, int64_t index_bound = 0);

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
//
// gather (data-parallel runs, see AllGather above): every rank's units of
// its last batch take part, each layer's in rank order, so that every rank
// computes the same budgets, those of one process over the union batch.
int64_t adapt_layers(torch::nn::Module& model, bool defer = false, const AllGather& gather = {});
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
