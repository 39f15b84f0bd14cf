#include "aq/train.h"

#include "aq/adaptive.h"
#include "aq/calibrate.h"
#include "aq/loss.h"
#include "aq/log.h"
#include "aq/memory.h"
#include "aq/weights.h"
#include "aq_config.h"
#include "data_parallel.h"
#include "fields.h"
#include "subject.h"
#include "run_control.h"

#include <torch/torch.h>
#include <torch/version.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <iomanip>
#include <sstream>
#include <stdexcept>

namespace aq::train {

namespace {

// A ViT's --pool: its class token (cls) or the mean of its patch tokens (mean) classifies.
bool class_token_of(const std::string& pool) {
  if (pool != "cls" && pool != "mean") throw std::invalid_argument("--pool must be cls or mean, not " + pool);
  return pool == "cls";
}

using detail::counter;
using detail::meta;
using detail::shape;

// Milestones as checkpoints keep them: comma-separated, every digit kept.
std::string list_text(const std::vector<double>& v) {
  std::string out;
  for (double m : v) {
    std::ostringstream s;
    s << std::setprecision(17) << m;
    out += (out.empty() ? "" : ",") + s.str();
  }
  return out;
}

struct Partial {  // of the current epoch, kept across a mid-epoch checkpoint
  double loss_sum = 0, correct = 0, seen = 0, act_sum = 0, act_n = 0;
};

class Trainer {
 public:
  Trainer(const Options& o, const Observer& obs) : o_(o), obs_(obs), dev_(o.device) {}
  int run();

 private:
  void setup();
  void restore(const ckpt::Checkpoint& c);
  void save(int64_t epoch, int64_t batch, const Partial& part, bool gather);
  std::string in_workspace(const std::string& name) const {
    return o_.workspace.empty() || o_.workspace.back() == '/' ? o_.workspace + name : o_.workspace + "/" + name;
  }

  void adopt_settings(const ckpt::Checkpoint& c);

  Options o_;  // with --resume, the checkpoint's settings
  const Observer& obs_;
  c10::Device dev_;
  std::string dataset_;
  uint64_t seed_ = 0;
  std::shared_ptr<const data::Dataset> train_set_, test_set_;
  models::ModelPtr model_;
  std::unique_ptr<torch::optim::Optimizer> opt_;
  bool text_ = false;  // a token dataset: per-token figures
  std::unique_ptr<data::Loader> train_loader_, test_loader_;
  int64_t epoch_ = 0, step_ = 0, batch_ = 0;
  Partial partial_;
  std::vector<std::vector<double>> history_;
  std::optional<ckpt::Checkpoint> resumed_;
  bool channels_last_ = false;
  // Data parallel (docs/distributed.md): null when this process runs alone;
  // only rank 0 (main_) writes files and hands rows to the observer.
  std::unique_ptr<detail::DataParallel> dp_;
  bool main_ = true;
  int64_t world_ = 1, rank_ = 0;
  std::string resume_;  // the checkpoint to continue from ("auto" resolved); empty: none
  double lr_ = 0;

  void resolve_resume();
  std::vector<std::pair<std::string, torch::Tensor>> named_params() const {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& p : model_->named_parameters()) out.emplace_back(p.key(), p.value());
    return out;
  }
  void start_metrics();
  void append_metrics(const EpochRow& row);
  Partial partial_now(const Partial& part, const torch::Tensor& loss_sum, const torch::Tensor& correct,
                      int64_t seen_now) const;
  // The ranks' sums of loss, correct and seen together (activation figures
  // stay rank 0's); `part` itself when alone.
  Partial ranks_sum(const Partial& part);
};

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The file `path` with `text` in it, through a temporary file renamed over it.
void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot write: " + std::strerror(errno));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot write: " + std::strerror(e));
  }
}

// Whether a metrics file holds more than its header: one that does not
// (a run that failed before its first epoch's row) records nothing to keep.
bool has_rows(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  int lines = 0;
  while (lines < 2 && std::getline(in, line)) ++lines;
  return lines != 1;  // unreadable or empty: kept, as anything unexpected
}

std::string tsv_line(const std::vector<std::string>& cells) {
  std::string s;
  for (size_t i = 0; i < cells.size(); ++i) s += (i ? "\t" : "") + cells[i];
  return s + "\n";
}

void Trainer::resolve_resume() {
  const std::string ckpt = in_workspace("checkpoint.h5"), metrics = in_workspace("metrics.tsv");
  resume_ = o_.resume;
  if (resume_ == "auto") {
    resume_ = exists(ckpt) ? ckpt : "";
    log().info("--resume auto: {}", resume_.empty() ? "no " + ckpt + ", starting" : "continuing " + ckpt);
  }
  if (o_.evaluate || !resume_.empty() || o_.overwrite) return;
  if (o_.resume.empty()) {  // --resume auto with nothing to continue may replace a stale metrics file
    for (const auto& f : {ckpt, metrics})
      if (exists(f) && (f == ckpt || has_rows(metrics)))
        throw std::invalid_argument(f + " exists: continue its run with --resume auto, or replace it with --overwrite");
  }
}

void Trainer::start_metrics() {
  // A resumed run's file is rewritten from the checkpoint's history: rows of
  // epochs after the checkpoint (a run killed between a row and its
  // checkpoint) are not repeated.
  std::string text = tsv_line(EpochRow::columns(text_));
  for (const auto& v : history_) text += EpochRow::from_values(v, text_).tsv();
  write_atomically(in_workspace("metrics.tsv"), text);
}

