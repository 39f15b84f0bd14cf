#include "aq/optim.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>

#include <algorithm>
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
  if (t < warm) return lr * (t + 1) / warm;
  switch (kind) {
    case Schedule::kCosine:
      return lr * 0.5 * (1 + std::cos(M_PI * (t - warm) / std::max(1.0, total - warm)));
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

torch::Tensor SGD::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  sync();
  update();
  return loss;
}

at::Tensor& SGD::lr_on(size_t group, const c10::Device& device) {
  at::Tensor& t = lr_[{group, device.type(), device.index()}];
  if (!t.defined()) t = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  return t;
}

void SGD::sync() {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const double lr = static_cast<const torch::optim::SGDOptions&>(param_groups_[g].options()).lr();
    std::vector<c10::Device> seen;
    for (const auto& p : param_groups_[g].params()) {
      if (!p.is_cuda() || std::find(seen.begin(), seen.end(), p.device()) != seen.end()) continue;
      seen.push_back(p.device());
      lr_on(g, p.device()).fill_(lr);
    }
  }
}

bool SGD::ready() const {
  for (const auto& group : param_groups_) {
    if (static_cast<const torch::optim::SGDOptions&>(group.options()).momentum() == 0) continue;
    for (const auto& p : group.params())
      if (p.grad().defined() && !state_.count(p.unsafeGetTensorImpl())) return false;
  }
  return true;
}

namespace {
// One fused launch (learning rate read on the device) needs tensors alike:
// a parameter, its gradient and its buffer with the same strides.
bool fusable(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& bufs) {
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].is_non_overlapping_and_dense() || grads[i].strides() != params[i].strides()) return false;
    if (!bufs.empty() && (!bufs[i].defined() || bufs[i].strides() != params[i].strides())) return false;
  }
  return true;
}
}  // namespace

void SGD::update() {
  torch::NoGradGuard no_grad;
  for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
    auto& group = param_groups_[gi];
    const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
    // The multi-tensor kernels take lists of one device and dtype.
    struct Lists {
      std::vector<at::Tensor> params, grads, bufs;
    };
    std::map<std::tuple<c10::DeviceType, c10::DeviceIndex, c10::ScalarType>, Lists> lists;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      Lists& l = lists[{p.device().type(), p.device().index(), p.scalar_type()}];
      l.params.push_back(p);
      l.grads.push_back(p.grad());
      if (o.momentum() != 0) {
        auto it = state_.find(p.unsafeGetTensorImpl());
        l.bufs.push_back(it == state_.end() ? at::Tensor()
                                            : static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer());
      }
    }
    for (auto& [key, l] : lists) {
      if (std::get<0>(key) == c10::kCUDA && fusable(l.params, l.grads, l.bufs)) {
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

}  // namespace aq::train
