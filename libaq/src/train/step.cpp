#include "aq/step.h"

#include "aq/adaptive.h"
#include "aq/loss.h"
#include "aq/optim.h"
#include "aq/recompute.h"
#include "aq/sample_bits.h"
#include "aq/memory.h"
#include "aq/modules.h"
#include "aq/log.h"
#include "aq/optim.h"

#include "aq_config.h"

#include <ATen/autocast_mode.h>

#include <stdexcept>

#if AQ_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

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

namespace {

bool batch_norm_without_momentum(torch::nn::Module& m) {
  auto lacks = [](const torch::nn::BatchNormOptions& o) { return o.track_running_stats() && !o.momentum(); };
  if (auto* b = dynamic_cast<torch::nn::BatchNorm1dImpl*>(&m)) return lacks(b->options);
  if (auto* b = dynamic_cast<torch::nn::BatchNorm2dImpl*>(&m)) return lacks(b->options);
  if (auto* b = dynamic_cast<torch::nn::BatchNorm3dImpl*>(&m)) return lacks(b->options);
  return false;
}

// Why a model's step cannot be captured ("" if nothing known stops it).
std::string capture_blocker(models::Model& model, const c10::Device& device, const StepOptions& o) {
  if (!AQ_WITH_CUDA) return "aq was built without CUDA";
  if (!device.is_cuda()) return "they need a CUDA device";
  if (o.amp == Amp::kFloat16) return "fp16 loss scaling decides on the host whether to update";
  if (o.before_backward) return "a data-parallel run's gradient all-reduce runs from the host";
  if (o.all_gather) return "a data-parallel run's adaptive statistics are gathered from the host";
  if (model.recomputes_blocks() && draws_random_numbers(model))
    return "recomputed blocks with dropout put the random generators' state back from the host";
  for (const auto& m : model.modules(/*include_self=*/false)) {
    if (batch_norm_without_momentum(*m)) return "a BatchNorm layer without momentum reads its batch count on the host";
    const auto* q = dynamic_cast<const QLayer*>(m.get());
    if (!q) continue;
    if (q->config().swap) return "L4 and L5 keep activations in host memory";
    if (adaptive(q->config()) && q->config().usegradient && o.index_bound <= 0)
      return "per-sample gradient statistics need the dataset's size";
  }
  return "";
}

}  // namespace

#if AQ_WITH_CUDA
struct Step::Graph {
  Graph(const c10::Device& d, int64_t warmup)
      : stream(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d.index())), eager_left(warmup) {}
  // Capture needs a stream other than the default; warm-up runs there too,
  // so that what LibTorch sets up per stream (cuBLAS workspaces) exists
  // before a capture.
  c10::cuda::CUDAStream stream;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  at::Tensor x, y, idx;         // static inputs: a replay reads the batch from here
  at::Tensor loss, logits;      // static outputs
  int64_t activations = 0, aq_saved = 0;
  int64_t since_capture = 0;
  int64_t eager_left;           // eager steps before the first capture
};
#else
struct Step::Graph {};
#endif

Step::Step(models::Model& model, const c10::Device& device, StepOptions options)
    : model_(model),
      device_(device),
      options_(std::move(options)),
      reallocates_(adaptive(options_.quant) && options_.quant.perlayer),
      params_(model.parameters()) {
  if (options_.amp == Amp::kFloat16) scaler_.emplace(device);
  if (shares_stats()) set_shared_gradient_stats(model_, true);
  if (!options_.cuda_graphs) return;
  eager_reason_ = capture_blocker(model_, device_, options_);
  if (!eager_reason_.empty()) {
    log().info("CUDA graphs off: {}; the step runs eagerly", eager_reason_);
    return;
  }
#if AQ_WITH_CUDA
  graph_ = std::make_unique<Graph>(device_, std::max<int64_t>(1, options_.graph_warmup));
#endif
}

Step::~Step() {
  if (shares_stats()) set_shared_gradient_stats(model_, false);
}

void Step::fall_back(const std::string& why) {
  eager_reason_ = why;
  graph_.reset();
  log().warn("CUDA graphs off: {}; the step runs eagerly from now on", why);
}

