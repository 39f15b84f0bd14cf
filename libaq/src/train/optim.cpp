#include "aq/optim.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <sstream>
#include <cmath>
#include <map>
#include <stdexcept>
#include <tuple>

namespace aq::train {

Schedule parse_schedule(const std::string& s) {
  if (s == "onecycle" || s == "one-cycle") return Schedule::kOneCycle;
  if (s == "cosine") return Schedule::kCosine;
  if (s == "step") return Schedule::kStep;
  if (s == "constant") return Schedule::kConstant;
  throw std::invalid_argument("--lr-schedule must be onecycle, cosine, step or constant, not '" + s + "'");
}
std::string to_string(Schedule s) {
  switch (s) {
    case Schedule::kOneCycle: return "onecycle";
    case Schedule::kCosine: return "cosine";
    case Schedule::kStep: return "step";
    case Schedule::kConstant: return "constant";
  }
  return "?";
}

double LrSchedule::at(int64_t t, int64_t total, int64_t per_epoch) const {
  const double warm = warmup * per_epoch;
  if (kind == Schedule::kOneCycle) {
    // PyTorch's OneCycleLR: from lr/25 up to lr over the first 30% of the
    // steps, then down to lr/25/1e4, both cosine.
    const double init = lr / 25, fin = init / 1e4;
    const double up = std::max(1.0, 0.3 * total - 1), down = std::max(1.0, total - 1 - up);
    auto cos_anneal = [](double a, double b, double f) { return b + (a - b) / 2 * (1 + std::cos(M_PI * f)); };
    return t <= up ? cos_anneal(init, lr, t / up) : cos_anneal(lr, fin, std::min(1.0, (t - up) / down));
  }
  const double warm_steps = warmup_steps > 0 ? static_cast<double>(warmup_steps) : warm;
  if (t < warm_steps) return lr * (t + 1) / warm_steps;
  switch (kind) {
    case Schedule::kCosine:
      return lr * 0.5 * (1 + std::cos(M_PI * (t - warm_steps) / std::max(1.0, total - warm_steps)));
    case Schedule::kStep: {
      std::vector<double> ms = milestones;
      if (ms.empty()) ms = {0.5 * epochs, 0.75 * epochs};
      double r = lr;
      for (double m : ms)
        if (t >= m * per_epoch) r *= 0.1;
      return r;
    }
    default:
      return lr;
  }
}

torch::Tensor GraphSafeOptimizer::step_with(const torch::optim::Optimizer::LossClosure& closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  sync();
  update();
  return loss;
}

at::Tensor& GraphSafeOptimizer::lr_on(size_t group, const c10::Device& device) {
  at::Tensor& t = lr_[{group, device.type(), device.index()}];
  if (!t.defined()) t = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  return t;
}

void GraphSafeOptimizer::sync_lr(const std::vector<torch::optim::OptimizerParamGroup>& groups) {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < groups.size(); ++g) {
    const double lr = groups[g].options().get_lr();
    std::vector<c10::Device> seen;
    for (const auto& p : groups[g].params()) {
      if (!p.is_cuda() || std::find(seen.begin(), seen.end(), p.device()) != seen.end()) continue;
      seen.push_back(p.device());
      lr_on(g, p.device()).fill_(lr);
    }
  }
}

torch::Tensor SGD::step(LossClosure closure) { return step_with(closure); }

void SGD::sync() { sync_lr(param_groups_); }

bool SGD::ready() const {
  for (const auto& group : param_groups_) {
    if (static_cast<const torch::optim::SGDOptions&>(group.options()).momentum() == 0) continue;
    for (const auto& p : group.params())
      if (p.grad().defined() && !state_.count(p.unsafeGetTensorImpl())) return false;
  }
  return true;
}

namespace {

// The multi-tensor kernels take lists of one device and dtype.
using ListKey = std::tuple<c10::DeviceType, c10::DeviceIndex, c10::ScalarType>;
ListKey list_key(const at::Tensor& t) { return {t.device().type(), t.device().index(), t.scalar_type()}; }

// One fused launch (learning rate read on the device) needs tensors alike:
// a dense parameter, and its gradient and state of its dtype and strides.
bool fusable(const at::Tensor& p, std::initializer_list<at::Tensor> with) {
  if (!p.is_non_overlapping_and_dense()) return false;
  for (const auto& t : with)
    if (!t.defined() || t.scalar_type() != p.scalar_type() || t.strides() != p.strides()) return false;
  return true;
}

}  // namespace

