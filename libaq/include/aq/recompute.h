// Activation checkpointing: a block whose forward keeps nothing for
// backward but its input, and runs again in backward (torch.utils.checkpoint's
// method).  It is the baseline aq is measured against (aq-bench's ckpt row):
// the same exact model, trading compute for memory.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <functional>
#include <memory>
#include <optional>

namespace aq {

struct RecomputeOptions {
  // Put the CPU generator's and the input device's generator's state back
  // before recomputing, so that random ops draw what the forward drew, and
  // return them to their state afterwards (torch.utils.checkpoint's
  // preserve_rng_state).  Unset: only when the block holds a dropout layer
  // with p > 0 in training mode, the one random op of aq's blocks: reading a
  // CUDA generator's state cannot be captured in a CUDA graph.
  std::optional<bool> preserve_rng;
};

// Whether `block` (or a module in it) is a dropout layer with p > 0 in
// training mode: what RecomputeOptions::preserve_rng defaults to.
bool draws_random_numbers(torch::nn::Module& block);

// forward(input), computed with the block's parameters, keeping only `input`
// for backward (forward runs without grad).  Backward runs forward again with
// grad, under the autocast state of this call (autocast is thread-local and
// backward runs on autograd's threads), and back-propagates through it to
// `input` and every parameter of `block`.  The block's buffers are put back
// after the recomputation, so that BatchNorm's running statistics take one
// update per step, as without recomputation (torch.utils.checkpoint lets them
// take two).  `forward` must not change its input in place, and must compute
// from `block`'s parameters only.  Where nothing requires grad (or grad mode
// is off): forward(input), nothing kept.
torch::Tensor recompute(const std::shared_ptr<torch::nn::Module>& block,
                        std::function<torch::Tensor(const torch::Tensor&)> forward, const torch::Tensor& input,
                        const RecomputeOptions& options = {});

// The same for a module whose forward takes the tensor: block->forward(input).
template <typename M>
torch::Tensor recompute(const std::shared_ptr<M>& block, const torch::Tensor& input,
                        const RecomputeOptions& options = {}) {
  return recompute(std::static_pointer_cast<torch::nn::Module>(block),
                   [block](const torch::Tensor& x) { return block->forward(x); }, input, options);
}

}  // namespace aq