StepResult Step::operator()(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                            torch::optim::Optimizer* optimizer) {
  if (graph_) return graphed(images, labels, indices, optimizer);
  return eager(images, labels, indices, optimizer, reallocates_);
}

Step::Forward Step::forward_loss(const torch::Tensor& x, const torch::Tensor& y) {
  Forward f;
  const int64_t before = memory(device_).allocated;
  {
    AutocastScope ac(device_, options_.amp);
    f.logits = model_.forward(x);
  }
  f.logits = f.logits.to(torch::kFloat);
  f.loss = cross_entropy(f.logits, y, options_.label_smoothing);
  f.activations = memory(device_).allocated - before;
  if (options_.count_saved)
    for (const auto& m : model_.modules(/*include_self=*/false))
      if (auto* q = dynamic_cast<QLayer*>(m.get())) f.aq_saved += q->state()->saved_bytes;
  return f;
}

StepResult Step::eager(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                       torch::optim::Optimizer* optimizer, bool reallocate) {
  StepResult r;
  model_.zero_grad();
  auto x = images.to(device_, /*non_blocking=*/true);
  auto y = labels.to(device_, /*non_blocking=*/true);
  set_batch_indices(indices);
  const Forward f = forward_loss(x, y);
  const torch::Tensor& loss = f.loss;
  r.activations = f.activations;
  r.aq_saved = f.aq_saved;
  bool finite = true;
  const torch::Tensor to_backward = scaler_ ? loss * scaler_->scale() : loss;
  if (options_.before_backward) options_.before_backward(to_backward);
  to_backward.backward();
  if (scaler_) finite = scaler_->unscale(params_);
  if (options_.clip_grad_norm > 0 && finite) clip_grad_norm(params_, options_.clip_grad_norm);
  if (optimizer && finite) {
    optimizer->step();
    r.updated = true;
  }
  if (shares_stats()) share_gradient_stats(model_, options_.all_gather, options_.index_bound);
  if (reallocate) adapt_layers(model_, options_.defer_reallocation, options_.all_gather);
  r.loss = loss.detach();
  r.logits = f.logits.detach();
  r.labels = y;
  return r;
}

#if AQ_WITH_CUDA
StepResult Step::graphed(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                         torch::optim::Optimizer* optimizer) {
  auto* update = optimizer ? dynamic_cast<GraphSafeOptimizer*>(optimizer) : nullptr;
  if (optimizer && !update) {
    fall_back("the optimizer is not graph-safe");
    return eager(images, labels, indices, optimizer, reallocates_);
  }
  const c10::cuda::CUDAGuard device_guard(device_);
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device_.index());
  const c10::cuda::CUDAStream stream = graph_->stream;
  // The step's work runs on the graph's stream, after what the caller
  // queued before it, and before what the caller queues after it.
  at::cuda::CUDAEvent entered, left;
  entered.record(caller);
  entered.block(stream);
  StepResult r;
  {
    const c10::cuda::CUDAStreamGuard on(stream);
    Graph& g = *graph_;
    const auto x = images.to(device_, /*non_blocking=*/true);
    const bool fits = g.x.defined() && g.x.sizes() == x.sizes() && g.x.strides() == x.strides() &&
                      g.x.scalar_type() == x.scalar_type() && g.y.sizes() == labels.sizes() &&
                      g.idx.defined() == indices.defined() && (!indices.defined() || g.idx.sizes() == indices.sizes());
    if (g.eager_left > 0 || (g.graph && !fits) || (update && !update->ready())) {
      // Warm-up (lazy initialisation, cuDNN autotuning, optimizer state), or
      // a batch of another shape (an epoch's last): eagerly.  Its forward
      // leaves the layers' statistics in tensors the graph does not write,
      // so the next full batch captures anew.
      const bool warming = g.eager_left > 0;
      if (warming) --g.eager_left;
      if (!warming) g.graph.reset();
      r = eager(x, labels, indices, optimizer, warming && reallocates_);
    } else {
      const bool capture = !g.graph || (reallocates_ && g.since_capture >= options_.graph_refresh);
      if (capture) {
        try {
          capture_step(x, labels, indices, update);
        } catch (const std::exception& e) {
          std::string what = e.what();
          what = what.substr(0, what.find('\n'));
          fall_back("capture failed (" + what + ")");
          model_.zero_grad();
          r = eager(x, labels, indices, optimizer, reallocates_);
          left.record(stream);
          left.block(caller);
          return r;
        }
      }
      g.x.copy_(x, /*non_blocking=*/true);
      g.y.copy_(labels, /*non_blocking=*/true);
      if (indices.defined()) g.idx.copy_(indices, /*non_blocking=*/true);
      if (update) update->sync();
      g.graph->replay();
      ++g.since_capture;
      r.loss = g.loss.clone();
      r.logits = g.logits.clone();
      r.labels = g.y.clone();
      r.activations = g.activations;
      r.aq_saved = g.aq_saved;
      r.updated = update != nullptr;
      r.replayed = true;
    }
  }
  left.record(stream);
  left.block(caller);
  return r;
}