void Trainer::append_metrics(const EpochRow& row) {
  const std::string path = in_workspace("metrics.tsv");
  FILE* f = std::fopen(path.c_str(), "ab");
  const std::string line = row.tsv();
  const bool ok = f && std::fwrite(line.data(), 1, line.size(), f) == line.size();
  if (!f || std::fclose(f) != 0 || !ok) throw std::runtime_error(path + ": cannot append: " + std::strerror(errno));
}

Partial Trainer::partial_now(const Partial& part, const torch::Tensor& loss_sum, const torch::Tensor& correct,
                             int64_t seen_now) const {
  Partial p = part;
  p.loss_sum += loss_sum.item<double>();
  p.correct += static_cast<double>(correct.item<int64_t>());
  p.seen += static_cast<double>(seen_now);
  return p;
}

Partial Trainer::ranks_sum(const Partial& part) {
  if (!dp_) return part;
  std::vector<double> v{part.loss_sum, part.correct, part.seen};
  dp_->sum(v);
  Partial p = part;
  p.loss_sum = v[0], p.correct = v[1], p.seen = v[2];
  return p;
}

void Trainer::setup() {
  o_.quant = o_.quant.for_model(models::is_transformer(o_.arch));
  if (!o_.init_from.empty() && !o_.resume.empty() && o_.resume != "auto")
    throw std::invalid_argument("--init-from starts a new run, --resume continues one: give one of them");
  if (o_.reset_head && o_.init_from.empty()) throw std::invalid_argument("--reset-head goes with --init-from");
  if (!resume_.empty()) resumed_ = ckpt::load(resume_);
  dataset_ = data::resolve_name(o_.data.dataset, o_.data.num_classes);
  if (resumed_) {
    const std::string src = resume_;
    if (meta(*resumed_, "arch", src) != o_.arch)
      throw std::runtime_error(src + ": checkpoint is a " + meta(*resumed_, "arch", src) + ", --arch says " + o_.arch);
    if (meta(*resumed_, "dataset", src) != dataset_)
      throw std::runtime_error(src + ": checkpoint was trained on " + meta(*resumed_, "dataset", src) +
                               ", --dataset says " + dataset_);
    const uint64_t s = static_cast<uint64_t>(counter(*resumed_, "seed", src));
    if (o_.seed_given && s != o_.seed)
      log().warn("--seed {} ignored: resuming the run of seed {} from {}", o_.seed, s, src);
    seed_ = s;
    if (!o_.evaluate) adopt_settings(*resumed_);
  } else {
    seed_ = o_.seed_given ? o_.seed : (static_cast<uint64_t>(std::random_device{}()) << 20) ^ std::random_device{}();
  }
  torch::manual_seed(seed_);
  data::OpenOptions oo;
  oo.image_size = o_.data.image_size;
  oo.context = o_.data.context;
  if (o_.data.num_classes > 0) oo.synthetic_classes = o_.data.num_classes;
  text_ = dataset_ == "text";
  detail::check_arch_reads(o_.arch, dataset_);
  train_set_ = data::open(dataset_, o_.data.data_dir, data::Split::kTrain, oo);
  test_set_ = data::open(dataset_, o_.data.data_dir, data::Split::kTest, oo);
  // The epoch's order and the per-sample statistics are by sample index:
  // on data of another size they would continue another run.
  if (resumed_ && !o_.evaluate) {
    const auto n = resumed_->counters.find("dataset_size");
    if (n != resumed_->counters.end() && n->second != train_set_->size())
      throw std::runtime_error(resume_ + ": its run trained on " + std::to_string(n->second) +
                               " samples, the training split here has " + std::to_string(train_set_->size()) +
                               ": resume on the same data (or start a new run from its weights with --init-from)");
  }
  const auto& info = train_set_->info();
  if (o_.data.num_classes > 0 && o_.data.num_classes != info.num_classes)
    throw std::invalid_argument("--num-classes " + std::to_string(o_.data.num_classes) + " but " + dataset_ + " has " +
                                std::to_string(info.num_classes) + " classes");
  models::ModelOptions shape;
  shape.layers = o_.layers, shape.width = o_.width, shape.heads = o_.heads, shape.dropout = o_.dropout;
  shape.class_token = class_token_of(o_.pool);
  const models::ModelOptions mo = detail::options_for(info, shape);
  const bool transformer = models::is_transformer(o_.arch);
  models::check_options(o_.arch, mo);
  model_ = models::build(o_.arch, info.channels, info.num_classes, mo, o_.quant);
  if (transformer) {  // the shape built, which checkpoints record: a resume or aq-eval builds it again
    const auto built = models::resolved_shape(o_.arch, mo);
    o_.layers = built.layers, o_.width = built.width, o_.heads = built.heads;
  }
  if (!o_.init_from.empty() && resumed_) log().info("--init-from {} not used: resuming {}", o_.init_from, resume_);
  if (!o_.init_from.empty() && !resumed_) init_from(*model_, o_.init_from, o_.reset_head);
  model_->to(dev_);
  channels_last_ = !text_ && o_.channels_last.value_or(dev_.is_cuda());  // tokens are no images
  if (channels_last_) {
    torch::NoGradGuard g;
    for (auto& p : model_->parameters())
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
  }
  if (dev_.is_cuda()) at::globalContext().setBenchmarkCuDNN(o_.cudnn_benchmark.value_or(true));
  OptimizerOptions opt;
  opt.kind = o_.optimizer;
  opt.lr = o_.lr, opt.weight_decay = o_.weight_decay, opt.momentum = o_.momentum, opt.nesterov = o_.nesterov;
  opt.beta1 = o_.beta1, opt.beta2 = o_.beta2, opt.eps = o_.eps;
  opt_ = make_optimizer(model_->parameters(), opt);
  data::LoaderOptions lo;
  lo.batch_size = o_.data.batch_size;
  lo.workers = o_.data.workers;
  lo.seed = seed_;
  lo.pin_memory = dev_.is_cuda();
  lo.bad_images = o_.data.bad_images;
  lo.shards = world_;
  lo.shard = rank_;
  lo.drop_last = world_ > 1;  // every rank's batch full: the mean of their means is the global batch's
  train_loader_ = std::make_unique<data::Loader>(train_set_, lo);
  lo.shuffle = lo.augment = false;
  lo.drop_last = false;  // every test image on exactly one rank
  test_loader_ = std::make_unique<data::Loader>(test_set_, lo);
  if (resumed_) {
    try {
      restore(*resumed_);
    } catch (const c10::Error& e) {  // LibTorch's message, with the file it is about
      const std::string m = e.what_without_backtrace();
      throw std::runtime_error(resume_ + ": " + m.substr(0, m.find('\n')));
    }
  }
  if (!o_.calibration.empty()) {
    if (resumed_) {
      log().warn("--calibration {} ignored: the --resume checkpoint has the run's own statistics", o_.calibration);
    } else {
      calibrate::load(*model_, o_.calibration, {o_.arch, dataset_, o_.quant, train_set_->size()});
      log().info("adaptive statistics and per-layer budgets from {}", o_.calibration);
    }
  }
  if (dp_) {
    dp_->make_equal(*model_, *opt_);
    dp_->restore_rng(resumed_ ? &*resumed_ : nullptr, dev_, seed_, step_);
  }
  if (text_) {
    log().info("{} on {} ({} train / {} validation windows of {} tokens), {} on {}, seed {}", o_.arch, dataset_,
               train_set_->size(), test_set_->size(), info.sequence + 1, o_.quant.to_flags(), dev_.str(), seed_);
  } else {
    log().info("{} on {} ({} train / {} test images, {}x{}x{}, {} classes), {} on {}, seed {}", o_.arch, dataset_,
               train_set_->size(), test_set_->size(), info.channels, info.height, info.width, info.num_classes,
               o_.quant.to_flags(), dev_.str(), seed_);
  }
}

