// Activation checkpointing (aq/recompute.h).
#include "aq/recompute.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/nn/modules/dropout.h>

#include <iterator>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

namespace aq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast is per device type; a recomputation runs what the forward ran on
// any of them.
constexpr c10::DeviceType kAutocastTypes[] = {c10::DeviceType::CPU, c10::DeviceType::CUDA};

struct AutocastState {
  bool enabled[std::size(kAutocastTypes)] = {};
  c10::ScalarType dtype[std::size(kAutocastTypes)] = {};
  bool cache_enabled = true;

  static AutocastState current() {
    AutocastState s;
    for (size_t i = 0; i < std::size(kAutocastTypes); ++i) {
      s.enabled[i] = at::autocast::is_autocast_enabled(kAutocastTypes[i]);
      s.dtype[i] = at::autocast::get_autocast_dtype(kAutocastTypes[i]);
    }
    s.cache_enabled = at::autocast::is_autocast_cache_enabled();
    return s;
  }
  void set() const {
    for (size_t i = 0; i < std::size(kAutocastTypes); ++i) {
      at::autocast::set_autocast_enabled(kAutocastTypes[i], enabled[i]);
      at::autocast::set_autocast_dtype(kAutocastTypes[i], dtype[i]);
    }
    at::autocast::set_autocast_cache_enabled(cache_enabled);
  }
  bool any() const {
    for (bool e : enabled)
      if (e) return true;
    return false;
  }
};

// The forward's autocast state while in scope, the thread's own after.  The
// cast cache goes with it: it holds casts of the parameters, which the
// optimizer changes before the next step.
class AutocastAs {
 public:
  explicit AutocastAs(const AutocastState& s) : prev_(AutocastState::current()), on_(s.any()) { s.set(); }
  ~AutocastAs() {
    if (on_) at::autocast::clear_cache();
    prev_.set();
  }
  AutocastAs(const AutocastAs&) = delete;
  AutocastAs& operator=(const AutocastAs&) = delete;

 private:
  AutocastState prev_;
  bool on_;
};

struct GeneratorState {
  at::Generator generator;
  at::Tensor state;
};

