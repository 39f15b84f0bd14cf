#include "aq/step.h"

#include "aq/adaptive.h"
#include "aq/sample_bits.h"
#include "aq/memory.h"
#include "aq/modules.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/functional/loss.h>

#include <stdexcept>

namespace aq::train {

Amp parse_amp(const std::string& s) {
  if (s == "off" || s == "fp32" || s == "none") return Amp::kOff;
  if (s == "bf16" || s == "bfloat16") return Amp::kBFloat16;
  if (s == "fp16" || s == "float16") return Amp::kFloat16;
  throw std::invalid_argument("--amp must be off, bf16 or fp16, not '" + s + "'");
}
std::string to_string(Amp a) { return a == Amp::kOff ? "off" : a == Amp::kBFloat16 ? "bf16" : "fp16"; }

AutocastScope::AutocastScope(const c10::Device& d, Amp amp) : type_(d.type()), on_(amp != Amp::kOff) {
  if (!on_) return;
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, amp == Amp::kBFloat16 ? at::kBFloat16 : at::kHalf);
}

AutocastScope::~AutocastScope() {
  if (!on_) return;
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
  at::autocast::clear_cache();
}

GradScaler::GradScaler(const c10::Device& d)
    : scale_(torch::full({1}, 65536.0, torch::TensorOptions().device(d))),
      growth_tracker_(torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt).device(d))) {}

bool GradScaler::unscale(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  auto found_inf = torch::zeros({1}, scale_.options());
  at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale_.reciprocal());
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf, 2.0, 0.5, 2000);
  return found_inf.item<float>() == 0;
}

Step::Step(models::Model& model, const c10::Device& device, StepOptions options)
    : model_(model),
      device_(device),
      options_(std::move(options)),
      reallocates_(adaptive(options_.quant) && options_.quant.perlayer),
      params_(model.parameters()) {
  if (options_.amp == Amp::kFloat16) scaler_.emplace(device);
}

StepResult Step::operator()(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                            torch::optim::Optimizer* optimizer) {
  namespace F = torch::nn::functional;
  StepResult r;
  model_.zero_grad();
  auto x = images.to(device_, /*non_blocking=*/true);
  auto y = labels.to(device_, /*non_blocking=*/true);
  const int64_t before = memory(device_).allocated;
  set_batch_indices(indices);
  torch::Tensor logits;
  {
    AutocastScope ac(device_, options_.amp);
    logits = model_.forward(x);
  }
  logits = logits.to(torch::kFloat);
  auto loss = F::cross_entropy(logits, y, F::CrossEntropyFuncOptions().label_smoothing(options_.label_smoothing));
  r.activations = memory(device_).allocated - before;
  if (options_.count_saved)
    for (const auto& m : model_.modules(/*include_self=*/false))
      if (auto* q = dynamic_cast<QLayer*>(m.get())) r.aq_saved += q->state()->saved_bytes;
  bool finite = true;
  const torch::Tensor to_backward = scaler_ ? loss * scaler_->scale() : loss;
  if (options_.before_backward) options_.before_backward(to_backward);
  to_backward.backward();
  if (scaler_) finite = scaler_->unscale(params_);
  if (optimizer && finite) {
    optimizer->step();
    r.updated = true;
  }
  if (reallocates_) adapt_layers(model_, options_.defer_reallocation);
  r.loss = loss.detach();
  r.logits = logits.detach();
  r.labels = y;
  return r;
}

}  // namespace aq::train
