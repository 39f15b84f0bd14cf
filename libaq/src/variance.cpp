#include "aq/variance.h"

#include "aq/adaptive.h"
#include "aq/checkpoint.h"
#include "aq/modules.h"
#include "aq/train.h"

#include <CLI/CLI.hpp>
#include <torch/nn/functional/loss.h>
#include <torch/torch.h>

#include <cstdio>
#include <sstream>
#include <stdexcept>

namespace aq::variance {

namespace {

bool conv_or_linear(const torch::nn::Module& m) {
  return dynamic_cast<const torch::nn::LinearImpl*>(&m) || dynamic_cast<const torch::nn::Conv1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::Conv2dImpl*>(&m) || dynamic_cast<const torch::nn::Conv3dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose1dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose2dImpl*>(&m) ||
         dynamic_cast<const torch::nn::ConvTranspose3dImpl*>(&m);
}

// Restores a model's buffers (running statistics) when it goes out of
// scope: measuring trains in train mode, which updates them.
class KeepBuffers {
 public:
  explicit KeepBuffers(torch::nn::Module& model) {
    for (const auto& b : model.buffers()) buffers_.push_back(b), saved_.push_back(b.clone());
  }
  ~KeepBuffers() {
    torch::NoGradGuard g;
    for (size_t i = 0; i < buffers_.size(); ++i) buffers_[i].copy_(saved_[i]);
  }

