#include "aq/adaptive.h"

#include "aq/allocate.h"
#include "aq/modules.h"
#include "aq/sample_bits.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>

namespace aq {

// A deferred allocation's result on its way to the host: every unit's bits
// (int32, pinned when copied from a device), owner layer after owner layer,
// and how many each has; read once, on first use.
struct PendingBudgets {
  at::Tensor host_bits;
  std::vector<int64_t> count;         // per owner layer
  std::optional<c10::Event> done;     // the device-to-host copy (device tensors only)
  std::optional<c10::Stream> stream;  // its stream
  std::vector<double> means;          // per owner layer, once read (or from a checkpoint)

  double mean(size_t unit) {
    if (means.empty()) {
      // Normally finished a step ago; if not, wait through the stream (which
      // LibTorch's sync debug mode counts).
      if (done && !done->query()) stream->synchronize();
      const int32_t* b = host_bits.const_data_ptr<int32_t>();
      means.resize(count.size());
      for (size_t i = 0; i < count.size(); ++i) {
        int64_t sum = 0;
        for (int64_t k = 0; k < count[i]; ++k) sum += *b++;
        means[i] = count[i] ? static_cast<double>(sum) / static_cast<double>(count[i]) : 0.0;
      }
    }
    return means[unit];
  }
};

namespace {

struct Adaptive {
  std::string name;
  QLayer* layer;
};
std::vector<Adaptive> adaptive_layers(torch::nn::Module& model, bool perlayer_only) {
  std::vector<Adaptive> out;
  for (const auto& item : model.named_modules()) {
    auto* q = dynamic_cast<QLayer*>(item.value().get());
    if (!q || !adaptive(q->config())) continue;
    const LayerState& st = *q->state();
    if (!st.last_bits.defined() || !st.range_sq.defined()) continue;
    if (perlayer_only && (st.batch_norm || !q->config().perlayer)) continue;
    out.push_back({item.key(), q});
  }
  return out;
}

}  // namespace

void apply_pending_budgets(torch::nn::Module& model) {
  for (const auto& m : model.modules(/*include_self=*/true)) {
    auto* q = dynamic_cast<QLayer*>(m.get());
    if (!q || !q->state()->pending) continue;
    LayerState& st = *q->state();
    st.budget = st.pending->mean(st.pending_unit);
    st.pending.reset();
  }
}

namespace {
// The model's aq layers, itself included, in a fixed order (every rank's the
// same); works for a model not held by a shared_ptr, as a destructor needs.
std::vector<QLayer*> q_layers(torch::nn::Module& model) {
  std::vector<QLayer*> out;
  if (auto* q = dynamic_cast<QLayer*>(&model)) out.push_back(q);
  for (const auto& m : model.modules(/*include_self=*/false))
    if (auto* q = dynamic_cast<QLayer*>(m.get())) out.push_back(q);
  return out;
}
}  // namespace

void set_shared_gradient_stats(torch::nn::Module& model, bool on) {
  for (QLayer* q : q_layers(model)) {
    q->state()->share_stats = on;
    if (!on) q->state()->due_stats.reset();
  }
}

void share_gradient_stats(torch::nn::Module& model, const AllGather& gather, int64_t index_bound) {
  RECORD_FUNCTION("aq::statistics", std::vector<c10::IValue>());
  std::vector<LayerState*> due;
  for (QLayer* q : q_layers(model))
    if (q->state()->due_stats && q->state()->grad_sq.defined()) due.push_back(q->state().get());
  if (due.empty()) return;
  if (!gather) {
    for (LayerState* st : due) {
      update_gradient_stats(*st, st->due_stats->usegradient, st->grad_sq, st->due_stats->indices);
      st->due_stats.reset();
    }
    return;
  }
  // One gather of doubles (int64 indices below 2^53 and float norms are
  // exact in them): the distinct index tensors (every layer of a batch has
  // the batch's), then each layer's norms.
  const at::Device dev = due.front()->grad_sq.device();
  std::vector<at::Tensor> parts, distinct;
  std::vector<int64_t> slot(due.size(), -1);  // the layer's index tensor in `distinct`
  for (size_t i = 0; i < due.size(); ++i) {
    const at::Tensor& idx = due[i]->due_stats->indices;
    if (!due[i]->due_stats->usegradient || !idx.defined() || idx.numel() != due[i]->grad_sq.numel()) continue;
    for (size_t k = 0; k < distinct.size() && slot[i] < 0; ++k)
      if (distinct[k].is_same(idx)) slot[i] = static_cast<int64_t>(k);
    if (slot[i] < 0) {
      slot[i] = static_cast<int64_t>(distinct.size());
      distinct.push_back(idx);
      const at::Tensor d = idx.to(at::kDouble).reshape({-1});  // host indices: pinned, no wait for the device
      parts.push_back(dev.is_cuda() && d.is_cpu() ? d.pin_memory().to(dev, /*non_blocking=*/true) : d.to(dev));
    }
  }
  for (LayerState* st : due) parts.push_back(st->grad_sq.to(dev, at::kDouble).reshape({-1}));
  const at::Tensor all = gather(at::cat(parts));  // [ranks, entries]
  const int64_t ranks = all.size(0);
  // Each part of every rank, rank 0's first: the union batch in its order.
  int64_t at_ = 0;
  auto next = [&](int64_t n) {
    const at::Tensor t = all.narrow(1, at_, n).reshape({-1});
    at_ += n;
    return t;
  };
  std::vector<at::Tensor> union_indices;
  for (const auto& idx : distinct) {
    at::Tensor u = next(idx.numel()).to(at::kLong);
    // Device indices must fit tables sized beforehand; else they are read
    // back, as a batch's host indices are, to size them.
    if (!u.is_cpu() && index_bound <= 0) u = u.cpu();
    union_indices.push_back(u);
  }
  const double scale = 1.0 / static_cast<double>(ranks * ranks);
  for (size_t i = 0; i < due.size(); ++i) {
    LayerState& st = *due[i];
    const at::Tensor g = (next(st.grad_sq.numel()) * scale).to(at::kFloat);
    at::Tensor idx;
    if (slot[i] >= 0) {
      idx = union_indices[static_cast<size_t>(slot[i])];
      if (!idx.is_cpu()) reserve_sample_stat(st, index_bound, idx.device());
    }
    update_gradient_stats(st, st.due_stats->usegradient, g, idx);
    st.due_stats.reset();
  }
}

int64_t adapt_layers(torch::nn::Module& model, bool defer, const AllGather& gather) {
  RECORD_FUNCTION("aq::allocate", std::vector<c10::IValue>());
  if (defer) apply_pending_budgets(model);  // the previous call's: its copy is done by now
  const auto layers = adaptive_layers(model, /*perlayer_only=*/true);
  if (layers.empty()) return 0;
  // Units (layer, sample) on the device; the allocation runs there too, and
  // only the units' bits come back.
  std::vector<at::Tensor> cost;
  std::vector<int64_t> elements;  // per sample, per owner layer
  std::vector<int> cabits;
  auto pending = std::make_shared<PendingBudgets>();
  std::map<const LayerState*, size_t> unit_of;  // owner layer -> its entry in cost
  double budget = 0;
  int ibits = 8;
  for (const auto& l : layers) {
    const LayerState& st = *l.layer->state();
    if (st.shared_from) continue;  // below: its sensitivity joins its owner's
    const QuantConfig& c = l.layer->config();
    unit_of[&st] = cost.size();
    cost.push_back(sensitivity_tensor(st, c, st.range_sq, st.sample_elements, st.indices));
    elements.push_back(st.sample_elements);
    cabits.push_back(c.cabits);
    ibits = c.ibits;
  }
  // A layer that used another's compressed copy holds no bits of its own:
  // what its gradient loses to them adds to the owner's units.
  for (const auto& l : layers) {
    const LayerState& st = *l.layer->state();
    if (!st.shared_from) continue;
    const auto it = unit_of.find(st.shared_from);
    if (it == unit_of.end() || cost[it->second].size(0) != st.range_sq.size(0)) continue;
    cost[it->second] = cost[it->second] +
                       sensitivity_tensor(st, l.layer->config(), st.range_sq, st.sample_elements, st.indices);
  }
  if (cost.empty()) return 0;
  at::Tensor units = at::cat(cost);
  int64_t ranks = 1;
  if (gather) {
    // Each layer's units of every rank together, rank 0's first: the units
    // of one process over the union batch, in its order.
    const at::Tensor all = gather(units);  // [ranks, units]
    ranks = all.size(0);
    std::vector<at::Tensor> per_layer;
    int64_t at_ = 0;
    for (const auto& c : cost) {
      per_layer.push_back(all.narrow(1, at_, c.size(0)).reshape({-1}));
      at_ += c.size(0);
    }
    units = at::cat(per_layer);
  }
  std::vector<int64_t> key;
  for (size_t i = 0; i < cost.size(); ++i) {
    const int64_t n = cost[i].size(0) * ranks;
    key.insert(key.end(), {n, elements[i]});
    pending->count.push_back(n);
    budget += static_cast<double>(cabits[i]) * static_cast<double>(elements[i]) * static_cast<double>(n);
  }
  // The weights change with the shapes only: built once (a launch per
  // layer), not every step.
  LayerState& keeper = *layers.front().layer->state();
  if (!keeper.unit_weights.defined() || keeper.unit_key != key || keeper.unit_weights.device() != units.device()) {
    std::vector<at::Tensor> weight;
    for (size_t i = 0; i < key.size(); i += 2)
      weight.push_back(at::full({key[i]}, std::max<int64_t>(1, key[i + 1]), units.options().dtype(at::kLong)));
    keeper.unit_weights = at::cat(weight);
    keeper.unit_key = std::move(key);
  }
  const at::Tensor bits =
      allocate_bits_tensor(units, keeper.unit_weights, static_cast<int64_t>(std::floor(budget)), ibits);
  if (bits.is_cpu()) {
    pending->host_bits = bits;
  } else {
    pending->host_bits = at::empty(bits.sizes(), bits.options().device(at::kCPU).pinned_memory(true));
    pending->host_bits.copy_(bits, /*non_blocking=*/true);
    const c10::impl::VirtualGuardImpl impl(bits.device().type());
    pending->stream = impl.getStream(bits.device());
    pending->done.emplace(bits.device().type());
    pending->done->record(*pending->stream);
  }
  for (const auto& l : layers) {
    LayerState& st = *l.layer->state();
    const auto it = unit_of.find(st.shared_from ? st.shared_from : &st);
    if (it == unit_of.end()) continue;
    st.pending = pending;
    st.pending_unit = it->second;
  }
  if (!defer) apply_pending_budgets(model);
  return static_cast<int64_t>(layers.size());
}

std::vector<LayerBits> layer_bits(torch::nn::Module& model) {
  std::vector<LayerBits> out;
  const auto layers = adaptive_layers(model, /*perlayer_only=*/false);
  std::map<const LayerState*, std::string> name_of;
  for (const auto& l : layers) name_of[l.layer->state().get()] = l.name;
  for (const auto& l : layers) {
    const LayerState& st = *l.layer->state();
    const auto cn = sensitivities(st, l.layer->config(), st.range_sq, st.sample_elements, st.indices);
    LayerBits b;
    b.name = l.name;
    b.elements = st.sample_elements;
    for (double v : cn) b.sensitivity += v / static_cast<double>(cn.size());
    b.bits = st.last_bits.to(at::kDouble).mean().item<double>();
    b.budget = st.budget > 0 ? st.budget : l.layer->config().cabits;
    if (st.shared_from) {
      const auto it = name_of.find(st.shared_from);
      b.shares = it != name_of.end() ? it->second : std::string("?");
    }
    out.push_back(b);
  }
  return out;
}

namespace {
// A layer name as a uint8 tensor (checkpoints store tensors only), and back.
at::Tensor name_tensor(const std::string& name) {
  at::Tensor t = at::empty({static_cast<int64_t>(name.size())}, at::kByte);
  std::copy(name.begin(), name.end(), t.data_ptr<uint8_t>());
  return t;
}
std::string tensor_name(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kByte).contiguous().view({-1});
  const auto* p = c.const_data_ptr<uint8_t>();
  return std::string(p, p + c.numel());
}
}  // namespace

