#include "aq/variance.h"

#include "aq/adaptive.h"
#include "aq/checkpoint.h"
#include "aq/modules.h"
#include "subject.h"

#include <torch/torch.h>

#include <stdexcept>

namespace aq::variance {

using train::detail::KeepBuffers;

namespace {

// The layers whose weight gradients are measured: conv and linear layers,
// and the norms and embeddings of transformers (compression upstream of
// them, in attention, GELU and the norms, reaches their gradients too).
bool measured(const torch::nn::Module& m) {
  return dynamic_cast<const torch::nn::LinearImpl*>(&m) || dynamic_cast<const torch::nn::LayerNormImpl*>(&m) ||
         dynamic_cast<const QRMSNormImpl*>(&m) || dynamic_cast<const torch::nn::EmbeddingImpl*>(&m) ||
         dynamic_cast<const torch::nn::Conv1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::Conv2dImpl*>(&m) || dynamic_cast<const torch::nn::Conv3dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose2dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose3dImpl*>(&m);
}

void reset_adaptive(torch::nn::Module& model) {
  for (const auto& m : model.modules()) {
    if (auto* q = dynamic_cast<QLayer*>(m.get())) {
      LayerState& st = *q->state();
      st.budget = 0;
      st.sample_stat = at::Tensor();
      st.grad_mean = at::Tensor();
      st.last_bits = at::Tensor();
    }
  }
}

}  // namespace

std::vector<Result> measure(models::Model& model, data::Loader& loader, const c10::Device& device,
                            const std::vector<QuantConfig>& configs, const Options& o, train::Amp amp) {
  if (o.batches < 1 || o.samples < 2)
    throw std::invalid_argument("variance needs at least 1 batch and 2 samples per batch");
  std::vector<std::string> names;
  std::vector<torch::Tensor> weights;
  for (const auto& item : model.named_modules()) {
    if (!measured(*item.value())) continue;
    const auto own = item.value()->named_parameters(false);
    if (!own.contains("weight") || !own["weight"].requires_grad()) continue;  // a norm without affine weights
    names.push_back(item.key() + ".weight");
    weights.push_back(own["weight"]);
  }
  const KeepBuffers keep(model);
  std::vector<data::Batch> batches;
  loader.start(0);
  while (static_cast<int64_t>(batches.size()) < o.batches) {
    auto b = loader.next();
    if (!b) break;
    b->images = b->images.to(device);
    b->labels = b->labels.to(device);
    batches.push_back(*b);
  }
  if (batches.empty()) throw std::runtime_error("variance: the dataset yields no batch");
  const double K = static_cast<double>(batches.size());
  model.train();
  // Budgets reallocated now, not a step later: every sample of a batch is
  // drawn under the same allocation.
  train::StepOptions so;
  so.amp = amp;
  so.defer_reallocation = false;
  auto gradients = [&](const data::Batch& b, const QuantConfig& cfg) {
    so.quant = cfg;
    train::Step(model, device, so)(b.images, b.labels, b.indices);
    std::vector<torch::Tensor> g;
    for (const auto& w : weights) g.push_back(w.grad().to(torch::kDouble).clone());
    return g;
  };
  QuantConfig exact;
  exact.scope = Scope::kNone;
  QModule(model, exact);
  std::vector<std::vector<torch::Tensor>> g_exact;
  for (const auto& b : batches) g_exact.push_back(gradients(b, exact));
  std::vector<Figures> sample(names.size());
  for (size_t l = 0; l < names.size(); ++l) {
    torch::Tensor mean = torch::zeros_like(g_exact[0][l]);
    for (const auto& g : g_exact) mean += g[l] / K;
    for (const auto& g : g_exact) sample[l].sample_var += (g[l] - mean).pow(2).sum().item<double>();
  }
  std::vector<Result> out;
  for (const auto& cfg : configs) {
    QModule(model, cfg);
    reset_adaptive(model);
    if (adaptive(cfg))
      for (const auto& b : batches) gradients(b, cfg);  // statistics and budgets first
    Result r;
    r.config = cfg.to_flags();
    r.layers = names;
    r.per_layer = sample;
    for (auto& f : r.per_layer) f.overall_var = f.bias = 0;
    for (size_t k = 0; k < batches.size(); ++k) {
      std::vector<std::vector<torch::Tensor>> gs;
      for (int64_t s = 0; s < o.samples; ++s) gs.push_back(gradients(batches[k], cfg));
      for (size_t l = 0; l < names.size(); ++l) {
        std::vector<torch::Tensor> col;
        for (const auto& g : gs) col.push_back(g[l]);
        const auto stacked = torch::stack(col);
        r.per_layer[l].overall_var += stacked.var(0, /*unbiased=*/false).sum().item<double>() / K;
        r.per_layer[l].bias += (stacked.mean(0) - g_exact[k][l]).pow(2).sum().item<double>() / K;
      }
    }
    for (const auto& f : r.per_layer) {
      r.total.overall_var += f.overall_var;
      r.total.bias += f.bias;
      r.total.sample_var += f.sample_var;
    }
    out.push_back(std::move(r));
  }
  model.zero_grad();
  return out;
}

Report run(const RunOptions& o) {
  QuantConfig exact;
  exact.scope = Scope::kNone;
  const auto sub = train::detail::open_subject(o.resume, o.data, o.arch, o.shape, o.given, exact, o.device, o.seed);
  std::vector<QuantConfig> for_model;
  for (const auto& c : o.configs) for_model.push_back(c.for_model(models::is_transformer(sub.arch)));
  Report rep{sub.arch, sub.dataset, measure(*sub.model, *sub.loader, o.device, for_model, o.options, o.amp)};
  if (o.output.empty()) return rep;
  ckpt::Checkpoint out;
  out.meta = {{"kind", "aq-variance"}, {"arch", rep.arch}, {"dataset", rep.dataset}, {"checkpoint", o.resume}};
  out.counters = {{"batches", o.options.batches}, {"samples", o.options.samples}, {"batch_size", o.data.batch_size}};
  out.metric_columns = {"config", "layer", "overall_var", "bias", "sample_var"};
  std::string configs, layers;
  for (size_t i = 0; i < rep.results.size(); ++i) {
    const auto& r = rep.results[i];
    configs += (i ? "\n" : "") + r.config;
    for (size_t l = 0; l < r.layers.size(); ++l) {
      const auto& f = r.per_layer[l];
      out.metric_rows.push_back({double(i), double(l), f.overall_var, f.bias, f.sample_var});
      if (i == 0) layers += (l ? "\n" : "") + r.layers[l];
    }
    out.metric_rows.push_back({double(i), -1.0, r.total.overall_var, r.total.bias, r.total.sample_var});
  }
  out.meta["configs"] = configs;
  out.meta["layers"] = layers;
  ckpt::save(o.output, out);
  return rep;
}

}  // namespace aq::variance