// A resumed run is the run that wrote the checkpoint: its batch size (the
// position within an epoch counts its batches), configuration, epochs and
// optimisation settings, whatever the command line's defaults are.
void Trainer::adopt_settings(const ckpt::Checkpoint& c) {
  const std::string& src = resume_;
  auto given = [&](const char* name) { return o_.given.count(name) > 0; };
  auto conflict = [&](const std::string& option, const std::string& mine, const std::string& theirs) {
    throw std::invalid_argument(option + " " + mine + " conflicts with " + src + ", whose run has " + theirs +
                                ": a resumed run keeps its checkpoint's settings (leave the option out)");
  };
  auto num = [](double v) {
    std::ostringstream s;
    s << v;
    return s.str();
  };
  auto counter_setting = [&](const char* key, const char* option, int64_t& value) {
    const auto it = c.counters.find(key);
    if (it == c.counters.end()) return;
    if (it->second < 1) throw std::runtime_error(src + ": counter " + key + " is " + std::to_string(it->second));
    if (given(option) && value != it->second) conflict(option, std::to_string(value), std::to_string(it->second));
    value = it->second;
  };
  auto scalar_setting = [&](const char* key, const char* option, double& value) {
    const auto it = c.scalars.find(key);
    if (it == c.scalars.end()) return;
    if (!std::isfinite(it->second) || it->second < 0)
      throw std::runtime_error(src + ": scalar " + key + " is " + num(it->second));
    if (given(option) && value != it->second) conflict(option, num(value), num(it->second));
    value = it->second;
  };
  auto meta_setting = [&](const char* key, const char* option, const std::string& mine,
                          const std::function<void(const std::string&)>& set) {
    const auto it = c.meta.find(key);
    if (it == c.meta.end()) return;
    if (given(option) && mine != it->second)
      conflict(std::string(option) == "quantization" ? "quantization flags" : option, mine, it->second);
    try {
      set(it->second);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(src + ": /meta " + key + " '" + it->second + "': " + e.what());
    }
  };
  counter_setting("batch_size", "--batch-size", o_.data.batch_size);
  const int64_t epochs = o_.epochs;
  const auto e = c.counters.find("epochs");
  if (e != c.counters.end()) {
    if (e->second < 1) throw std::runtime_error(src + ": counter epochs is " + std::to_string(e->second));
    if (given("--epochs") && epochs != e->second)
      log().info("--epochs {}: the run of {} epochs in {} now ends after epoch {} (its learning-rate schedule with it)",
                 epochs, e->second, src, epochs);
    else
      o_.epochs = e->second;
  }
  scalar_setting("peak_lr", "--lr", o_.lr);
  scalar_setting("momentum", "--momentum", o_.momentum);
  scalar_setting("weight_decay", "--weight-decay", o_.weight_decay);
  scalar_setting("label_smoothing", "--label-smoothing", o_.label_smoothing);
  scalar_setting("warmup", "--warmup", o_.warmup);
  counter_setting("context", "--context", o_.data.context);
  counter_setting("layers", "--layers", o_.layers);
  counter_setting("width", "--width", o_.width);
  counter_setting("heads", "--heads", o_.heads);
  scalar_setting("dropout", "--dropout", o_.dropout);
  meta_setting("pool", "--pool", o_.pool, [&](const std::string& v) {
    class_token_of(v);
    o_.pool = v;
  });
  if (c.counters.count("warmup_steps")) {  // may be 0, which counter_setting refuses
    const int64_t w = c.counters.at("warmup_steps");
    if (w < 0) throw std::runtime_error(src + ": counter warmup_steps is " + std::to_string(w));
    if (given("--warmup-steps") && o_.warmup_steps != w)
      conflict("--warmup-steps", std::to_string(o_.warmup_steps), std::to_string(w));
    o_.warmup_steps = w;
  }
  scalar_setting("clip_grad_norm", "--clip-grad-norm", o_.clip_grad_norm);
  scalar_setting("eps", "--eps", o_.eps);
  {
    const auto b1 = c.scalars.find("beta1"), b2 = c.scalars.find("beta2");
    if (b1 != c.scalars.end() && b2 != c.scalars.end()) {
      for (double b : {b1->second, b2->second})
        if (!(b >= 0 && b < 1)) throw std::runtime_error(src + ": scalar beta is " + num(b) + ", not in [0, 1)");
      if (given("--betas") && (o_.beta1 != b1->second || o_.beta2 != b2->second))
        conflict("--betas", num(o_.beta1) + "," + num(o_.beta2), num(b1->second) + "," + num(b2->second));
      o_.beta1 = b1->second, o_.beta2 = b2->second;
    }
  }
  {
    // A budget the command line leaves to the level is the checkpoint's, so
    // a transformer's run stored at another budget than its level's default
    // resumes with the flags it was started with.
    QuantConfig mine = o_.quant;
    const auto stored = c.meta.find("config");
    if (!mine.cabits_given && stored != c.meta.end()) {
      try {
        mine.cabits = QuantConfig::from_flags(stored->second).cabits;
      } catch (const std::invalid_argument&) {  // meta_setting says what is wrong with it
      }
    }
    meta_setting("config", "quantization", mine.to_flags(),
                 [&](const std::string& v) { o_.quant = QuantConfig::from_flags(v); });
  }
  {
    const std::string mine = o_.optimizer == OptimizerKind::kAdamW ? "adamw" : o_.nesterov ? "sgd-nesterov" : "sgd";
    const char* option = given("--optimizer") ? "--optimizer" : "--nesterov";
    meta_setting("optimizer", option, mine, [&](const std::string& v) {
      if (v != "sgd" && v != "sgd-nesterov" && v != "adamw") throw std::invalid_argument("unknown optimizer");
      o_.optimizer = v == "adamw" ? OptimizerKind::kAdamW : OptimizerKind::kSGD;
      if (v != "adamw") o_.nesterov = v == "sgd-nesterov";
    });
  }
  meta_setting("schedule", "--lr-schedule", to_string(o_.schedule),
               [&](const std::string& v) { o_.schedule = parse_schedule(v); });
  meta_setting("amp", "--amp", to_string(o_.amp), [&](const std::string& v) { o_.amp = parse_amp(v); });
  meta_setting("milestones", "--milestones", list_text(o_.milestones), [&](const std::string& v) {
    o_.milestones.clear();
    std::istringstream in(v);
    std::string item;
    while (std::getline(in, item, ',')) {
      size_t pos = 0;
      double m = 0;
      try {
        m = std::stod(item, &pos);
      } catch (const std::exception&) {
        pos = 0;
      }
      if (pos == 0 || pos != item.size() || !std::isfinite(m)) throw std::invalid_argument("not a number list");
      o_.milestones.push_back(m);
    }
  });
}

