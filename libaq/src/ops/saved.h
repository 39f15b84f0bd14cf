// What the compressed autograd ops share (internal to the ops layer): the
// layer state in autograd contexts, the compressed input a layer saves
// (shared between layers that save the same tensor, swapped to host memory
// at L4/L5, restored in micro-batches at L3.1+), 1-bit masks and the
// gradient statistics a backward records.
#pragma once

#include "aq/compress.h"
#include "aq/config.h"
#include "aq/layer_state.h"

#include <ATen/core/Tensor.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace aq::detail {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd functions take no undefined tensors: an absent bias or weight
// travels as an empty tensor and is turned back into "none" (present) inside.
at::Tensor placeholder(const std::optional<at::Tensor>& t, const at::Tensor& like);
at::Tensor placeholder(const at::Tensor& t, const at::Tensor& like);
at::Tensor present(const at::Tensor& t);
at::Tensor maybe_bias(const std::optional<at::Tensor>& b);

// Whether a backward may write its result over its incoming gradient g,
// which it takes by reference from autograd's list (a function taking the
// list by value holds a second reference): nothing else holds g's tensor or
// its memory (an addition's backward hands the same gradient to both its
// inputs, a retained gradient keeps it) and no graph is built through it.
bool writable_grad(const at::Tensor& g);

// The layer's state, kept in (and read back from) an autograd context.
void put_state(AutogradContext* ctx, const LayerStatePtr& st);
LayerStatePtr state_of(AutogradContext* ctx);

// Compresses x for backward with the layer's bits (or shares the copy an
// earlier layer made of the same tensor), records what the adaptive scheme
// reads, and keeps it in the context.
void save_compressed(AutogradContext* ctx, const at::Tensor& x, const QuantConfig& c, LayerState* st);
// The compressed input kept by save_compressed.
Packed packed_of(AutogradContext* ctx);
// The saved input restored (in grad's dtype).
at::Tensor restore(AutogradContext* ctx, c10::ScalarType dtype);

// Calls f(begin, end, restored input of samples [begin, end)) per
// micro-batch (one call for all samples unless the level restores in
// micro-batches: L3.1, L4, L5).
template <typename F>
void for_each_micro_batch(AutogradContext* ctx, const Packed& p, c10::ScalarType dtype, F&& f) {
  const int64_t chunk = ctx->saved_data["chunk"].toInt();
  if (chunk == 0) {
    f(int64_t(0), p.samples, dequantize(p).to(dtype));
    return;
  }
  for (int64_t b = 0; b < p.samples; b += chunk) {
    const int64_t e = std::min(p.samples, b + chunk);
    f(b, e, dequantize(p.slice(b, e)).to(dtype));
  }
}

// After a backward: the per-sample squared norms of the output gradient g
// into the layer's gradient statistics (adaptive layers only).
void record_grad(AutogradContext* ctx, const at::Tensor& g);

// Saves the 1-bit mask (source > 0, as pack_positive or relu_and_mask packed
// it) in the source's memory order; backward multiplies by it and a scale.
void save_packed_mask(AutogradContext* ctx, const at::Tensor& source, const at::Tensor& packed, double scale,
                      LayerState* st);
void save_mask(AutogradContext* ctx, const at::Tensor& source, double scale, LayerState* st);
// The incoming gradient times the saved mask, written over the gradient
// where nothing else holds it (one tensor of the activation's size fewer at
// the backward's peak).
at::Tensor apply_mask(AutogradContext* ctx, const at::Tensor& g);

// Under autocast, convolutions run in the lower-precision dtype as LibTorch's
// conv*d do (at::convolution itself is not on every device's autocast list).
at::Tensor autocast_lower(const at::Tensor& t, const at::Tensor& x);
// Whether an op should keep a compressed copy rather than LibTorch's own.
bool compressing(const QuantConfig& c, const at::Tensor& x, const at::Tensor& w);

}  // namespace aq::detail
