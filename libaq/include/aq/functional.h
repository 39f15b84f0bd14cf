// Activation-compressed ops: the forward result is exactly LibTorch's; what
// autograd keeps for backward is a compressed copy (ALGORITHM.md 4), and
// backward runs LibTorch's own backward ops on the restored tensor.
#pragma once

#include "aq/compress.h"
#include "aq/config.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <optional>

namespace aq {

struct PendingBudgets;  // aq/adaptive.h

// What one layer's compression reads and records, for the adaptive scheme
// and for memory accounting.  Shared between a module and its autograd nodes
// (an intrusive pointer, so that autograd contexts can hold it).
struct LayerState : torch::CustomClassHolder {
  // Per-sample bits (int, [N], 1..8) for the next forward, set by hand;
  // undefined: adaptive allocation when ibits > cabits (aq/adaptive.h), else
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
  // Bytes the last forward kept for backward (compressed data, bounds, masks,
  // BatchNorm statistics).
  int64_t saved_bytes = 0;

  // Adaptive precision (ALGORITHM.md 5; aq/adaptive.h), used when the
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
};
using LayerStatePtr = c10::intrusive_ptr<LayerState>;
inline LayerStatePtr make_layer_state() { return c10::make_intrusive<LayerState>(); }

namespace functional {

// x [..., in] @ weight[out, in]^T + bias; saves x compressed.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const QuantConfig& config, const LayerStatePtr& state);

// at::convolution (1d/2d/3d, transposed or not, any groups); saves x compressed.
at::Tensor convolution(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       bool transposed, at::IntArrayRef output_padding, int64_t groups,
                       const QuantConfig& config, const LayerStatePtr& state);

// Training-mode batch norm (running statistics, which may be undefined,
// updated in place as LibTorch's); saves x compressed plus the per-channel
// mean and invstd.  overwrite_input: when x is compressed, the output is
// written over x (its compressed copy is all backward needs) and x is
// returned; only for an x nothing else reads afterwards.  (On CUDA that
// output comes from aq's own in-place kernel: LibTorch's values to the
// last bit or so.)
at::Tensor batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                      const at::Tensor& running_var, double momentum, double eps,
                      const QuantConfig& config, const LayerStatePtr& state, bool overwrite_input = false);

// max(x, 0); saves a 1-bit mask.  inplace: x is overwritten and returned.
// group_size > 0: the next layer compresses the output adaptively with
// groups of that size, and on CUDA the same pass may work out their ranges
// for it.
at::Tensor relu(const at::Tensor& x, bool inplace, const LayerStatePtr& state, int64_t group_size = 0);

// Inverted dropout with probability p in [0, 1]; saves a 1-bit mask.
at::Tensor dropout(const at::Tensor& x, double p, const LayerStatePtr& state);

// Max pooling over the last D = kernel.size() dimensions (1..3), any
// kernel, stride, padding, dilation and ceil_mode; saves the argmax of each
// window as a ceil(log2(window))-bit integer instead of 64-bit indices.
// Exactly LibTorch's outputs and gradients (on CUDA, 2-d pools under 2^30
// elements run aq's own kernels, which make and read those integers).
at::Tensor max_pool(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, bool ceil_mode, const LayerStatePtr& state);

// 2-d average pooling and adaptive average pooling: true averages, nothing
// but shapes kept for backward.
at::Tensor avg_pool2d(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                      bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override);
at::Tensor adaptive_avg_pool2d(const at::Tensor& x, at::IntArrayRef output_size);

// A state may be null (nullptr LayerStatePtr): nothing is recorded.

}  // namespace functional

// The options of the engine a configuration implies.
CompressOptions compress_options(const QuantConfig& config);

}  // namespace aq