std::vector<std::pair<std::string, at::Tensor>> adaptive_state(torch::nn::Module& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  std::map<const LayerState*, std::string> name_of;
  for (const auto& item : model.named_modules())
    if (auto* q = dynamic_cast<QLayer*>(item.value().get())) name_of[q->state().get()] = item.key();
  for (const auto& item : model.named_modules()) {
    auto* q = dynamic_cast<QLayer*>(item.value().get());
    if (!q) continue;
    const LayerState& st = *q->state();
    // Whose compressed copy the layer used last: the owner's next allocation
    // adds this layer's sensitivities to its own (choose_bits), so a resumed
    // run needs it before its first forward.
    if (st.shared_from) {
      const auto it = name_of.find(st.shared_from);
      if (it != name_of.end()) out.emplace_back(item.key() + ".aq_shared_from", name_tensor(it->second));
    }
    if (st.budget > 0) out.emplace_back(item.key() + ".aq_budget", at::scalar_tensor(st.budget, at::kDouble));
    if (st.pending)
      out.emplace_back(item.key() + ".aq_budget_next", at::scalar_tensor(st.pending->mean(st.pending_unit), at::kDouble));
    if (st.sample_stat.defined()) out.emplace_back(item.key() + ".aq_sample_stat", st.sample_stat.cpu());
    if (st.grad_mean.defined()) out.emplace_back(item.key() + ".aq_grad_mean", st.grad_mean.cpu());
  }
  return out;
}