void SGD::update() {
  torch::NoGradGuard no_grad;
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    auto& group = param_groups_[gi];
    const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
    struct Lists {
      std::vector<at::Tensor> params, grads, bufs;
      bool fusable = true;
    };
    std::map<ListKey, Lists> lists;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      Lists& l = lists[list_key(p)];
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      if (o.momentum() != 0) {
        auto it = state_.find(p.unsafeGetTensorImpl());
        l.bufs.push_back(it == state_.end() ? at::Tensor()
                                            : static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer());
        l.fusable = l.fusable && fusable(p, {p.grad(), l.bufs.back()});
      } else {
        l.fusable = l.fusable && fusable(p, {p.grad()});
      }
    }
    for (auto& [key, l] : lists) {
      if (std::get<0>(key) == c10::kCUDA && l.fusable) {
        at::_fused_sgd_(l.params, l.grads, l.bufs, o.weight_decay(), o.momentum(),
                        lr_on(gi, l.params[0].device()), o.dampening(), o.nesterov(), /*maximize=*/false,
                        /*is_first_step=*/false);
        continue;
      }
      std::vector<at::Tensor> d = l.grads;
      if (o.weight_decay() != 0) d = at::_foreach_add(d, l.params, o.weight_decay());
      if (o.momentum() != 0) {
        // d_p, or the momentum buffer (new: a copy of d_p; else
        // buf = momentum buf + (1 - dampening) d_p), as torch::optim::SGD.
        std::vector<at::Tensor> bufs(d.size()), old_bufs, old_d;
        for (size_t i = 0; i < d.size(); ++i) {
          if (!l.bufs[i].defined()) {
            bufs[i] = d[i].clone().detach();
            auto st = std::make_unique<torch::optim::SGDParamState>();
            st->momentum_buffer(bufs[i]);
            state_[l.params[i].unsafeGetTensorImpl()] = std::move(st);
          } else {
            bufs[i] = l.bufs[i];
            old_bufs.push_back(bufs[i]);
            old_d.push_back(d[i]);
          }
        }
        if (!old_bufs.empty()) {
          at::_foreach_mul_(old_bufs, o.momentum());
          at::_foreach_add_(old_bufs, old_d, 1 - o.dampening());
        }
        d = o.nesterov() ? at::_foreach_add(d, bufs, o.momentum()) : bufs;
      }
      at::_foreach_add_(l.params, d, -o.lr());
    }
  }
}

namespace {

// AdamW's state with, on CUDA, the step count in device memory too (float:
// what the fused kernel reads), kept equal to the host's: update() adds
// there, which a replay repeats, and sync() here.
struct AdamWState : torch::optim::AdamWParamState {
  AdamWState() = default;
  explicit AdamWState(const torch::optim::AdamWParamState& s) : torch::optim::AdamWParamState(s) {}
  at::Tensor device_step;
};

// Whether at::_fused_adamw_ updates a parameter (with a gradient).
bool fused_adamw(const at::Tensor& p, const torch::optim::AdamWParamState& st, bool amsgrad) {
  return p.is_cuda() && fusable(p, {p.grad(), st.exp_avg(), st.exp_avg_sq()}) &&
         (!amsgrad || fusable(p, {st.max_exp_avg_sq()}));
}

struct AdamWLists {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
};

// torch::optim::AdamW::step's operations on parameters that all made `step` steps.
void foreach_adamw(AdamWLists& l, int64_t step, const torch::optim::AdamWOptions& o) {
  const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
  const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(step)),
               bias_correction2 = 1 - std::pow(beta2, static_cast<double>(step));
  if (o.weight_decay() != 0) at::_foreach_mul_(l.params, 1 - o.lr() * o.weight_decay());
  at::_foreach_mul_(l.exp_avgs, beta1);
  at::_foreach_add_(l.exp_avgs, l.grads, 1 - beta1);
  at::_foreach_mul_(l.exp_avg_sqs, beta2);
  at::_foreach_addcmul_(l.exp_avg_sqs, l.grads, l.grads, 1 - beta2);
  std::vector<at::Tensor> denom;
  if (o.amsgrad()) {
    at::_foreach_maximum_(l.max_exp_avg_sqs, l.exp_avg_sqs);
    denom = at::_foreach_sqrt(l.max_exp_avg_sqs);
  } else {
    denom = at::_foreach_sqrt(l.exp_avg_sqs);
  }
  at::_foreach_div_(denom, std::sqrt(bias_correction2));
  at::_foreach_add_(denom, o.eps());
  at::_foreach_addcdiv_(l.params, l.exp_avgs, denom, -(o.lr() / bias_correction1));
}

}  // namespace

