#include "aq/calibrate.h"

#include "aq/checkpoint.h"
#include "subject.h"

#include <stdexcept>

namespace aq::calibrate {

std::vector<LayerBits> run(const RunOptions& o) {
  if (!adaptive(o.config))
    throw std::invalid_argument("calibration is for adaptive configurations (--ibits above --cabits): " +
                                o.config.to_flags());
  const auto sub = train::detail::open_subject(o.resume, o.data, o.arch, o.config, o.device, o.seed);
  models::Model& model = *sub.model;
  data::Loader& loader = *sub.loader;
  model.train();
  train::StepOptions so;
  so.amp = o.amp;
  so.quant = o.config;
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
              {"config", o.config.to_flags()}, {"checkpoint", o.resume}};
  out.counters = {{"batches", done}, {"batch_size", o.data.batch_size}, {"seed", static_cast<int64_t>(o.seed)}};
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

void load(models::Model& model, const std::string& path, const std::string& arch) {
  const auto c = ckpt::load(path);
  auto kind = c.meta.find("kind");
  if (kind == c.meta.end() || kind->second != "aq-calibration")
    throw std::runtime_error(path + ": not a calibration file (write one with aq-calibrate -o)");
  auto a = c.meta.find("arch");
  if (a != c.meta.end() && a->second != arch)
    throw std::runtime_error(path + ": calibration of a " + a->second + ", the model is a " + arch);
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
