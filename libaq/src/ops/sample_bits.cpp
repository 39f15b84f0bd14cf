#include "aq/sample_bits.h"

#include "aq/allocate.h"
#include "aq/compress.h"
#include "offer.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "aq_config.h"
#include "allocation.h"
#include "ranges.h"
#include "statistics.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>

namespace aq {

TensorOffer& grad_sq_offer() {
  thread_local TensorOffer offer;
  return offer;
}
TensorOffer& group_range_offer() {
  thread_local TensorOffer offer;
  return offer;
}


namespace {
thread_local at::Tensor current_indices;
thread_local at::Tensor current_indices_device;  // a copy on the device last asked for

// A host tensor on `dev` without waiting for the device (pinned copy).
at::Tensor to_device(const at::Tensor& t, const at::Device& dev) {
  if (dev.is_cuda() && t.is_cpu()) return t.pin_memory().to(dev, /*non_blocking=*/true);
  return t.to(dev);
}

// Dataset indices on `dev`: the batch's are copied once per batch and device.
at::Tensor indices_on(const at::Tensor& indices, const at::Device& dev) {
  if (indices.device() == dev) return indices;
  if (indices.is_same(current_indices)) {
    if (!current_indices_device.defined() || current_indices_device.device() != dev)
      current_indices_device = to_device(indices, dev);
    return current_indices_device;
  }
  return to_device(indices, dev);
}

// ||R_n||^2 of x's per-group ranges, as the engine groups x (float [N]):
// one min/max pass over x in its own dtype.  With `parts`, it may come as
// float [N, K] instead (N K <= kAllocMaxParts), rows summing to it, for the
// allocation kernel to sum (one launch fewer).
at::Tensor range_sq_of(const at::Tensor& x, const QuantConfig& c, bool parts) {
  const at::Tensor v = samples_in_memory_order(x);
  const int64_t n = v.size(0), d = v.size(1), g = c.group_size;
  if (d == 0) return at::zeros({n}, v.options().dtype(at::kFloat));
  if (!c.pergroup) {
    auto [mn, mx] = at::aminmax(v.reshape({-1}), 0);
    return ((mx.to(at::kFloat) - mn.to(at::kFloat)).pow(2) * static_cast<double>((d + g - 1) / g))
        .expand({n})
        .contiguous();
  }
  // The group ranges a kernel that read x anyway (BatchNorm's statistics, ReLU) worked out.
  const at::Tensor r2 = group_range_offer().take(x, g);
  if (r2.defined() && r2.dim() == 1 && r2.size(0) == n) return r2;
  if (r2.defined() && r2.dim() == 2 && r2.size(0) == n && r2.size(1) > 0) {
    if (parts && r2.numel() <= kernels::kAllocMaxParts) return r2;
    at::Tensor out = at::empty({n}, v.options().dtype(at::kFloat));
    at::sum_out(out, r2, {1});  // the same sum as the range pass's
    return out;
  }
  return squared_group_ranges(v, g, parts && n * ((d + g - 1) / g) <= kernels::kAllocMaxParts);
}

}  // namespace

at::Tensor squared_group_ranges(const at::Tensor& v, int64_t G, bool parts) {
  const int64_t n = v.size(0), d = v.size(1);
  if (d == 0) return at::zeros({n}, v.options().dtype(at::kFloat));
  const auto dev = v.device().type();
  if (parts && v.is_contiguous() && kernels::group_range_sq.has(dev) &&
      kernels::group_range_sq_takes(v.scalar_type(), G)) {
    at::Tensor out = at::empty({n, (d + G - 1) / G}, v.options().dtype(at::kFloat));
    kernels::group_range_sq(dev, v, n, d, G, out);
    return out;
  }
  if (v.is_contiguous() && kernels::range_sq.has(dev)) {
    // One pass, no temporaries: one kernel instead of a min/max pass and five small ops.
    at::Tensor out = at::empty({n}, v.options().dtype(at::kFloat));
    kernels::range_sq(dev, v, n, d, G, out);
    return out;
  }
  auto range_sq = [](const at::Tensor& t, int64_t dim) {
    auto [mn, mx] = at::aminmax(t, dim);
    return (mx.to(at::kFloat) - mn.to(at::kFloat)).pow(2);
  };
  const int64_t full = d / G * G;
  at::Tensor acc;
  if (full) acc = range_sq(v.narrow(1, 0, full).view({n, full / G, G}), 2).sum(1);
  if (full < d) {
    const at::Tensor tail = range_sq(v.narrow(1, full, d - full), 1);
    acc = acc.defined() ? acc + tail : tail;
  }
  return acc;
}

void set_batch_indices(const at::Tensor& indices) {
  if (!indices.defined())
    current_indices = at::Tensor();
  else if (indices.is_cpu())
    current_indices = indices.to(at::kLong).contiguous();
  else if (indices.scalar_type() == at::kLong && indices.is_contiguous())
    current_indices = indices;
  else
    throw std::invalid_argument("batch indices on a device must be contiguous int64");
  current_indices_device = at::Tensor();
}

void reserve_sample_stat(LayerState& st, int64_t size, const at::Device& device) {
  if (st.sample_stat.defined() && st.sample_stat.device() == device && st.sample_stat.size(0) >= size &&
      st.sample_stat.scalar_type() == at::kFloat && st.sample_stat.is_contiguous())
    return;
  const int64_t have = st.sample_stat.defined() ? st.sample_stat.size(0) : 0;
  at::Tensor grown = at::full({std::max(size, have)}, -1.0, at::TensorOptions().dtype(at::kFloat).device(device));
  if (have) grown.narrow(0, 0, have).copy_(st.sample_stat);
  st.sample_stat = grown;
}
const at::Tensor& batch_indices() { return current_indices; }

namespace {
// C_n = range_sq_n * range_scale * s_n, with s_n = (gradient statistic) *
// grad_scale for conv/linear layers and 1 for batch norm (docs/design.md §5).
double range_scale(const LayerState& st, const QuantConfig& c, int64_t elements) {
  const int64_t group = st.group_size > 0 ? st.group_size : c.group_size;
  const double g = c.pergroup ? static_cast<double>(group) : static_cast<double>(std::max<int64_t>(1, elements));
  const double positions = std::max<double>(1.0, static_cast<double>(elements) / std::max<int64_t>(1, st.in_channels));
  return g / positions;
}
double grad_scale(const LayerState& st) {
  return static_cast<double>(st.kernel_area) / (4.0 * static_cast<double>(st.conv_groups));
}
// Which gradient statistic s_n reads: 0 none (ones), 1 the batch mean, 2 per sample.
int statistic_mode(const LayerState& st, const QuantConfig& c, const at::Tensor& indices, int64_t n) {
  if (st.batch_norm) return 0;
  if (c.usegradient && st.sample_stat.defined() && indices.defined() && indices.numel() == n) return 2;
  if (!c.usegradient && st.grad_mean.defined()) return 1;
  return 0;
}
}  // namespace

namespace {
// The fused CUDA kernel's view of a layer (and the tensors it reads).
struct FusedInputs {
  kernels::AllocPlan plan;
  at::Tensor range_sq, grad_mean, sample_stat, indices;
};
FusedInputs fused_inputs(const LayerState& st, const QuantConfig& c, const at::Tensor& range_sq, int64_t elements,
                         const at::Tensor& indices) {
  FusedInputs f;
  const int64_t n = range_sq.size(0);
  const at::Device dev = range_sq.device();
  f.plan.N = n;
  f.plan.ibits = c.ibits;
  f.plan.words_per_bit = (elements + 31) / 32;
  f.plan.range_scale = range_scale(st, c, elements);
  f.plan.grad_scale = static_cast<float>(grad_scale(st));
  f.plan.batch_norm = st.batch_norm;
  f.plan.mode = statistic_mode(st, c, indices, n);
  for (int b = 2; b <= c.ibits; ++b) f.plan.dinv[b] = bit_cost_step(b);
  if (f.plan.mode == 2) {
    f.indices = indices_on(indices, dev);
    f.sample_stat = st.sample_stat.to(dev, at::kFloat).contiguous();
    f.plan.stat_size = f.sample_stat.numel();
  } else if (f.plan.mode == 1) {
    f.grad_mean = st.grad_mean.to(dev, at::kFloat).contiguous();
  }
  f.plan.range_cols = range_sq.dim() == 2 ? range_sq.size(1) : 1;
  f.range_sq = range_sq.to(at::kFloat).contiguous();
  return f;
}
}  // namespace

at::Tensor sensitivity_tensor(const LayerState& st, const QuantConfig& c, const at::Tensor& range_sq,
                              int64_t elements, const at::Tensor& indices) {
  const int64_t n = range_sq.size(0);
  const c10::DeviceType dt = range_sq.device().type();
  if (kernels::allocate_per_sample.has(dt) && n <= kernels::kAllocMaxSamples) {  // one launch instead of ~20
    FusedInputs f = fused_inputs(st, c, range_sq, elements, indices);
    at::Tensor cost = at::empty({n}, range_sq.options().dtype(at::kDouble)), unused;
    kernels::allocate_per_sample(dt, f.plan, f.range_sq, at::Tensor(), f.grad_mean, f.sample_stat, f.indices, unused,
                                 unused, &cost, at::Tensor());
    return cost;
  }
  at::Tensor s = at::ones({n}, range_sq.options());
  const int mode = statistic_mode(st, c, indices, n);
  if (!st.batch_norm) {
    if (mode == 2) {
      const at::Tensor idx = indices_on(indices, st.sample_stat.device());
      const at::Tensor inside = idx < st.sample_stat.size(0);
      const at::Tensor known = at::where(inside, st.sample_stat.index({idx.clamp_max(st.sample_stat.size(0) - 1)}),
                                         at::full({}, -1.0, st.sample_stat.options()));
      const at::Tensor seen = known >= 0;
      // Never-seen samples take the mean of the seen ones (1 if none).
      const at::Tensor count = seen.sum();
      const at::Tensor mean = at::where(count > 0, (known * seen).sum() / count.clamp_min(1), at::ones({}, known.options()));
      s = at::where(seen, known, mean).to(range_sq.device());
    } else if (mode == 1) {
      s = st.grad_mean.to(range_sq.device()).expand({n});  // 0 before the first backward, as the original
    }
    s = s * grad_scale(st);
  }
  return range_sq.to(at::kDouble) * range_scale(st, c, elements) * s.to(at::kDouble);
}

std::vector<double> sensitivities(const LayerState& st, const QuantConfig& c, const at::Tensor& range_sq,
                                  int64_t elements, const at::Tensor& indices) {
  const at::Tensor cn = sensitivity_tensor(st, c, range_sq, elements, indices).cpu().contiguous();
  return std::vector<double>(cn.data_ptr<double>(), cn.data_ptr<double>() + cn.numel());
}

at::Tensor choose_bits(LayerState& st, const QuantConfig& c, const at::Tensor& x, int64_t* total,
                       at::Tensor* word_offset) {
  RECORD_FUNCTION("aq::allocate", std::vector<c10::IValue>());
  const int64_t n = x.dim() ? x.size(0) : 1;
  const int64_t elements = n ? x.numel() / n : 0;
  // On CUDA, sensitivities, allocation and word offsets in one launch (the
  // same bits as below: the tensor ops cost ~70 launches per layer), which
  // also sums the ranges per sample where sharers do not need them first.
  const bool fused = kernels::allocate_per_sample.has(x.device().type()) && n <= kernels::kAllocMaxSamples;
  at::Tensor ranges = range_sq_of(x, c, fused && st.sharers.empty());
  if (ranges.dim() == 2 && ranges.size(1) == 1) ranges = ranges.view({n});
  st.range_sq = ranges.dim() == 1 ? ranges : at::Tensor();
  st.sample_elements = elements;
  st.indices = batch_indices().defined() && batch_indices().numel() == n ? batch_indices() : at::Tensor();
  const double per_sample = st.budget > 0 ? st.budget : static_cast<double>(c.cabits);
  // The layer's share of bits, known on the host: it sizes the packed data.
  const int64_t target =
      std::clamp<int64_t>(static_cast<int64_t>(std::floor(per_sample * static_cast<double>(n) + 1e-9)), n,
                          static_cast<int64_t>(c.ibits) * n);
  if (total) *total = target;
  // Layers that shared this layer's copy last time read the same input: their
  // sensitivities add to its own (the same bits serve them all).
  at::Tensor extra;
  for (const auto& weak : st.sharers) {
    const LayerStatePtr other = weak.lock();
    if (!other || other->shared_from != &st) continue;
    const at::Tensor e = sensitivity_tensor(*other, c, st.range_sq, elements, st.indices);
    extra = extra.defined() ? extra + e : e;
  }
  if (fused) {
    FusedInputs f = fused_inputs(st, c, ranges, elements, st.indices);
    f.plan.removals = static_cast<int64_t>(c.ibits) * n - target;
    at::Tensor bits = at::empty({n}, x.options().dtype(at::kInt));
    at::Tensor offsets = at::empty({n}, x.options().dtype(at::kLong));
    if (!st.range_sq.defined()) st.range_sq = at::empty({n}, x.options().dtype(at::kFloat));
    kernels::allocate_per_sample(x.device().type(), f.plan, f.range_sq, st.range_sq, f.grad_mean, f.sample_stat,
                                 f.indices, bits, offsets, nullptr, extra);
    st.last_bits = bits;
    if (word_offset) *word_offset = offsets;
    return bits;
  }
  at::Tensor cn = sensitivity_tensor(st, c, st.range_sq, elements, st.indices);
  if (extra.defined()) cn = cn + extra;
  st.last_bits = allocate_bits_tensor(cn, at::Tensor(), target, c.ibits);
  if (word_offset) *word_offset = at::Tensor();
  return st.last_bits;
}

void update_gradient_stats(LayerState& st, bool usegradient, const at::Tensor& grad_sq, const at::Tensor& indices) {
  RECORD_FUNCTION("aq::statistics", std::vector<c10::IValue>());
  if (!grad_sq.defined() || grad_sq.numel() == 0) return;
  const at::Tensor g = grad_sq.to(at::kFloat);
  // The batch mean goes into the tensor that holds it already where it can:
  // a captured step's replays must carry it to the next step's forward.
  auto mean_slot = [&]() -> at::Tensor& {
    if (!(st.grad_mean.defined() && st.grad_mean.dim() == 0 && st.grad_mean.device() == g.device() &&
          st.grad_mean.scalar_type() == at::kFloat))
      st.grad_mean = at::empty({}, g.options());
    return st.grad_mean;
  };
  // One reduction writing the slot (a step has one per layer).
  auto set_mean = [&] { at::mean_out(mean_slot(), g, at::IntArrayRef{0}); };
  if (!usegradient || !indices.defined() || indices.numel() != g.numel()) {
    set_mean();
    return;
  }
  // Host indices are checked and size the statistics here; device indices
  // (a captured step's) were promised in range by reserve_sample_stat.
  bool nonnegative = true;
  if (indices.is_cpu()) {
    const auto [lowest, highest] = at::aminmax(indices);
    const int64_t need = highest.item<int64_t>() + 1;
    nonnegative = lowest.item<int64_t>() >= 0;
    if (!st.sample_stat.defined() || st.sample_stat.device() != g.device() || st.sample_stat.size(0) < need)
      reserve_sample_stat(st, std::max<int64_t>(need, st.sample_stat.defined() ? st.sample_stat.size(0) * 2 : need),
                          g.device());
  } else if (!st.sample_stat.defined() || st.sample_stat.device() != g.device()) {
    throw std::logic_error("per-sample statistics not reserved for batch indices on the device");
  }
  const at::Tensor idx = indices_on(indices, g.device());
  if (kernels::update_sample_stat.has(g.device().type()) && g.numel() <= kernels::kAllocMaxSamples &&
      st.sample_stat.scalar_type() == at::kFloat && st.sample_stat.is_contiguous() &&
      nonnegative) {  // one launch instead of ~10
    kernels::update_sample_stat(g.device().type(), g.contiguous(), idx.contiguous(), st.sample_stat, mean_slot());
    return;
  }
  const at::Tensor old = st.sample_stat.index({idx});
  st.sample_stat.index_put_({idx}, at::where(old >= 0, 0.5 * old + 0.5 * g, g));
  set_mean();
}

}  // namespace aq