void Trainer::restore(const ckpt::Checkpoint& c) {
  const std::string& src = resume_;
  if (const std::string bad = first_bad_values(c); !bad.empty())
    throw std::runtime_error(src + ": " + bad + "; resume from an earlier checkpoint");
  load_state(*model_, c, src);
  load_optimizer_state(*opt_, named_params(), c.optimizer, src);
  try {
    load_adaptive_state(*model_, c.adaptive);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(src + ": " + e.what());
  }
  for (const auto& [key, t] : c.rng) {
    if (key != "cpu" && !(key == "cuda" && dev_.is_cuda())) continue;
    at::Generator g = at::globalContext().defaultGenerator(key == "cpu" ? c10::Device(c10::kCPU) : dev_);
    std::lock_guard<std::mutex> lock(g.mutex());
    try {
      g.set_state(t);
    } catch (const c10::Error&) {
      throw std::runtime_error(src + ": bad '" + key + "' generator state");
    }
  }
  epoch_ = counter(c, "epoch", src);
  step_ = counter(c, "step", src);
  batch_ = counter(c, "batch", src);
  const int64_t per_epoch = train_loader_->batches_per_epoch();
  const auto w = c.counters.find("world_size");
  const int64_t saved_world = w == c.counters.end() ? 1 : w->second;
  if (saved_world < 1) throw std::runtime_error(src + ": counter world_size is " + std::to_string(saved_world));
  if (saved_world != world_) {
    // The same place in the epoch's permutation, to a whole global batch of
    // this run (the samples of a part-batch are seen again).
    const int64_t done = batch_ * saved_world, b = done / world_;
    log().warn("{} was written by {} rank(s), this run has {}: continuing at batch {} of epoch {} (not bit-exact)",
               src, saved_world, world_, b, epoch_ + 1);
    batch_ = b;
    step_ = epoch_ * per_epoch + b;
  }
  // A run never trains past its own epochs (a resume with fewer stops first).
  const auto run_epochs = c.counters.find("epochs");
  if (epoch_ < 0 || step_ < 0 || batch_ < 0 || batch_ > per_epoch ||
      (run_epochs != c.counters.end() && epoch_ > run_epochs->second))
    throw std::runtime_error(src + ": counters epoch " + std::to_string(epoch_) + ", step " + std::to_string(step_) +
                             ", batch " + std::to_string(batch_) + " do not fit a run of " +
                             std::to_string(per_epoch) + " batches an epoch" +
                             (run_epochs != c.counters.end() ? " and " + std::to_string(run_epochs->second) + " epochs"
                                                             : std::string()));
  auto scalar = [&](const char* k) {
    auto it = c.scalars.find(k);
    return it == c.scalars.end() ? 0.0 : it->second;
  };
  partial_ = {scalar("partial_loss_sum"), scalar("partial_correct"), scalar("partial_seen"), scalar("partial_act_sum"),
              scalar("partial_act_n")};
  history_ = c.metric_rows;
  if (!main_) partial_ = {};  // the checkpoint's sums are the ranks' together: counted once, on rank 0
  log().info("resuming from {}: epoch {}, batch {}, step {}", src, epoch_ + 1, batch_, step_);
}