void load_adaptive_state(torch::nn::Module& model, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::map<std::string, QLayer*> layers;
  for (const auto& item : model.named_modules())
    if (auto* q = dynamic_cast<QLayer*>(item.value().get())) {
      layers[item.key()] = q;
      q->record_geometry();
    }
  at::Device dev = at::kCPU;
  for (const auto& p : model.parameters()) {
    dev = p.device();
    break;
  }
  for (const auto& [key, t] : tensors) {
    const auto dot = key.rfind(".aq_");
    if (dot == std::string::npos) continue;
    auto it = layers.find(key.substr(0, dot));
    if (it == layers.end()) continue;
    LayerState& st = *it->second->state();
    const std::string what = key.substr(dot + 4);
    // A budget is average bits: one finite number in 0..8.
    const auto budget = [&] {
      const double b = t.numel() == 1 ? t.to(at::kDouble).item<double>() : -1.0;
      if (!(b >= 0 && b <= 8))
        throw std::runtime_error("adaptive state '" + key + "' is not a budget in 0..8 (" +
                                 (t.numel() == 1 ? std::to_string(b) : std::to_string(t.numel()) + " values") + ")");
      return b;
    };
    if (what == "budget") {
      st.budget = budget();
    } else if (what == "budget_next") {
      st.pending = std::make_shared<PendingBudgets>();
      st.pending->means = {budget()};
      st.pending_unit = 0;
    } else if (what == "sample_stat") {
      st.sample_stat = t.to(dev, at::kFloat);
    } else if (what == "grad_mean") {
      st.grad_mean = t.to(dev, at::kFloat).clone();  // updated in place from now on
    } else if (what == "shared_from") {
      const auto owner = layers.find(tensor_name(t));
      if (owner == layers.end() || owner->second == it->second) continue;
      LayerState& o = *owner->second->state();
      st.shared_from = &o;
      o.sharers.emplace_back(it->second->state());
    }
  }
}

}  // namespace aq
