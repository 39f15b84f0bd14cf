// What one layer's compression reads and records, shared between a module
// and the autograd nodes of its forwards.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace aq {

struct PendingBudgets;  // aq/adaptive.h: per-step reallocation's result

// What one layer's compression reads and records, for the adaptive scheme
// and for memory accounting.  Shared between a module and its autograd nodes
// (an intrusive pointer, so that autograd contexts can hold it).
struct LayerState : torch::CustomClassHolder {
  // Per-sample bits (int, [N], 1..8) for the next forward, set by hand;
  // undefined: adaptive allocation when ibits > cabits (aq/sample_bits.h), else
  // the configuration's uniform `cabits`.
  at::Tensor bits;
  // Adaptive layers only (ibits > cabits), of the last compressed input: per
  // sample, the sum over its groups of (mx - mn)^2, i.e. ||R_n||^2 (float
  // [N], on the input's device).
  at::Tensor range_sq;
  // Adaptive layers only, of the last backward: per sample, ||dL/dy_n||^2 of
  // the output gradient.
  at::Tensor grad_sq;
  // Elements per sample of the last compressed input.
  int64_t sample_elements = 0;
  // Elements per group of the last compressed input (0: the configuration's
  // group_size).  A LayerNorm whose rows are shorter than the configured
  // groups compresses in smaller ones; its variance per unit of range_sq
  // scales with the size it used.
  int64_t group_size = 0;
  // Bytes the last forward kept for backward (compressed data, bounds, masks,
  // BatchNorm statistics).
  int64_t saved_bytes = 0;

  // Adaptive precision (docs/design.md §5; aq/sample_bits.h), used when the
  // configuration has ibits > cabits.  Filled by the layer's forward:
  int64_t kernel_area = 1, conv_groups = 1, in_channels = 1;  // conv/linear geometry
  bool batch_norm = false;   // BatchNorm: no gradient term in the sensitivity
  at::Tensor indices;        // dataset indices of the last forward's samples (CPU int64 [N])
  at::Tensor last_bits;      // per-sample bits the last forward chose (int32 [N], on its device)
  // Average bits for the next forward (0: cabits); set by adapt_layers().
  double budget = 0;
  // The budget a deferred adapt_layers() computed and has not applied yet
  // (its host copy, shared by the model's layers, and this layer's entry).
  std::shared_ptr<PendingBudgets> pending;
  size_t pending_unit = 0;
  // Kept by a model's first adaptive layer for adapt_layers(): the weight of
  // each (layer, sample) unit (the layer's elements per sample), layer after
  // layer, for the shapes in `unit_key` (each layer's units and elements).
  at::Tensor unit_weights;
  std::vector<int64_t> unit_key;
  // Sharing (a tensor saved by several layers is compressed once): the
  // layer whose copy this one used in its last forward (null: its own), and
  // the layers that used this one's; their sensitivities add to this
  // layer's when its bits are allocated.
  // (shared_from identifies the owner and is never dereferenced; sharers
  // are weak: a layer may outlive the model of a layer that shared with it.)
  const LayerState* shared_from = nullptr;
  std::vector<c10::weak_intrusive_ptr<LayerState>> sharers;
  // Gradient statistics: per dataset index, the running average of
  // ||dL/dy_n||^2 (usegradient; -1: not seen yet), or the batch mean of the
  // last backward (float, 0-d; !usegradient).  On the layer's device.
  at::Tensor sample_stat, grad_mean;
  // Data-parallel runs (aq/adaptive.h, share_gradient_stats): when set, a
  // backward records grad_sq but leaves the statistics alone, noting here
  // the update it would have made, which share_gradient_stats then makes on
  // every rank from all the ranks' grad_sq: the ranks' tables stay equal.
  bool share_stats = false;
  struct DueStats {
    bool usegradient = true;
    at::Tensor indices;  // of grad_sq's samples (undefined: the batch mean only)
  };
  std::optional<DueStats> due_stats;

  // Runs when the last owner lets go.  Weak references (the compressions a
  // thread remembers for sharing, other layers' sharers) keep only the
  // object's shell: what it holds, device memory included, goes now, not
  // when the last weak reference does (a thread's exit, after the CUDA
  // runtime's own teardown there).
  void release_resources() override {
    bits = range_sq = grad_sq = indices = last_bits = sample_stat = grad_mean = unit_weights = at::Tensor();
    pending.reset();
    sharers.clear();
    due_stats.reset();
  }
};
using LayerStatePtr = c10::intrusive_ptr<LayerState>;
inline LayerStatePtr make_layer_state() { return c10::make_intrusive<LayerState>(); }

}  // namespace aq