void Trainer::save(int64_t epoch, int64_t batch, const Partial& part, bool gather) {
  ckpt::Checkpoint c;
  const auto& info = train_set_->info();
  c.meta = {{"arch", o_.arch},
            {"dataset", dataset_},
            {"config", o_.quant.to_flags()},
            {"command", o_.command},
            {"aq_version", AQ_VERSION},
            {"torch_version", std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                                  std::to_string(TORCH_VERSION_PATCH)},
            {"created", detail::now_utc()},
            {"optimizer", o_.optimizer == OptimizerKind::kAdamW ? "adamw" : o_.nesterov ? "sgd-nesterov" : "sgd"},
            {"schedule", to_string(o_.schedule)},
            {"amp", to_string(o_.amp)}};
  c.counters = {{"epoch", epoch},
                {"step", step_},
                {"batch", batch},
                {"num_classes", info.num_classes},
                {"in_channels", info.channels},
                {"image_size", info.height},
                {"seed", static_cast<int64_t>(seed_)},
                {"batch_size", o_.data.batch_size},
                {"epochs", o_.epochs},
                {"world_size", world_},
                {"dataset_size", train_set_->size()}};
  if (text_) c.counters["context"] = o_.data.context;
  if (models::is_transformer(o_.arch)) {
    c.counters["layers"] = o_.layers, c.counters["width"] = o_.width, c.counters["heads"] = o_.heads;
  }
  if (models::is_vit(o_.arch)) c.meta["pool"] = o_.pool;
  c.counters["warmup_steps"] = o_.warmup_steps;
  c.meta["milestones"] = list_text(o_.milestones);
  c.meta["mean"] = list_text(info.mean);  // the input normalisation, for aq-export
  c.meta["std"] = list_text(info.std);
  c.scalars = {{"lr", lr_},
               {"peak_lr", o_.lr},
               {"warmup", o_.warmup},
               {"momentum", o_.momentum},
               {"weight_decay", o_.weight_decay},
               {"label_smoothing", o_.label_smoothing},
               {"partial_loss_sum", part.loss_sum},
               {"partial_correct", part.correct},
               {"partial_seen", part.seen},
               {"partial_act_sum", part.act_sum},
               {"partial_act_n", part.act_n}};
  c.scalars["clip_grad_norm"] = o_.clip_grad_norm;
  if (models::is_transformer(o_.arch)) c.scalars["dropout"] = o_.dropout;
  if (o_.optimizer == OptimizerKind::kAdamW) {
    c.scalars["beta1"] = o_.beta1;
    c.scalars["beta2"] = o_.beta2;
    c.scalars["eps"] = o_.eps;
  }
  for (const auto& p : model_->named_parameters()) c.parameters.emplace_back(p.key(), p.value().detach());
  for (const auto& b : model_->named_buffers()) c.buffers.emplace_back(b.key(), b.value());
  c.optimizer = optimizer_state(*opt_, named_params());
  c.adaptive = adaptive_state(*model_);
  // Every rank's statistics and budgets are the same by construction
  // (StepOptions::all_gather), so rank 0's are the run's merged state; a
  // difference would be a fault, and the log says so.
  if (dp_) {
    if (const std::string bad = dp_->differing(c.adaptive); !bad.empty() && main_)
      log().warn("adaptive state {} differs between the ranks; the checkpoint holds rank 0's", bad);
  }
  c.rng.emplace_back("cpu", at::globalContext().defaultGenerator(c10::kCPU).get_state());
  if (dev_.is_cuda()) c.rng.emplace_back("cuda", at::globalContext().defaultGenerator(dev_).get_state());
  if (dp_) dp_->gather_rng(c, dev_);  // a collective: every rank calls save()
  if (!main_) return;
  c.metric_columns = EpochRow::columns(text_);
  c.metric_rows = history_;
  ckpt::save(in_workspace("checkpoint.h5"), c);
  if (gather) ckpt::save(in_workspace("checkpoint-" + std::to_string(epoch) + ".h5"), c);
}