namespace {
// A capture that failed before its end leaves the device's Philox state
// marked as capturing, and every eager draw after it would throw: the state
// is replaced by a fresh one at the same seed and offset.
void release_generator(const c10::Device& device) {
  auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.index());
  const std::lock_guard<std::mutex> lock(gen.mutex());
  auto* impl = gen.get<at::CUDAGeneratorImpl>();
  const auto state = c10::make_intrusive<at::CUDAGeneratorState>(impl->current_seed(), impl->philox_offset_per_thread());
  impl->graphsafe_set_state(c10::make_intrusive<at::CUDAGeneratorImpl>(device.index(), state));
}
}  // namespace

void Step::capture_step(const torch::Tensor& x, const torch::Tensor& labels, const torch::Tensor& indices,
                        GraphSafeOptimizer* update) {
  Graph& g = *graph_;
  // Per-layer budgets from the statistics of the last step that ran: they
  // size the packed copies, which the graph then keeps.
  if (reallocates_) adapt_layers(model_, /*defer=*/false, options_.all_gather);
  g.graph.reset();
  g.x = at::empty_strided(x.sizes(), x.strides(), x.options());
  g.y = at::empty(labels.sizes(), labels.options().device(device_));
  g.idx = indices.defined() ? at::empty(indices.sizes(), indices.options().dtype(at::kLong).device(device_))
                            : at::Tensor();
  g.x.copy_(x, /*non_blocking=*/true);
  g.y.copy_(labels, /*non_blocking=*/true);
  if (g.idx.defined()) g.idx.copy_(indices, /*non_blocking=*/true);
  if (options_.index_bound > 0)
    for (const auto& m : model_.modules(/*include_self=*/false))
      if (auto* q = dynamic_cast<QLayer*>(m.get()); q && q->state()->sample_stat.defined())
        reserve_sample_stat(*q->state(), options_.index_bound, device_);
  set_batch_indices(g.idx);
  // The gradients the graph writes are its own (allocated in its capture).
  model_.zero_grad();
  if (update) update->sync();
  c10::cuda::device_synchronize();
  g.graph = std::make_unique<at::cuda::CUDAGraph>();
  // Thread-local capture: the loader's threads allocate pinned host memory
  // while the step is captured, and in global mode any thread's unsafe call
  // (cudaHostAlloc, an event query) invalidates the capture.
  g.graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  try {
    const Forward f = forward_loss(g.x, g.y);
    g.activations = f.activations;
    g.aq_saved = f.aq_saved;
    f.loss.backward();
    if (options_.clip_grad_norm > 0) clip_grad_norm(params_, options_.clip_grad_norm);
    if (update) update->update();
    g.loss = f.loss.detach();
    g.logits = f.logits.detach();
  } catch (...) {
    try {
      g.graph->capture_end();
    } catch (...) {
    }
    g.graph.reset();
    (void)cudaGetLastError();
    release_generator(device_);
    throw;
  }
  g.graph->capture_end();
  g.since_capture = 0;
  ++captures_;
}
#else
StepResult Step::graphed(const torch::Tensor& images, const torch::Tensor& labels, const torch::Tensor& indices,
                         torch::optim::Optimizer* optimizer) {
  return eager(images, labels, indices, optimizer, reallocates_);
}
#endif

}  // namespace aq::train
