#include "subject.h"

#include "aq/checkpoint.h"
#include "aq/evaluate.h"

namespace aq::train::detail {

Subject open_subject(const std::string& resume, const data::DataOptions& data, const std::string& arch,
                     const QuantConfig& config, const c10::Device& device, uint64_t seed) {
  Subject s{arch, data::resolve_name(data.dataset, data.num_classes), nullptr, nullptr};
  ckpt::Checkpoint c;
  if (!resume.empty()) {
    c = ckpt::load(resume);
    if (c.meta.count("arch")) s.arch = c.meta.at("arch");
    if (c.meta.count("dataset")) s.dataset = c.meta.at("dataset");
  }
  torch::manual_seed(seed);
  data::OpenOptions oo;
  oo.image_size = data.image_size;
  oo.context = data.context;
  if (auto ctx = c.counters.find("context"); ctx != c.counters.end()) oo.context = ctx->second;  // a text run's
  if (data.num_classes > 0) oo.synthetic_classes = data.num_classes;
  auto set = data::open(s.dataset, data.data_dir, data::Split::kTrain, oo);
  models::ModelOptions mo;
  mo.image_height = set->info().height;
  mo.image_width = set->info().width;
  s.model = resume.empty() ? models::build(s.arch, set->info().channels, set->info().num_classes, mo, config)
                           : model_from_checkpoint(c, resume, config);
  s.model->to(device);
  data::LoaderOptions lo;
  lo.batch_size = data.batch_size;
  lo.workers = data.workers;
  lo.seed = seed;
  lo.bad_images = data.bad_images;
  s.loader = std::make_unique<data::Loader>(set, lo);
  return s;
}

}  // namespace aq::train::detail
