#include "aq/evaluate.h"

#include "data_parallel.h"

#include "aq/log.h"
#include "aq/loss.h"
#include "aq/step.h"
#include "fields.h"

#include <torch/nn/functional/loss.h>
#include <torch/torch.h>

#include <set>
#include <stdexcept>

namespace aq::train {

using detail::counter;
using detail::meta;
using detail::shape;

namespace {

void copy_named(const torch::OrderedDict<std::string, torch::Tensor>& into, const ckpt::Tensors& from,
                const std::string& kind, const std::string& source) {
  torch::NoGradGuard no_grad;
  std::set<std::string> seen;
  for (const auto& [name, t] : from) {
    const torch::Tensor* dst = into.find(name);
    if (!dst) throw std::runtime_error(source + ": " + kind + " '" + name + "' is not in the model");
    if (!dst->sizes().equals(t.sizes()))
      throw std::runtime_error(source + ": " + kind + " '" + name + "' has shape " + shape(t) + ", the model's " +
                               shape(*dst));
    const_cast<torch::Tensor*>(dst)->copy_(t);
    seen.insert(name);
  }
  for (const auto& item : into)
    if (!seen.count(item.key()))
      throw std::runtime_error(source + ": checkpoint lacks the model's " + kind + " '" + item.key() + "'");
}

}  // namespace

void load_state(models::Model& model, const ckpt::Checkpoint& c, const std::string& source) {
  try {
    copy_named(model.named_parameters(), c.parameters, "parameter", source);
    copy_named(model.named_buffers(), c.buffers, "buffer", source);
  } catch (const c10::Error& e) {  // LibTorch's message, with the file it is about
    const std::string m = e.what_without_backtrace();
    throw std::runtime_error(source + ": " + m.substr(0, m.find('\n')));
  }
}

std::string first_bad_values(const ckpt::Checkpoint& c) {
  const std::string var = "running_var";
  for (const auto* list : {&c.parameters, &c.buffers})
    for (const auto& [name, t] : *list) {
      if (!t.is_floating_point() || t.numel() == 0) continue;
      if (!torch::isfinite(t).all().item<bool>()) return "'" + name + "' holds inf or NaN: the run had diverged";
      if (name.size() >= var.size() && name.compare(name.size() - var.size(), var.size(), var) == 0 &&
          (t < 0).any().item<bool>())
        return "'" + name + "' holds negative values, which a variance cannot: the file is damaged";
    }
  return "";
}

models::ModelPtr model_from_checkpoint(const ckpt::Checkpoint& c, const std::string& source,
                                       const QuantConfig& config) {
  const std::string arch = meta(c, "arch", source);
  models::ModelPtr m;
  auto options = models::options_from_parameters(arch, c.parameters);
  // Heads leave no trace in the parameters' shapes: aq-train records them.
  if (auto h = c.counters.find("heads"); h != c.counters.end()) options.heads = h->second;
  try {
    m = models::build(arch, counter(c, "in_channels", source), counter(c, "num_classes", source), options, config);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(source + ": " + e.what());
  }
  load_state(*m, c, source);
  if (const std::string bad = first_bad_values(c); !bad.empty())
    log().warn("{}: {}; its results are meaningless", source, bad);
  return m;
}

EvalResult evaluate(models::Model& model, data::Loader& loader, const c10::Device& device, Amp amp,
                    int64_t max_batches, const std::function<bool()>& stop,
                    const std::function<void(int64_t, int64_t)>& progress) {
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  auto loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  auto top1 = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto top5 = top1.clone();
  int64_t images = 0, scored = 0, batches = 0;
  bool per_token = false;
  loader.start(0);
  const int64_t total = max_batches > 0 ? std::min(max_batches, loader.batches_per_epoch()) : loader.batches_per_epoch();
  bool stopped = false;
  while (auto b = loader.next()) {
    if (max_batches > 0 && batches >= max_batches) break;
    if (stop && stop()) {
      stopped = true;
      break;
    }
    ++batches;
    auto x = b->images.to(device, /*non_blocking=*/true);
    auto y = b->labels.to(device, /*non_blocking=*/true);
    torch::Tensor logits;
    {
      AutocastScope ac(device, amp);
      logits = model.forward(x);
    }
    logits = logits.to(torch::kFloat);
    // Per sample, or per token for a token model (logits [B, T, V]).
    loss_sum += cross_entropy(logits, y, 0, /*sum=*/true).to(torch::kDouble);
    const int64_t k = std::min<int64_t>(5, logits.size(-1));
    auto topk = std::get<1>(logits.topk(k, -1));
    auto hit = topk.eq(y.unsqueeze(-1));
    top1 += hit.select(-1, 0).sum();
    top5 += hit.any(-1).sum();
    images += y.size(0);
    scored += y.numel();
    per_token = y.dim() == 2;
    if (progress) progress(batches, total);
  }
  model.train(was_training);
  EvalResult r;
  r.images = images;
  r.stopped = stopped;
  if (per_token) r.tokens = scored;
  r.loss_sum = loss_sum.item<double>();
  r.correct1 = top1.item<int64_t>();
  r.correct5 = top5.item<int64_t>();
  if (scored) {
    r.loss = r.loss_sum / scored;
    r.top1 = 100.0 * r.correct1 / scored;
    r.top5 = 100.0 * r.correct5 / scored;
  }
  return r;
}

EvalRanks::EvalRanks(std::unique_ptr<detail::DataParallel> dp) : dp_(std::move(dp)) {}
EvalRanks::~EvalRanks() = default;

std::unique_ptr<EvalRanks> EvalRanks::connect(c10::Device& device, std::chrono::milliseconds timeout) {
  auto dp = detail::DataParallel::connect(device, timeout);
  if (!dp) return nullptr;
  return std::unique_ptr<EvalRanks>(new EvalRanks(std::move(dp)));
}

int64_t EvalRanks::rank() const { return dp_->rank(); }
int64_t EvalRanks::size() const { return dp_->size(); }

EvalResult EvalRanks::reduce(const EvalResult& mine, bool failed) {
  if (dp_->agree(failed ? 1 : 0)) throw std::runtime_error("the evaluation failed on another rank");
  return dp_->reduce(mine);
}

}  // namespace aq::train