int Trainer::run() {
  dp_ = detail::DataParallel::connect(dev_, std::chrono::milliseconds(static_cast<int64_t>(o_.dist_timeout * 1000)));
  if (dp_) {
    main_ = dp_->main();
    world_ = dp_->size();
    rank_ = dp_->rank();
    if (!main_ && log().level() < spdlog::level::warn) log().set_level(spdlog::level::warn);  // rank 0 speaks for all
  }
  if (o_.evaluate) {
    resolve_resume();
    setup();
    if (dp_) dp_->equal_buffers(*model_);
    auto r = evaluate(*model_, *test_loader_, dev_, o_.amp, o_.val_batches);
    if (dp_) r = dp_->reduce(r);
    if (obs_.evaluated && main_)
      obs_.evaluated(!resume_.empty() ? resume_ : !o_.init_from.empty() ? o_.init_from : "(initial)", r);
    return 0;
  }
  if (main_) detail::make_folders(o_.workspace, false);
  detail::SignalScope signals;  // before the workspace appears: scripts wait for it
  std::optional<detail::WorkspaceLock> lock;
  if (main_) {
    detail::make_folders(o_.workspace);
    detail::check_writable(o_.workspace, in_workspace(".aq-write-test." + std::to_string(::getpid())));
    // Before the workspace's checkpoint is looked at: another run may be writing it.
    lock.emplace(o_.workspace, in_workspace(".aq-train.lock"));
  }
  resolve_resume();
  setup();
  if (const int sig = dp_ ? dp_->agree(detail::signal_flag().load()) : detail::signal_flag().load()) {
    log().warn("stopped by signal {} before the first step", sig);
    return 128 + sig;
  }
  if (main_) {
    for (const auto& f : detail::remove_stale_temporaries(o_.workspace))
      log().info("removed {}, left by a run that was killed while writing a checkpoint", f);
  }
  const int64_t per_epoch = train_loader_->batches_per_epoch();
  if (per_epoch == 0) throw std::runtime_error(dataset_ + ": no training batch (dataset smaller than --batch-size with drop_last)");
  const int64_t total = per_epoch * o_.epochs;
  if (main_) start_metrics();
  if (epoch_ >= o_.epochs) {
    log().info("{} has already trained {} of --epochs {}: nothing to do", resume_, epoch_, o_.epochs);
    return 0;
  }
  if (o_.max_steps > 0 && step_ >= o_.max_steps) {
    log().info("{} is already at step {} of --max-steps {}: nothing to do", resume_, step_, o_.max_steps);
    return 0;
  }
  if (obs_.training && main_) obs_.training();
  detail::Progress bar{main_ && o_.progress && isatty(STDERR_FILENO) && log().level() <= spdlog::level::info};
  StepOptions so;
  so.amp = o_.amp;
  so.label_smoothing = o_.label_smoothing;
  so.quant = o_.quant;
  so.cuda_graphs = o_.cuda_graphs.value_or(dev_.is_cuda());
  so.graph_refresh = o_.graph_refresh;
  so.index_bound = train_set_->size();
  so.clip_grad_norm = o_.clip_grad_norm;
  if (dp_) dp_->hook(*model_, so);
  Step train_step(*model_, dev_, so);
  LrSchedule schedule{o_.schedule, o_.lr, o_.warmup, o_.warmup_steps, o_.milestones, o_.epochs};
  // The stop signal as every rank sees it: a signal on any rank stops all
  // after the same step (agreed after each step, a one-number all-reduce).
  const auto& local_signal = detail::signal_flag();
  int agreed = 0;
  struct {
    const std::atomic<int>& local;
    const int& agreed;
    bool dp;
    int load() const { return dp ? agreed : local.load(); }
  } signal{local_signal, agreed, dp_ != nullptr};
  bool saved_epoch = false;  // this process wrote the checkpoint of the last finished step
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  const int64_t log_every =
      o_.log_interval >= 0 ? o_.log_interval : (isatty(STDERR_FILENO) ? 0 : 100);
  const int64_t last_step = o_.max_steps > 0 ? std::min(total, o_.max_steps) : total;
  const auto run_start = Clock::now();
  const int64_t first_step = step_;
  auto eta = [&] {  // from this process's pace so far
    const int64_t done = step_ - first_step;
    return done > 0 ? detail::duration(seconds(Clock::now() - run_start) / done * (last_step - step_)) : "?";
  };
  for (; epoch_ < o_.epochs; ++epoch_) {
    if (const int sig = signal.load(); sig && saved_epoch) {
      log().warn("stopped by signal {} after epoch {}: its checkpoint is {}; continue with --resume", sig, epoch_,
                 in_workspace("checkpoint.h5"));
      return 128 + sig;
    }
    model_->train();
    train_loader_->start(epoch_, batch_);
    reset_peak(dev_);
    Partial part = partial_;
    partial_ = {};
    auto loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(dev_));
    auto correct = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(dev_));
    int64_t seen_now = 0;
    bool stop = false;
    const auto t0 = Clock::now();
    auto since_log = t0;
    Clock::duration waited{};  // in next() since the last log line
    int64_t seen_at_log = 0;
    for (;;) {
      const auto tw = Clock::now();
      auto b = train_loader_->next();
      waited += Clock::now() - tw;
      if (!b) break;
      lr_ = schedule.at(step_, total, per_epoch);
      set_lr(*opt_, lr_);
      for (const auto& m : train_loader_->take_skipped()) {
        bar.end();  // a message over the bar would leave the bar's text before it
        log().warn("skipped: {}", m);
      }
      // On the device first: NHWC there, not a copy on the loading thread.
      const auto images = channels_last_ ? b->images.to(dev_, /*non_blocking=*/true).contiguous(torch::MemoryFormat::ChannelsLast)
                                         : b->images;
      const StepResult r = train_step(images, b->labels, b->indices, opt_.get());
      part.act_sum += static_cast<double>(r.activations);
      part.act_n += 1;
      const auto& y = r.labels;
      // Per sample, or per token for a token model.
      loss_sum += r.loss.to(torch::kDouble) * y.numel();
      correct += aq::train::correct(r.logits, y);
      seen_now += y.numel();
      ++step_;
      ++batch_;
      if (dp_) agreed = dp_->agree(local_signal.load());
      if (bar.due(batch_, per_epoch)) {
        const double secs = seconds(Clock::now() - t0), seen = part.seen + seen_now;
        char text[160];
        // ETA first: a narrow terminal cuts the end of the line.
        std::snprintf(text, sizeof text, text_ ? "ETA %s loss %.4f acc %.2f%% %.0f tok/s" : "ETA %s loss %.4f acc %.2f%% %.0f img/s", eta().c_str(),
                      (part.loss_sum + loss_sum.item<double>()) / seen,
                      100.0 * (part.correct + correct.item<int64_t>()) / seen, seen_now / std::max(secs, 1e-9));
        bar.show("epoch " + std::to_string(epoch_ + 1) + "/" + std::to_string(o_.epochs), batch_, per_epoch, text);
      }
      if (log_every > 0 && step_ % log_every == 0) {
        const auto now = Clock::now();
        const double secs = std::max(seconds(now - since_log), 1e-9), seen = part.seen + seen_now;
        bar.end();
        log().info("{} step {}/{} epoch {}/{} batch {}/{} loss {:.4f} acc {:.2f}% lr {:.6g} {:.1f} {}/s data wait {:.0f}% ETA {}",
                   detail::now_utc(), step_, last_step, epoch_ + 1, o_.epochs, batch_, per_epoch,
                   (part.loss_sum + loss_sum.item<double>()) / seen,
                   100.0 * (part.correct + correct.item<int64_t>()) / seen, lr_, (seen_now - seen_at_log) / secs,
                   text_ ? "tok" : "img",
                   100.0 * seconds(waited) / secs, eta());
        since_log = now;
        waited = {};
        seen_at_log = seen_now;
      }
      if (o_.checkpoint_interval > 0 && step_ % o_.checkpoint_interval == 0 && batch_ < per_epoch &&
          !signal.load()) {
        save(epoch_, batch_, ranks_sum(partial_now(part, loss_sum, correct, seen_now)), false);
        log().debug("checkpoint at step {}", step_);
      }
      if (signal.load() || (o_.max_steps > 0 && step_ >= o_.max_steps)) {
        stop = true;
        break;
      }
    }
    if (dev_.is_cuda()) torch::cuda::synchronize(dev_.index());
    const double secs = seconds(Clock::now() - t0);
    bar.end();
    part.loss_sum += loss_sum.item<double>();
    part.correct += static_cast<double>(correct.item<int64_t>());
    part.seen += static_cast<double>(seen_now);
    // On a signal, the checkpoint of the last finished step: before the
    // evaluation, or as soon as one comes during it (a large test set takes
    // longer than a cluster's grace period).
    const auto stop_by_signal = [&](int sig) {
      save(epoch_, batch_, ranks_sum(part), false);
      if (main_)
        log().warn("stopped by signal {} at epoch {}, batch {}: checkpoint written to {}; continue with --resume",
                 sig, epoch_ + 1, batch_, in_workspace("checkpoint.h5"));
      return 128 + sig;
    };
    if (const int sig = signal.load()) return stop_by_signal(sig);
    const auto peak = memory(dev_).peak;
    for (const auto& m : train_loader_->take_skipped()) log().warn("skipped: {}", m);
    // Ranks evaluate their shards to the end: a stop on one rank alone
    // would leave the others waiting in the reduction.
    if (dp_) dp_->equal_buffers(*model_);
    auto val = evaluate(
        *model_, *test_loader_, dev_, o_.amp, o_.val_batches,
        [&]() -> bool { return !dp_ && signal.load() != 0; },
        [&](int64_t done, int64_t n) {
          if (bar.due(done, n))
            bar.show("validating " + std::to_string(epoch_ + 1) + "/" + std::to_string(o_.epochs), done, n, "");
        });
    bar.end();
    if (dp_) {
      val = dp_->reduce(val);
      agreed = dp_->agree(local_signal.load());
      if (agreed) return stop_by_signal(agreed);
    }
    if (val.stopped) return stop_by_signal(signal.load());
    if (dp_) {  // the epoch's training figures of all ranks
      part = ranks_sum(part);
      std::vector<double> n{static_cast<double>(seen_now)};
      dp_->sum(n);
      seen_now = static_cast<int64_t>(n[0]);
    }
    for (const auto& m : test_loader_->take_skipped()) log().warn("skipped: {}", m);
    const bool mid_epoch = stop && batch_ < per_epoch;
    EpochRow row;
    row.text = text_;
    row.epoch = epoch_ + 1;
    row.step = step_;
    row.lr = lr_;
    row.train_loss = part.seen ? part.loss_sum / part.seen : NAN;
    row.train_acc = part.seen ? 100.0 * part.correct / part.seen : NAN;
    row.val_loss = val.loss;
    row.val_top1 = val.top1;
    row.val_top5 = val.top5;
    row.img_per_s = seen_now / std::max(secs, 1e-9);
    row.act_mb = part.act_n ? part.act_sum / part.act_n / 1048576.0 : 0.0;
    row.peak_mb = peak / 1048576.0;
    history_.push_back(row.values());
    // The checkpoint first: an observer that fails (its output closed) must
    // not cost the epoch.
    if (mid_epoch) {
      save(epoch_, batch_, part, false);
      if (main_) append_metrics(row);
      if (obs_.epoch && main_) obs_.epoch(row);
      log().info("--max-steps {} reached at epoch {}, batch {}: checkpoint written", o_.max_steps, epoch_ + 1,
                 batch_);
      return 0;
    }
    batch_ = 0;
    save(epoch_ + 1, 0, {}, o_.gather_checkpoints);
    saved_epoch = true;
    if (main_) append_metrics(row);
    if (obs_.epoch && main_) {
      try {
        obs_.epoch(row);
      } catch (const std::exception& e) {
        throw std::runtime_error(std::string(e.what()) + " (the checkpoint of epoch " + std::to_string(epoch_ + 1) +
                                 " is written: continue with --resume)");
      }
    }
    if (text_)
      log().info("epoch {}/{}: train loss {:.4f}, val loss {:.4f} (perplexity {:.2f}), val token accuracy {:.2f}%",
                 epoch_ + 1, o_.epochs, row.train_loss, val.loss, std::exp(val.loss), val.top1);
    else
      log().info("epoch {}/{}: train loss {:.4f}, val top-1 {:.2f}%, bad images skipped {} train, {} val", epoch_ + 1,
                 o_.epochs, row.train_loss, val.top1, train_loader_->skipped(), test_loader_->skipped());
    if (stop) {
      ++epoch_;
      break;
    }
  }
  return 0;
}

}  // namespace