torch::Tensor AdamW::step(LossClosure closure) { return step_with(closure); }

void AdamW::sync() {
  torch::NoGradGuard no_grad;
  sync_lr(param_groups_);
  for (auto& group : param_groups_) {
    const bool amsgrad = static_cast<const torch::optim::AdamWOptions&>(group.options()).amsgrad();
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "AdamW does not support sparse gradients");
      auto& slot = state_[p.unsafeGetTensorImpl()];
      auto* st = dynamic_cast<AdamWState*>(slot.get());
      if (!st) {
        // A first step, or state restored from a checkpoint, which counts
        // steps on the host only.
        std::unique_ptr<AdamWState> s;
        if (slot) {
          s = std::make_unique<AdamWState>(static_cast<const torch::optim::AdamWParamState&>(*slot));
        } else {
          s = std::make_unique<AdamWState>();
          s->step(0);
          s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          if (amsgrad) s->max_exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        }
        if (p.is_cuda())
          s->device_step = at::full({}, static_cast<double>(s->step()), p.options().dtype(at::kFloat));
        st = s.get();
        slot = std::move(s);
      }
      st->step(st->step() + 1);
    }
  }
}

bool AdamW::ready() const {
  for (const auto& group : param_groups_) {
    const bool amsgrad = static_cast<const torch::optim::AdamWOptions&>(group.options()).amsgrad();
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto it = state_.find(p.unsafeGetTensorImpl());
      if (it == state_.end()) return false;
      const auto* st = dynamic_cast<const AdamWState*>(it->second.get());
      if (!st || !st->device_step.defined() || !fused_adamw(p, *st, amsgrad)) return false;
    }
  }
  return true;
}

void AdamW::update() {
  torch::NoGradGuard no_grad;
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    auto& group = param_groups_[gi];
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    // The fused kernel reads each parameter's step count; the multi-tensor
    // path takes the bias corrections as scalars: one list per count there
    // (parameters without a gradient at some step fall behind the others).
    std::map<std::tuple<ListKey, bool, int64_t>, AdamWLists> lists;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto it = state_.find(p.unsafeGetTensorImpl());
      auto* st = it == state_.end() ? nullptr : dynamic_cast<AdamWState*>(it->second.get());
      TORCH_CHECK(st && st->device_step.defined() == p.is_cuda(),
                  "AdamW: a parameter with a gradient has no state from sync()");
      const bool fused = fused_adamw(p, *st, o.amsgrad());
      AdamWLists& l = lists[{list_key(p), fused, fused ? 0 : st->step()}];
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      l.exp_avgs.push_back(st->exp_avg());
      l.exp_avg_sqs.push_back(st->exp_avg_sq());
      if (o.amsgrad()) l.max_exp_avg_sqs.push_back(st->max_exp_avg_sq());
      if (p.is_cuda()) l.steps.push_back(st->device_step);
    }
    for (auto& [key, l] : lists) {
      if (!l.steps.empty()) at::_foreach_add_(l.steps, 1);
      if (std::get<1>(key)) {
        at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.max_exp_avg_sqs, l.steps,
                          lr_on(gi, l.params[0].device()), std::get<0>(o.betas()), std::get<1>(o.betas()),
                          o.weight_decay(), o.eps(), o.amsgrad(), /*maximize=*/false);
      } else {
        foreach_adamw(l, std::get<2>(key), o);
      }
    }
  }
}

OptimizerKind parse_optimizer(const std::string& s) {
  if (s == "sgd") return OptimizerKind::kSGD;
  if (s == "adamw") return OptimizerKind::kAdamW;
  throw std::invalid_argument("--optimizer must be sgd or adamw, not '" + s + "'");
}
std::string to_string(OptimizerKind k) { return k == OptimizerKind::kSGD ? "sgd" : "adamw"; }

std::unique_ptr<torch::optim::Optimizer> make_optimizer(std::vector<torch::Tensor> params,
                                                        const OptimizerOptions& o) {
  if (o.kind == OptimizerKind::kAdamW) {
    auto ao = torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay);
    return std::make_unique<AdamW>(std::move(params), ao);
  }
  auto so = torch::optim::SGDOptions(o.lr).momentum(o.momentum).weight_decay(o.weight_decay);
  so.nesterov(o.nesterov && o.momentum > 0);
  return std::make_unique<SGD>(std::move(params), so);
}

