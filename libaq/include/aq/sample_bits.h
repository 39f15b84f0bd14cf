// Adaptive precision inside a layer (docs/design.md §5): the bits of each
// sample, chosen in the forward from the sample's group ranges and gradient
// statistics within the layer's budget, and the gradient statistics its
// backward updates.
#pragma once

#include "aq/config.h"
#include "aq/layer_state.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace aq {

// The dataset indices of the samples of the next forward passes in this
// thread (int64 [N]); an undefined tensor: unknown (usegradient then falls
// back to batch means).  On the host (what a loader yields), or already on
// the device, as a CUDA graph's static input: then nothing about them is
// read back, and every layer's per-sample statistics must have been sized
// for them first (reserve_sample_stat).
void set_batch_indices(const at::Tensor& indices);
const at::Tensor& batch_indices();
// Sizes a layer's per-sample statistics for dataset indices below `size`
// on `device` (unseen samples marked as such), keeping what they hold.
void reserve_sample_stat(LayerState& st, int64_t size, const at::Device& device);

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
// the samples at `indices` (or the batch mean), in place once they exist
// (a CUDA graph's replays carry them from step to step).
void update_gradient_stats(LayerState& st, bool usegradient, const at::Tensor& grad_sq, const at::Tensor& indices);

}  // namespace aq