const std::vector<std::string>& EpochRow::columns(bool text) {
  static const std::vector<std::string> c = {"epoch",    "step",     "lr",        "train_loss", "train_acc", "val_loss",
                                             "val_top1", "val_top5", "img_per_s", "act_mb",     "peak_mb"};
  static const std::vector<std::string> t = {"epoch",   "step",     "lr",      "train_loss", "train_ppl", "train_acc",
                                             "val_loss", "val_ppl", "val_acc", "tok_per_s",  "act_mb",    "peak_mb"};
  return text ? t : c;
}

EpochRow EpochRow::from_values(const std::vector<double>& v, bool text) {
  EpochRow r;
  r.text = text;
  r.epoch = static_cast<int64_t>(v.at(0)), r.step = static_cast<int64_t>(v.at(1)), r.lr = v.at(2);
  r.train_loss = v.at(3);
  if (text) {  // perplexities follow from the losses
    r.train_acc = v.at(5), r.val_loss = v.at(6), r.val_top1 = v.at(8), r.img_per_s = v.at(9);
    r.act_mb = v.at(10), r.peak_mb = v.at(11);
  } else {
    r.train_acc = v.at(4), r.val_loss = v.at(5), r.val_top1 = v.at(6), r.val_top5 = v.at(7);
    r.img_per_s = v.at(8), r.act_mb = v.at(9), r.peak_mb = v.at(10);
  }
  return r;
}

