#include "subject.h"

#include "aq/checkpoint.h"
#include "aq/evaluate.h"
#include "aq/loss.h"

#include <algorithm>
#include <stdexcept>

namespace aq::train::detail {

void check_arch_reads(const std::string& arch, const std::string& dataset) {
  const bool text = dataset == "text";
  if (text != takes_tokens(arch))
    throw std::invalid_argument("--arch " + arch + (text ? " takes images; --dataset text needs a token model (gpt_*)"
                                                         : " takes tokens: use it with --dataset text"));
}

models::ModelOptions options_for(const data::Info& info, models::ModelOptions shape) {
  shape.image_height = info.height;
  shape.image_width = info.width;
  if (info.sequence > 0) shape.context = std::max(shape.context, info.sequence);
  return shape;
}

namespace {
// An option given with a checkpoint that says otherwise (`theirs`: what the
// checkpoint has, as a phrase).
[[noreturn]] void conflict(const std::string& option, const std::string& mine, const std::string& source,
                           const std::string& theirs) {
  throw std::invalid_argument(option + " " + mine + " conflicts with " + source + ", " + theirs +
                              ": a checkpoint is measured as it was trained (leave the option out)");
}

// With a checkpoint: the shape options given must be its model's.
void check_given_shape(const ckpt::Checkpoint& c, const std::string& source, const std::string& arch,
                       const data::DataOptions& data, const models::ModelOptions& shape,
                       const std::set<std::string>& given) {
  auto theirs = models::options_from_parameters(arch, c.parameters);
  if (auto h = c.counters.find("heads"); h != c.counters.end()) theirs.heads = h->second;
  models::ModelOptions asked = theirs;
  if (given.count("--layers")) asked.layers = shape.layers;
  if (given.count("--width")) asked.width = shape.width;
  if (given.count("--heads")) asked.heads = shape.heads;
  if (given.count("--pool")) asked.class_token = shape.class_token;
  models::check_options(arch, asked);  // --layers on a ResNet, --pool on a GPT
  const auto built = models::resolved_shape(arch, theirs);
  auto number = [&](const char* option, int64_t mine, int64_t its) {
    if (given.count(option) && mine != its)
      conflict(option, std::to_string(mine), source, "whose model has " + std::to_string(its));
  };
  number("--layers", shape.layers, built.layers);
  number("--width", shape.width, built.width);
  number("--heads", shape.heads, built.heads);
  if (const auto ctx = c.counters.find("context"); ctx != c.counters.end()) number("--context", data.context, ctx->second);
  auto pool = [](bool class_token) { return std::string(class_token ? "cls" : "mean"); };
  if (given.count("--pool") && shape.class_token != theirs.class_token)
    conflict("--pool", pool(shape.class_token), source, "whose model has " + pool(theirs.class_token));
}
}  // namespace

Subject open_subject(const std::string& resume, const data::DataOptions& data, const std::string& arch,
                     const models::ModelOptions& shape, const std::set<std::string>& given,
                     const QuantConfig& config, const c10::Device& device, uint64_t seed) {
  Subject s{arch, data::resolve_name(data.dataset, data.num_classes), nullptr, nullptr};
  ckpt::Checkpoint c;
  if (!resume.empty()) {
    c = ckpt::load(resume);
    auto take = [&](const char* key, const char* option, const char* whose, std::string& mine) {
      const auto its = c.meta.find(key);
      if (its == c.meta.end()) return;
      if (given.count(option) && mine != its->second) conflict(option, mine, resume, whose + its->second);
      mine = its->second;
    };
    take("arch", "--arch", "a ", s.arch);
    take("dataset", "--dataset", "trained on ", s.dataset);
    check_given_shape(c, resume, s.arch, data, shape, given);
  } else {
    models::check_options(s.arch, shape);
  }
  check_arch_reads(s.arch, s.dataset);
  s.config = config.for_model(models::is_transformer(s.arch));
  torch::manual_seed(seed);
  data::OpenOptions oo;
  oo.image_size = data.image_size;
  oo.context = data.context;
  if (auto ctx = c.counters.find("context"); ctx != c.counters.end()) oo.context = ctx->second;  // a text run's
  if (data.num_classes > 0) oo.synthetic_classes = data.num_classes;
  auto set = data::open(s.dataset, data.data_dir, data::Split::kTrain, oo);
  s.model = resume.empty() ? models::build(s.arch, set->info().channels, set->info().num_classes,
                                           options_for(set->info(), shape), s.config)
                           : model_from_checkpoint(c, resume, s.config);
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
