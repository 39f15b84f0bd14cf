#include "aq/calibrate.h"

#include "aq/checkpoint.h"
#include "subject.h"

#include "aq/modules.h"

#include <set>
#include <stdexcept>

namespace aq::calibrate {

std::vector<LayerBits> run(const RunOptions& o) {
  if (!adaptive(o.config))
    throw std::invalid_argument("calibration is for adaptive configurations (--ibits above --cabits): " +
                                o.config.to_flags());
  const auto sub = train::detail::open_subject(o.resume, o.data, o.arch, o.shape, o.given, o.config, o.device, o.seed);
  models::Model& model = *sub.model;
  data::Loader& loader = *sub.loader;
  model.train();
  train::StepOptions so;
  so.amp = o.amp;
  so.quant = sub.config;
  so.defer_reallocation = false;
  train::Step step(model, o.device, so);
  int64_t done = 0;
  {
    const train::detail::KeepBuffers keep(model);  // the model's running statistics are not the point
    loader.start(0);
    while (done < o.batches) {
      auto b = loader.next();
      if (!b) break;
      step(b->images, b->labels, b->indices);
      ++done;
    }
  }
  if (done == 0) throw std::runtime_error("calibration: the dataset yields no batch");
  auto layers = layer_bits(model);
  if (o.output.empty()) return layers;
  ckpt::Checkpoint out;
  out.meta = {{"kind", "aq-calibration"}, {"arch", sub.arch}, {"dataset", sub.dataset},
              {"config", sub.config.to_flags()}, {"checkpoint", o.resume}};
  out.counters = {{"batches", done},
                  {"batch_size", o.data.batch_size},
                  {"seed", static_cast<int64_t>(o.seed)},
                  {"dataset_size", sub.loader->dataset().size()}};
  out.adaptive = adaptive_state(model);
  out.metric_columns = {"layer", "elements", "sensitivity", "bits", "budget"};
  std::string names;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    out.metric_rows.push_back({double(i), double(l.elements), l.sensitivity, l.bits, l.budget});
    names += (i ? "\n" : "") + l.name;
  }
  out.meta["layers"] = names;
  ckpt::save(o.output, out);
  return layers;
}

void load(models::Model& model, const std::string& path, const Match& match) {
  const auto c = ckpt::load(path);
  auto kind = c.meta.find("kind");
  if (kind == c.meta.end() || kind->second != "aq-calibration")
    throw std::runtime_error(path + ": not a calibration file (write one with aq-calibrate -o)");
  const std::string& arch = match.arch;
  auto a = c.meta.find("arch");
  if (a != c.meta.end() && a->second != arch)
    throw std::runtime_error(path + ": calibration of a " + a->second + ", the model is a " + arch);
  auto d = c.meta.find("dataset");
  if (d != c.meta.end() && !match.dataset.empty() && d->second != match.dataset)
    throw std::runtime_error(path + ": calibration on " + d->second + ", the run trains on " + match.dataset);
  auto n = c.counters.find("dataset_size");
  if (n != c.counters.end() && match.dataset_size > 0 && n->second != match.dataset_size)
    throw std::runtime_error(path + ": calibration on " + std::to_string(n->second) + " training samples, the run has " +
                             std::to_string(match.dataset_size));
  auto cf = c.meta.find("config");
  if (cf != c.meta.end()) {
    QuantConfig theirs;
    try {
      theirs = QuantConfig::from_flags(cf->second);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(path + ": /meta config: " + e.what());
    }
    const QuantConfig& mine = match.config;
    if (theirs.cabits != mine.cabits || theirs.ibits != mine.ibits || theirs.pergroup != mine.pergroup ||
        theirs.perlayer != mine.perlayer || theirs.usegradient != mine.usegradient ||
        theirs.group_size != mine.group_size || theirs.attention_bits != mine.attention_bits)
      throw std::runtime_error(path + ": calibration for " + cf->second + ", the run uses " + mine.to_flags());
  }
  std::set<std::string> layers;
  for (const auto& item : model.named_modules())
    if (dynamic_cast<QLayer*>(item.value().get())) layers.insert(item.key());
  for (const auto& [key, t] : c.adaptive) {
    const auto dot = key.rfind(".aq_");
    if (dot == std::string::npos || !layers.count(key.substr(0, dot)))
      throw std::runtime_error(path + ": state '" + key + "' is for a layer the " + arch + " does not have");
  }
  try {
    load_adaptive_state(model, c.adaptive);
  } catch (const c10::Error& e) {  // LibTorch's message, with the file it is about
    const std::string m = e.what_without_backtrace();
    throw std::runtime_error(path + ": " + m.substr(0, m.find('\n')));
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

}  // namespace aq::calibrate