at::Tensor state_of(at::Generator g) {
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}
void set_state(at::Generator g, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

// The generators a block on `device` draws from: the CPU's, and the device's.
std::vector<GeneratorState> generator_states(const c10::Device& device) {
  std::vector<GeneratorState> s;
  at::Generator cpu = at::globalContext().defaultGenerator(c10::Device(c10::kCPU));
  s.push_back({cpu, state_of(cpu)});
  if (!device.is_cpu()) {
    at::Generator dev = at::globalContext().defaultGenerator(device);
    s.push_back({dev, state_of(dev)});
  }
  return s;
}

// The generators at the forward's state while in scope, at their own after
// (the recomputation draws nothing from the step's sequence).
class GeneratorsAs {
 public:
  explicit GeneratorsAs(const std::vector<GeneratorState>& saved) {
    for (const auto& s : saved) {
      at::Generator g = s.generator;
      now_.push_back({g, state_of(g)});
      set_state(g, s.state);
    }
  }
  ~GeneratorsAs() {
    for (auto& s : now_) set_state(s.generator, s.state);
  }
  GeneratorsAs(const GeneratorsAs&) = delete;
  GeneratorsAs& operator=(const GeneratorsAs&) = delete;

 private:
  std::vector<GeneratorState> now_;
};

// The block's buffers as they were when in scope began, put back on exit:
// a recomputed BatchNorm updates its running statistics (and batch count)
// again, which the forward already did.
class BuffersKept {
 public:
  explicit BuffersKept(torch::nn::Module& block) {
    torch::NoGradGuard no_grad;
    for (auto& b : block.buffers())
      if (b.defined()) kept_.emplace_back(b, b.clone());
  }
  ~BuffersKept() {
    torch::NoGradGuard no_grad;
    for (auto& [b, copy] : kept_) b.copy_(copy);
  }
  BuffersKept(const BuffersKept&) = delete;
  BuffersKept& operator=(const BuffersKept&) = delete;

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> kept_;
};

// What backward needs besides the input.
struct Recomputation : torch::CustomClassHolder {
  std::shared_ptr<torch::nn::Module> block;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::vector<torch::Tensor> params;  // as given to the autograd function, in its order
  AutocastState autocast;
  std::vector<GeneratorState> generators;  // empty: not preserved
  bool preserve_rng = false;
};
using RecomputationPtr = c10::intrusive_ptr<Recomputation>;

struct RecomputeFn : torch::autograd::Function<RecomputeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList /*params*/,
                            const RecomputationPtr& r) {
    r->autocast = AutocastState::current();
    if (r->preserve_rng) r->generators = generator_states(x.device());
    ctx->save_for_backward({x});
    ctx->saved_data["x_requires_grad"] = x.requires_grad();
    ctx->saved_data["recomputation"] = c10::IValue::make_capsule(r);
    return r->forward(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto r = c10::static_intrusive_pointer_cast<Recomputation>(ctx->saved_data["recomputation"].toCapsule());
    variable_list out(r->params.size() + 2);  // x, each parameter, the recomputation
    if (!grads[0].defined()) return out;
    at::Tensor x = ctx->get_saved_variables()[0].detach();
    x.requires_grad_(ctx->saved_data["x_requires_grad"].toBool());
    // Put back once the recomputed graph is gone: its nodes keep the
    // buffers (BatchNorm's running statistics) at their version.
    const BuffersKept buffers(*r->block);
    at::Tensor y;
    {
      std::optional<GeneratorsAs> rng;
      if (!r->generators.empty()) rng.emplace(r->generators);
      const AutocastAs autocast(r->autocast);
      const torch::AutoGradMode grad(true);
      y = r->forward(x);
    }
    if (!y.requires_grad()) return out;
    // Gradients for what needs them; torch::autograd::grad refuses the rest.
    std::vector<at::Tensor> wrt;
    std::vector<size_t> slot;
    if (x.requires_grad()) wrt.push_back(x), slot.push_back(0);
    for (size_t i = 0; i < r->params.size(); ++i)
      if (r->params[i].requires_grad()) wrt.push_back(r->params[i]), slot.push_back(i + 1);
    if (wrt.empty()) return out;
    const variable_list g = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false,
                                                  /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < g.size(); ++i) out[slot[i]] = g[i];
    return out;
  }
};

}  // namespace

bool draws_random_numbers(torch::nn::Module& block) {
  for (const auto& m : block.modules(/*include_self=*/true)) {
    if (!m->is_training()) continue;
    double p = 0;
    if (auto* d = dynamic_cast<torch::nn::DropoutImpl*>(m.get())) p = d->options.p();
    else if (auto* d = dynamic_cast<torch::nn::Dropout2dImpl*>(m.get())) p = d->options.p();
    else if (auto* d = dynamic_cast<torch::nn::Dropout3dImpl*>(m.get())) p = d->options.p();
    else if (auto* d = dynamic_cast<torch::nn::AlphaDropoutImpl*>(m.get())) p = d->options.p();
    else if (auto* d = dynamic_cast<torch::nn::FeatureAlphaDropoutImpl*>(m.get())) p = d->options.p();
    if (p > 0) return true;
  }
  return false;
}

torch::Tensor recompute(const std::shared_ptr<torch::nn::Module>& block,
                        std::function<torch::Tensor(const torch::Tensor&)> forward, const torch::Tensor& input,
                        const RecomputeOptions& options) {
  if (!block) throw std::invalid_argument("aq: recompute: no block");
  auto r = c10::make_intrusive<Recomputation>();
  r->params = block->parameters();
  bool needed = input.requires_grad();
  for (const auto& p : r->params) needed = needed || p.requires_grad();
  if (!at::GradMode::is_enabled() || !needed) return forward(input);
  r->block = block;
  r->forward = std::move(forward);
  r->preserve_rng = options.preserve_rng.value_or(draws_random_numbers(*block));
  const std::vector<torch::Tensor> params = r->params;
  return RecomputeFn::apply(input, at::TensorList(params), r);
}

}  // namespace aq