void set_lr(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& g : optimizer.param_groups()) g.options().set_lr(lr);
}

ckpt::Tensors optimizer_state(torch::optim::Optimizer& optimizer,
                              const std::vector<std::pair<std::string, torch::Tensor>>& named_params) {
  ckpt::Tensors out;
  auto& state = optimizer.state();
  for (const auto& [name, p] : named_params) {
    auto it = state.find(p.unsafeGetTensorImpl());
    if (it == state.end()) continue;
    if (auto* s = dynamic_cast<torch::optim::SGDParamState*>(it->second.get())) {
      if (s->momentum_buffer().defined()) out.emplace_back(name + ".momentum_buffer", s->momentum_buffer());
    } else if (auto* a = dynamic_cast<torch::optim::AdamWParamState*>(it->second.get())) {
      out.emplace_back(name + ".step", torch::full({}, a->step(), torch::kInt64));
      out.emplace_back(name + ".exp_avg", a->exp_avg());
      out.emplace_back(name + ".exp_avg_sq", a->exp_avg_sq());
      if (a->max_exp_avg_sq().defined()) out.emplace_back(name + ".max_exp_avg_sq", a->max_exp_avg_sq());
    }
  }
  return out;
}

void load_optimizer_state(torch::optim::Optimizer& optimizer,
                          const std::vector<std::pair<std::string, torch::Tensor>>& named_params,
                          const ckpt::Tensors& saved, const std::string& source) {
  std::map<std::string, torch::Tensor> by_key(saved.begin(), saved.end());
  auto& state = optimizer.state();
  const bool adamw = dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr;
  const bool amsgrad =
      adamw && !optimizer.param_groups().empty() &&
      static_cast<const torch::optim::AdamWOptions&>(optimizer.param_groups()[0].options()).amsgrad();
  auto tensor = [&](const std::string& name, const std::string& what, const torch::Tensor& p) -> torch::Tensor {
    auto it = by_key.find(name + "." + what);
    if (it == by_key.end()) return {};
    if (!it->second.sizes().equals(p.sizes())) {
      std::ostringstream s;
      s << it->second.sizes();
      throw std::runtime_error(source + ": optimizer state " + what + " of '" + name + "' has shape " + s.str());
    }
    return it->second.to(p.options()).contiguous(p.suggest_memory_format());
  };
  for (const auto& [name, p] : named_params) {
    if (!adamw) {
      auto buf = tensor(name, "momentum_buffer", p);
      if (!buf.defined()) continue;
      auto st = std::make_unique<torch::optim::SGDParamState>();
      st->momentum_buffer(buf);
      state[p.unsafeGetTensorImpl()] = std::move(st);
      continue;
    }
    auto step = by_key.find(name + ".step");
    if (step == by_key.end()) continue;
    if (step->second.numel() != 1 || step->second.is_floating_point() || step->second.item<int64_t>() < 1)
      throw std::runtime_error(source + ": optimizer state step of '" + name + "' is not a count of 1 or more");
    auto m = tensor(name, "exp_avg", p), v = tensor(name, "exp_avg_sq", p);
    auto vmax = amsgrad ? tensor(name, "max_exp_avg_sq", p) : torch::Tensor();
    if (!m.defined() || !v.defined() || (amsgrad && !vmax.defined()))
      throw std::runtime_error(source + ": optimizer state of '" + name + "' lacks its moments");
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(step->second.item<int64_t>());
    st->exp_avg(m);
    st->exp_avg_sq(v);
    if (amsgrad) st->max_exp_avg_sq(vmax);
    state[p.unsafeGetTensorImpl()] = std::move(st);
  }
}

torch::Tensor clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  std::map<ListKey, std::vector<at::Tensor>> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads[list_key(p.grad())].push_back(p.grad());
  if (grads.empty()) return {};
  std::vector<at::Tensor> norms;
  c10::Device first = grads.begin()->second.front().device();
  for (auto& [key, g] : grads)
    for (auto& n : at::_foreach_norm(g, 2)) norms.push_back(n.to(first, at::kFloat));
  auto total = at::stack(norms).norm(2);
  auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  for (auto& [key, g] : grads) at::_foreach_mul_(g, coef.to(g.front().device()));
  return total;
}

}  // namespace aq::train