std::string EpochRow::tsv() const {
  char buf[512];
  if (text) {
    std::snprintf(buf, sizeof buf, "%lld\t%lld\t%.6g\t%.4f\t%.3f\t%.2f\t%.4f\t%.3f\t%.2f\t%.1f\t%.2f\t%.2f\n",
                  static_cast<long long>(epoch), static_cast<long long>(step), lr, train_loss, std::exp(train_loss),
                  train_acc, val_loss, std::exp(val_loss), val_top1, img_per_s, act_mb, peak_mb);
    return buf;
  }
  std::snprintf(buf, sizeof buf, "%lld\t%lld\t%.6g\t%.4f\t%.2f\t%.4f\t%.2f\t%.2f\t%.1f\t%.2f\t%.2f\n",
                static_cast<long long>(epoch), static_cast<long long>(step), lr, train_loss, train_acc, val_loss,
                val_top1, val_top5, img_per_s, act_mb, peak_mb);
  return buf;
}

std::vector<double> EpochRow::values() const {
  if (text)
    return {double(epoch), double(step), lr,       train_loss, std::exp(train_loss), train_acc,
            val_loss,      std::exp(val_loss), val_top1, img_per_s, act_mb,               peak_mb};
  return {double(epoch), double(step), lr,        train_loss, train_acc, val_loss,
          val_top1,      val_top5,     img_per_s, act_mb,     peak_mb};
}

int run(const Options& o, const Observer& observer) {
  install_cpu_memory_counter();
  Trainer t(o, observer);
  return t.run();
}

}  // namespace aq::train
