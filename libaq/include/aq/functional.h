// Activation-compressed ops: the forward result is exactly LibTorch's; what
// autograd keeps for backward is a compressed copy (docs/design.md §4), and
// backward runs LibTorch's own backward ops on the restored tensor.
#pragma once

#include "aq/compress.h"
#include "aq/config.h"
#include "aq/layer_state.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <optional>

namespace aq {

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

// batch_norm whose statistics (and running statistics) are those of every
// rank's batch together, over dist::current()'s group (aq/dist.h), as
// torch.nn.SyncBatchNorm's; the input gradient uses the global sums, the
// weight and bias gradients are this rank's (averaged with the others by the
// gradient reducer).  Saves x compressed.  Without a group (one process),
// or where batch_norm would not compress: batch_norm itself.
at::Tensor sync_batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, double momentum, double eps, const QuantConfig& config,
                           const LayerStatePtr& state);

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

// Transformer layers (docs/design.md §4).  Those that save a lossy copy
// compress only when the configuration compresses and compress_bn is on (L2
// and above, like BatchNorm); otherwise they are LibTorch's own op.

// Layer norm over the trailing `normalized_shape`; saves x compressed plus
// the per-row mean and rstd.  Under autocast it runs in float, as LibTorch's.
at::Tensor layer_norm(const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, const QuantConfig& config,
                      const LayerStatePtr& state);

// x + y, as LibTorch adds them, for a pre-norm block's residual stream,
// whose sum the next block's LayerNorm over rows of `row` elements reads and
// compresses: where that norm allocates adaptive bits (and on CUDA, x float),
// the sum's group ranges are worked out as it is written, so the norm does
// not read it again for them.
at::Tensor residual_add(const at::Tensor& x, const at::Tensor& y, int64_t row, const QuantConfig& config);

// RMS norm (at::rms_norm; eps unset: the input dtype's epsilon); saves x
// compressed plus the per-row rstd.
at::Tensor rms_norm(const at::Tensor& x, at::IntArrayRef normalized_shape, const std::optional<at::Tensor>& weight,
                    std::optional<double> eps, const QuantConfig& config, const LayerStatePtr& state);

// GELU ("none" or "tanh") and SiLU; save their derivative at x compressed
// (stochastic rounding, so the input gradient g * d_hat is unbiased).
at::Tensor gelu(const at::Tensor& x, const std::string& approximate, const QuantConfig& config,
                const LayerStatePtr& state);
at::Tensor silu(const at::Tensor& x, const QuantConfig& config, const LayerStatePtr& state);

// Softmax over `dim`; saves its output compressed.
at::Tensor softmax(const at::Tensor& x, int64_t dim, const QuantConfig& config, const LayerStatePtr& state);

// Multi-head self-attention through at::scaled_dot_product_attention
// (flash / memory-efficient kernels where LibTorch picks them).  qkv is
// [B, T, 3 C] (queries, keys, values, each C = heads * head_dim wide, head
// h in columns [h d, (h + 1) d) of its third); returns [B, T, C] (heads
// concatenated).  Saves qkv compressed; backward restores it and runs the
// attention forward again under autograd to get its gradient.
at::Tensor self_attention(const at::Tensor& qkv, int64_t heads, bool causal, const QuantConfig& config,
                          const LayerStatePtr& state);

// self_attention followed by its output projection, linear(attention,
// proj_weight, proj_bias) with the projection's own configuration and state.
// Where LibTorch runs the attention with a kernel whose backward reads the
// forward's output and per-row log-sum-exp (flash, cuDNN or memory-efficient
// on CUDA; flash on the CPU), backward restores all samples at once and
// config.attention_bits is set, one op: it keeps q, k, v as self_attention
// does and the attention's output, the projection's input, compressed once
// at those bits under the projection's state; backward restores that output
// for the projection's weight gradient and, with the log-sum-exp, runs the
// attention's backward from it, without the attention forward again.
// Elsewhere the two ops in turn.
at::Tensor self_attention_projected(const at::Tensor& qkv, int64_t heads, bool causal, const QuantConfig& config,
                                    const LayerStatePtr& state, const at::Tensor& proj_weight,
                                    const std::optional<at::Tensor>& proj_bias, const QuantConfig& proj_config,
                                    const LayerStatePtr& proj_state);

// A state may be null (nullptr LayerStatePtr): nothing is recorded.

}  // namespace functional

// The options of the engine a configuration implies.
CompressOptions compress_options(const QuantConfig& config);

}  // namespace aq
