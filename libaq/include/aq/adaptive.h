// Adaptive precision (ALGORITHM.md 5): bits per sample inside a layer, chosen
// in each forward from the sample's group ranges and gradient statistics,
// and bits per layer, reallocated once per step after backward.
//
// A training loop tells aq which dataset samples the batch holds
// (set_batch_indices) before the forward, and calls adapt_layers(model)
// after the backward when the configuration is per-layer.
#pragma once

#include "aq/config.h"
#include "aq/functional.h"

#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace aq {

// The dataset indices of the samples of the next forward passes in this
// thread (CPU int64 [N]); an undefined tensor: unknown (usegradient then
// falls back to batch means).
void set_batch_indices(const at::Tensor& indices);
const at::Tensor& batch_indices();

// True when a configuration reallocates bits at all.
inline bool adaptive(const QuantConfig& c) { return c.compresses() && c.ibits > c.cabits; }

// Per-sample sensitivities C_n of a layer for its input's range_sq (float
// [N], ||R_n||^2) and `elements` per sample, with the layer's current
// gradient statistic for `indices` (undefined: batch mean): double [N] on
// range_sq's device (no wait for the device), or copied to the host.
at::Tensor sensitivity_tensor(const LayerState& st, const QuantConfig& c, const at::Tensor& range_sq,
                              int64_t elements, const at::Tensor& indices);
std::vector<double> sensitivities(const LayerState& st, const QuantConfig& c, const at::Tensor& range_sq,
                                  int64_t elements, const at::Tensor& indices);

// Per-sample bits for a forward: the layer's budget (its per-layer share, or
// cabits) times N, allocated from ibits by sensitivity on x's device, with
// nothing read back to the host.  Returns int32 [N] on x's device, records
// it in st.last_bits (with st.range_sq, st.sample_elements and st.indices)
// and, when `total` is given, stores their sum there (known on the host: the
// budget fixes it).  On CUDA (up to 4096 samples) it is one kernel, which
// also gives each sample's first packed word in *word_offset (else that is
// left undefined).
at::Tensor choose_bits(LayerState& st, const QuantConfig& c, const at::Tensor& x, int64_t* total = nullptr,
                       at::Tensor* word_offset = nullptr);

// After backward: updates the gradient statistics from grad_sq ([N]) of
// the samples at `indices` (or the batch mean).
void update_gradient_stats(LayerState& st, bool usegradient, const at::Tensor& grad_sq, const at::Tensor& indices);

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
// (on the CPU), for checkpoints; and back.
std::vector<std::pair<std::string, at::Tensor>> adaptive_state(torch::nn::Module& model);
void load_adaptive_state(torch::nn::Module& model, const std::vector<std::pair<std::string, at::Tensor>>& tensors);

}  // namespace aq