 private:
  std::vector<torch::Tensor> buffers_, saved_;
};

// What aq-variance and aq-calibrate measure: the model of `resume` (or a
// fresh `arch`) on the dataset it was trained on, on `device`, with a loader
// over the training split.
struct Subject {
  std::string arch, dataset;
  models::ModelPtr model;
  std::unique_ptr<data::Loader> loader;
};
Subject open_subject(const std::string& resume, const std::string& dataset, const std::string& data_dir,
                     const std::string& arch, int64_t num_classes, int64_t image_size, int64_t batch_size, int workers,
                     const QuantConfig& config, const c10::Device& device, uint64_t seed) {
  Subject s{arch, train::resolve_dataset(dataset, num_classes), nullptr, nullptr};
  ckpt::Checkpoint c;
  if (!resume.empty()) {
    c = ckpt::load(resume);
    if (c.meta.count("arch")) s.arch = c.meta.at("arch");
    if (c.meta.count("dataset")) s.dataset = c.meta.at("dataset");
  }
  torch::manual_seed(seed);
  data::OpenOptions oo;
  oo.image_size = image_size;
  if (num_classes > 0) oo.synthetic_classes = num_classes;
  auto set = data::open(s.dataset, data_dir, data::Split::kTrain, oo);
  s.model = resume.empty() ? models::build(s.arch, set->info().channels, set->info().num_classes, config)
                           : train::model_from_checkpoint(c, resume, config);
  s.model->to(device);
  data::LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.workers = workers;
  lo.seed = seed;
  s.loader = std::make_unique<data::Loader>(set, lo);
  return s;
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
                            const std::vector<QuantConfig>& configs, const Options& o) {
  if (o.batches < 1 || o.samples < 2)
    throw std::invalid_argument("variance needs at least 1 batch and 2 samples per batch");
  std::vector<std::string> names;
  std::vector<torch::Tensor> weights;
  for (const auto& item : model.named_modules()) {
    if (!conv_or_linear(*item.value())) continue;
    names.push_back(item.key() + ".weight");
    weights.push_back(item.value()->named_parameters(false)["weight"]);
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
  auto gradients = [&](const data::Batch& b, bool per_layer) {
    model.zero_grad();
    set_batch_indices(b.indices);
    auto loss = torch::nn::functional::cross_entropy(model.forward(b.images), b.labels);
    loss.backward();
    if (per_layer) adapt_layers(model);
    std::vector<torch::Tensor> g;
    for (const auto& w : weights) g.push_back(w.grad().to(torch::kDouble).clone());
    return g;
  };
  QuantConfig exact;
  exact.scope = Scope::kNone;
  QModule(model, exact);
  std::vector<std::vector<torch::Tensor>> g_exact;
  for (const auto& b : batches) g_exact.push_back(gradients(b, false));
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
    const bool per_layer = adaptive(cfg) && cfg.perlayer;
    if (adaptive(cfg))
      for (const auto& b : batches) gradients(b, per_layer);  // statistics and budgets first
    Result r;
    r.config = cfg.to_flags();
    r.layers = names;
    r.per_layer = sample;
    for (auto& f : r.per_layer) f.overall_var = f.bias = 0;
    for (size_t k = 0; k < batches.size(); ++k) {
      std::vector<std::vector<torch::Tensor>> gs;
      for (int64_t s = 0; s < o.samples; ++s) gs.push_back(gradients(batches[k], per_layer));
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

std::vector<QuantConfig> parse_configs(const std::string& text) {
  std::vector<QuantConfig> out;
  std::string normalized = text;
  for (char& ch : normalized)
    if (ch == ';') ch = '\n';
  std::istringstream in(normalized);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    const auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    CLI::App app;
    QuantOptions q(app);
    try {
      app.parse(line, /*program_name_included=*/false);
      out.push_back(q.resolve());
    } catch (const CLI::ParseError& e) {
      throw std::invalid_argument("configuration " + std::to_string(n) + " ('" + line + "'): " + e.what());
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("configuration " + std::to_string(n) + " ('" + line + "'): " + e.what());
    }
  }
  if (out.empty()) throw std::invalid_argument("no configuration given");
  return out;
}

int run(const RunOptions& o) {
  QuantConfig exact;
  exact.scope = Scope::kNone;
  const Subject sub = open_subject(o.resume, o.dataset, o.data_dir, o.arch, o.num_classes, o.image_size,
                                   o.batch_size, o.workers, exact, o.device, o.seed);
  const std::string &arch = sub.arch, &dataset = sub.dataset;
  const auto results = measure(*sub.model, *sub.loader, o.device, o.configs, o.options);
  std::printf("config\tlayer\toverall_var\tbias\tsample_var\n");
  ckpt::Checkpoint out;
  out.meta = {{"kind", "aq-variance"}, {"arch", arch}, {"dataset", dataset}, {"checkpoint", o.resume}};
  out.counters = {{"batches", o.options.batches}, {"samples", o.options.samples}, {"batch_size", o.batch_size}};
  out.metric_columns = {"config", "layer", "overall_var", "bias", "sample_var"};
  std::string configs, layers;
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    configs += (i ? "\n" : "") + r.config;
    for (size_t l = 0; l < r.layers.size(); ++l) {
      const auto& f = r.per_layer[l];
      std::printf("%s\t%s\t%.6g\t%.6g\t%.6g\n", r.config.c_str(), r.layers[l].c_str(), f.overall_var, f.bias,
                  f.sample_var);
      out.metric_rows.push_back({double(i), double(l), f.overall_var, f.bias, f.sample_var});
      if (i == 0) layers += (l ? "\n" : "") + r.layers[l];
    }
    std::printf("%s\ttotal\t%.6g\t%.6g\t%.6g\n", r.config.c_str(), r.total.overall_var, r.total.bias,
                r.total.sample_var);
    out.metric_rows.push_back({double(i), -1.0, r.total.overall_var, r.total.bias, r.total.sample_var});
    std::fflush(stdout);
  }
  out.meta["configs"] = configs;
  out.meta["layers"] = layers;
  if (!o.output.empty()) ckpt::save(o.output, out);
  return 0;
}

}  // namespace aq::variance

namespace aq::calibrate {

using variance::KeepBuffers;
using variance::open_subject;
using variance::Subject;

int run(const RunOptions& o) {
  if (!adaptive(o.config))
    throw std::invalid_argument("calibration is for adaptive configurations (--ibits above --cabits): " +
                                o.config.to_flags());
  const Subject sub = open_subject(o.resume, o.dataset, o.data_dir, o.arch, o.num_classes, o.image_size,
                                   o.batch_size, o.workers, o.config, o.device, o.seed);
  const std::string &arch = sub.arch, &dataset = sub.dataset;
  models::Model& model = *sub.model;
  data::Loader& loader = *sub.loader;
  model.train();
  int64_t done = 0;
  {
    const KeepBuffers keep(model);  // the model's running statistics are not the point
    loader.start(0);
    while (done < o.batches) {
      auto b = loader.next();
      if (!b) break;
      model.zero_grad();
      set_batch_indices(b->indices);
      torch::nn::functional::cross_entropy(model.forward(b->images.to(o.device)), b->labels.to(o.device)).backward();
      if (o.config.perlayer) adapt_layers(model);
      ++done;
    }
  }
  if (done == 0) throw std::runtime_error("calibration: the dataset yields no batch");
  const auto layers = layer_bits(model);
  ckpt::Checkpoint out;
  out.meta = {{"kind", "aq-calibration"}, {"arch", arch}, {"dataset", dataset}, {"config", o.config.to_flags()},
              {"checkpoint", o.resume}};
  out.counters = {{"batches", done}, {"batch_size", o.batch_size}, {"seed", static_cast<int64_t>(o.seed)}};
  out.optimizer = adaptive_state(model);
  out.metric_columns = {"layer", "elements", "sensitivity", "bits", "budget"};
  std::string names;
  std::printf("layer\telements\tsensitivity\tbits\tbudget\tshares\n");
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    std::printf("%s\t%lld\t%.6g\t%.3f\t%.3f\t%s\n", l.name.c_str(), static_cast<long long>(l.elements), l.sensitivity,
                l.bits, l.budget, l.shares.empty() ? "-" : l.shares.c_str());
    out.metric_rows.push_back({double(i), double(l.elements), l.sensitivity, l.bits, l.budget});
    names += (i ? "\n" : "") + l.name;
  }
  out.meta["layers"] = names;
  if (!o.output.empty()) ckpt::save(o.output, out);
  return 0;
}

void load(models::Model& model, const std::string& path, const std::string& arch) {
  const auto c = ckpt::load(path);
  auto kind = c.meta.find("kind");
  if (kind == c.meta.end() || kind->second != "aq-calibration")
    throw std::runtime_error(path + ": not a calibration file (write one with aq-calibrate -o)");
  auto a = c.meta.find("arch");
  if (a != c.meta.end() && a->second != arch)
    throw std::runtime_error(path + ": calibration of a " + a->second + ", the model is a " + arch);
  load_adaptive_state(model, c.optimizer);
}

}  // namespace aq::calibrate
