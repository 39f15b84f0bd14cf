#include "aq/cli.h"

#include "aq/log.h"
#include "aq/memory.h"

#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>

namespace aq {

namespace cli {

namespace {
CLI::Validator number_at_least(bool strict) {
  return CLI::Validator(
      [strict](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return "must be a number, not " + text;
        if (!std::isfinite(v)) return "must be a finite number, not " + text;
        if (strict ? v <= 0 : v < 0)
          return std::string("must be ") + (strict ? "positive" : "zero or more") + ", not " + text;
        return std::string();
      },
      strict ? "POSITIVE" : "NONNEGATIVE");
}
}  // namespace

const CLI::Validator Positive = number_at_least(true);
const CLI::Validator NonNegative = number_at_least(false);

namespace {
// 0..1, NaN excluded (CLI::Range lets NaN through).
const CLI::Validator Fraction(
    [](std::string& text) -> std::string {
      double v = 0;
      if (!CLI::detail::lexical_cast(text, v)) return "must be a number, not " + text;
      if (!(v >= 0 && v <= 1)) return "must be in 0..1, not " + text;
      return std::string();
    },
    "0..1");
// Thread counts: beyond this a count is a typo, and creating that many
// threads exhausts the process's limits before any work is done.
constexpr int kMaxThreads = 1024;
const CLI::Validator ThreadCount(
    [](std::string& text) -> std::string {
      double v = 0;
      if (!CLI::detail::lexical_cast(text, v)) return "must be a number, not " + text;
      if (std::isnan(v) || v < 0) return "must be zero or more, not " + text;
      if (v > kMaxThreads) return "must be at most " + std::to_string(kMaxThreads) + ", not " + text;
      return std::string();
    },
    "0.." + std::to_string(kMaxThreads));
}  // namespace

QuantOptions::QuantOptions(CLI::App& app, bool ignored) : app_(app) {
  const char* g = ignored ? "ActNN's quantization flags (accepted, ignored)"
                          : "Quantization (ActNN's flags; a level sets defaults, given flags override)";
  app.add_option("-c,--qconfig", scope_, "Model configuration: fanin, quantize, qlinear, qsyncbn")
      ->capture_default_str()
      ->group(g);
  app.add_option("--level", level_, "Optimisation level: L0, L1, L2, L3, L3.1, L4, L5")->capture_default_str()->group(g);
  app.add_option("--ca", ca_, "Compress saved activations: True/False (level default)")->group(g);
  app.add_option("--cabits", cabits_, "Average bits per activation element, 1..8 (level default; L3 and up: 2, on transformers 3)")->group(g);
  app.add_option("--ibits", ibits_, "Initial bits before reallocation, cabits..8 (level default)")->group(g);
  app.add_option("--pergroup", pergroup_, "Per-group ranges: True/False (default True)")->group(g);
  app.add_option("--perlayer", perlayer_, "Reallocate bits across layers: True/False (level default)")->group(g);
  app.add_option("--usegradient", usegradient_, "Per-sample gradient statistics: True/False (default True)")->group(g);
  app.add_option("--group-size", group_size_, "Elements per quantization group (default 256)")->group(g);
  app.add_option("--attention-bits", attention_bits_,
                 "Self-attention's q, k, v (and its output, where its backward reads it): bits per element, "
                 "uniform, 1..8; 0: as every layer (level default)")
      ->group(g);
  app.add_option("--range-dtype", range_dtype_, "Storage of group ranges: bf16 or fp32 (default bf16)")->group(g);
  app.add_option("--rounding", rounding_, "stochastic (default) or nearest (biased; for experiments)")->group(g);
}

QuantConfig QuantOptions::resolve() const {
  QuantConfig c = QuantConfig::for_level(parse_level(level_));
  c.scope = parse_scope(scope_);
  auto given = [&](const char* name) { return app_.get_option(name)->count() > 0; };
  try {
    if (given("--ca")) c.ca = parse_bool(ca_);
    if (given("--pergroup")) c.pergroup = parse_bool(pergroup_);
    if (given("--perlayer")) c.perlayer = parse_bool(perlayer_);
    if (given("--usegradient")) c.usegradient = parse_bool(usegradient_);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("quantization flag: ") + e.what());
  }
  if (given("--cabits")) c.cabits = parse_int("--cabits", cabits_), c.cabits_given = true;
  if (given("--ibits")) c.ibits = parse_int("--ibits", ibits_);
  if (given("--group-size")) c.group_size = parse_int("--group-size", group_size_);
  if (given("--attention-bits")) c.attention_bits = parse_int("--attention-bits", attention_bits_);
  if (given("--range-dtype")) c.range_dtype = parse_range_dtype(range_dtype_);
  if (given("--rounding")) c.stochastic = parse_rounding(rounding_);
  c.validate();
  return c;
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

OptionTable::OptionTable(CLI::App& app, unsigned tool, Values defaults)
    : values(std::move(defaults)), app_(app), tool_(tool) {
  Values& v = values;
  constexpr unsigned kMeasure = kVariance | kCalibrate;
  constexpr unsigned kModel = kTrain | kMeasure;  // build a model from data or a checkpoint
  constexpr unsigned kBenchAll = kBench | kBenchMaxBatch;  // a model on synthetic batches
  const bool bench = tool_ & kBenchAll;
  const std::string d = "Data and model", t = "Training", r = "Run", c = "Common options";
  // Data and model.
  if (tool_ & kModel)
    app.add_option("data_dir", v.data.data_dir, "Dataset folder (default: the dataset's default location)");
  add(kModel | kEval, false, "--data", v.data.data_dir, "Dataset folder (the same as the positional folder)", d);
  add(kModel | kEval, true, "--dataset", v.data.dataset,
      tool_ & kEval ? "Dataset (default: the checkpoint's)"
                    : "fashion-mnist, mnist, cifar10, cifar100, imagenet, synthetic or text (a folder of text files)",
      d);
  add(kModel | kBenchAll, true, "--arch", v.arch,
      "preact_resnet20/32/44/56/110/164/1001, resnet18/34/50/101/152, vit_tiny, vit_small, gpt_small",
      d);
  if (bench)  // no dataset to take the class count from
    add(kBenchAll, false, "--num-classes,--classes", v.data.num_classes, "Classes", d, &Positive);
  else
    add(kModel, true, "--num-classes", v.data.num_classes,
        "Classes (0: the dataset's; --dataset cifar10 --num-classes 100 reads CIFAR-100)", d, &NonNegative);
  add(kModel | kEval, true, "-j,--workers", v.data.workers, "Data loading threads (0: in the calling thread)", d,
      &ThreadCount);
  if (tool_ & (kModel | kEval)) {
    static const std::map<std::string, data::BadImages> kBadImages = {{"skip", data::BadImages::kSkip},
                                                                       {"fail", data::BadImages::kFail}};
    app.add_option("--bad-images", v.data.bad_images,
                   "An image file that cannot be read or decoded: skip it (with a warning, counted) or fail")
        ->transform(CLI::CheckedTransformer(kBadImages))
        ->default_str("skip")
        ->group(d);
  }
  add(kModel | kEval | kBench, true, "-b,--batch-size", v.data.batch_size, "Batch size", d, &Positive);
  add(kModel | kEval | kBenchAll, false, "--image-size", v.data.image_size,
      bench ? "Image side" : "Image side for imagenet and synthetic data", d, &Positive);
  // The measuring tools take a checkpoint's shape; these build a fresh model.
  const std::string own = tool_ & kMeasure ? "; with --resume: the checkpoint's)" : ")";
  add(kTrain | kMeasure | kBenchAll, false, "--context,--seq-len", v.data.context,
      bench ? "Tokens per sample of token models (gpt_*)"
            : "Tokens per sample of --dataset text (windows of N+1 bytes" + own,
      d, &Positive);
  add(kTrain | kMeasure | kBenchAll, false, "--layers", v.layers,
      "Transformers: blocks (0: the architecture's own" + own, d, &NonNegative);
  add(kTrain | kMeasure | kBenchAll, false, "--width", v.width,
      "Transformers: embedding width (0: the architecture's own" + own, d, &NonNegative);
  add(kTrain | kMeasure | kBenchAll, false, "--heads", v.heads,
      "Transformers: attention heads, dividing the width (0: the architecture's own, or width / 64 with --width" + own,
      d, &NonNegative);
  add(kTrain | kBenchAll, false, "--dropout", v.dropout,
      "Transformers: dropout after the embeddings, attention and MLP, in [0, 1)", d, &Fraction);
  if (auto* o = add(kTrain | kMeasure | kBenchAll, false, "--pool", v.pool,
                    "ViTs: classify the class token (cls) or the mean of the patch tokens (mean" + own, d))
    o->check(CLI::IsMember({"cls", "mean"}));
  add(kModel | kEval | kBenchAll, false, "--amp", v.amp,
      "Autocast: off, bf16 or fp16 (fp16 with dynamic loss scaling)", d);
  // ActNN's training configuration.
  add(kTrain, true, "--epochs", v.epochs, "Epochs", t, &Positive);
  add(kTrain, true, "--lr", v.lr, "Peak learning rate", t, &NonNegative);
  add(kTrain, true, "--momentum", v.momentum, "SGD momentum", t, &Fraction);
  add(kTrain, true, "--weight-decay,--wd", v.weight_decay, "Weight decay", t, &NonNegative);
  add(kTrain, true, "--label-smoothing", v.label_smoothing, "Label smoothing", t, &Fraction);
  // ActNN's run configuration.
  add(kTrain, true, "--workspace", v.workspace, "Folder for checkpoints (created if missing)", r);
  add(kModel | kEval, true, "--resume", v.resume,
      "Checkpoint to continue from (aq-train; auto: the workspace's checkpoint.h5 if any, else start) or to measure "
      "(aq-eval: evaluated first)",
      r);
  add(kTrain | kVariance, true, "--resume2", v.resume2,
      "ActNN's second checkpoint of --evaluate --training-only: must name the --resume checkpoint", r);
  flag(kTrain, true, "--gather-checkpoints", v.gather_checkpoints, "Keep checkpoint-<epoch>.h5 of every epoch", r);
  flag(kTrain, true, "--evaluate,-e", v.evaluate, "Only evaluate (the --resume checkpoint) on the test split", r);
  flag(kTrain, true, "--training-only", v.training_only,
       "With --evaluate: ActNN's gradient-variance measurement (as aq-variance)", r);
  if (tool_ & (kModel | kEval)) quant_ = std::make_unique<QuantOptions>(app, !(tool_ & kModel));
  // Common.
  app.add_option("--device", v.device, "Device: auto, cpu, cuda or cuda:N (auto: cuda if a GPU is visible)")
      ->capture_default_str()
      ->group(c);
  app.add_option("--threads", v.threads, "CPU threads for LibTorch (0: its default)")
      ->check(ThreadCount)
      ->capture_default_str()
      ->group(c);
  app.add_option_function<uint64_t>(
         "--seed", [&v](const uint64_t& s) { v.seed = s, v.seed_given = true; },
         "Seed of LibTorch's generators (default: nondeterministic)")
      ->group(c);
  app.add_flag_callback("-v,--verbose", [&v] { ++v.verbosity; }, "More log output on stderr")->group(c);
  app.add_flag_callback("-q,--quiet", [&v] { --v.verbosity; }, "Errors only on stderr")->group(c);
}

bool OptionTable::ignores_actnn() const { return tool_ & (kTrain | kEval | kVariance | kCalibrate); }

template <typename T>
CLI::Option* OptionTable::add(unsigned users, bool actnn, const std::string& names, T& value, const std::string& help,
                              const std::string& group, const CLI::Validator* check) {
  if (tool_ & users) {
    auto* o = app_.add_option(names, value, help)->capture_default_str()->group(group);
    if (check) o->check(*check);
    return o;
  }
  if (actnn && ignores_actnn())
    return app_.add_option(names, ignored_, "Accepted and ignored (ActNN's command lines)")
        ->group("ActNN's options (accepted, ignored)");
  return nullptr;
}

CLI::Option* OptionTable::flag(unsigned users, bool actnn, const std::string& names, bool& value,
                               const std::string& help, const std::string& group) {
  if (tool_ & users) return app_.add_flag(names, value, help)->group(group);
  if (actnn && ignores_actnn())
    return app_.add_flag(names, ignored_flag_, "Accepted and ignored (ActNN's command lines)")
        ->group("ActNN's options (accepted, ignored)");
  return nullptr;
}

QuantConfig OptionTable::quant() const {
  if (!quant_) throw std::logic_error("aq: this tool takes no quantization options");
  return quant_->resolve();
}

train::Amp OptionTable::amp() const { return train::parse_amp(values.amp); }

models::ModelOptions OptionTable::shape() const {
  models::ModelOptions s;
  s.layers = values.layers, s.width = values.width, s.heads = values.heads, s.dropout = values.dropout;
  s.class_token = values.pool == "cls";
  return s;
}

std::set<std::string> OptionTable::given(std::initializer_list<const char*> names) const {
  std::set<std::string> out;
  for (const char* name : names)
    if (app_.count(name)) out.insert(name);
  return out;
}

std::set<std::string> OptionTable::given_model() const {
  return given({"--arch", "--dataset", "--context", "--layers", "--width", "--heads", "--pool"});
}

c10::Device OptionTable::apply_common() const {
  const Values& c = values;
  log().set_level(c.verbosity > 0 ? spdlog::level::debug
                  : c.verbosity < 0 ? spdlog::level::err
                                    : spdlog::level::info);
  if (c.threads > 0) torch::set_num_threads(c.threads);
  if (c.seed_given) torch::manual_seed(c.seed);
  c10::Device d("cpu");
  try {
    d = c.device == "auto" ? c10::Device(torch::cuda::is_available() ? "cuda" : "cpu") : c10::Device(c.device);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + c.device + "' (use auto, cpu, cuda or cuda:N)");
  }
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) throw std::runtime_error("--device " + c.device + ": no CUDA device is visible");
    if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
      throw std::runtime_error("--device " + c.device + ": only " + std::to_string(torch::cuda::device_count()) +
                               " CUDA device(s)");
    log().debug("CUDA allocator: expandable segments {}", use_expandable_segments() ? "on" : "off");
  } else if (!d.is_cpu()) {
    throw std::invalid_argument("unsupported device '" + c.device + "'");
  }
  return d;
}

void print(const variance::Report& rep) {
  std::printf("config\tlayer\toverall_var\tbias\tsample_var\n");
  for (const auto& r : rep.results) {
    for (size_t l = 0; l < r.layers.size(); ++l)
      std::printf("%s\t%s\t%.6g\t%.6g\t%.6g\n", r.config.c_str(), r.layers[l].c_str(), r.per_layer[l].overall_var,
                  r.per_layer[l].bias, r.per_layer[l].sample_var);
    std::printf("%s\ttotal\t%.6g\t%.6g\t%.6g\n", r.config.c_str(), r.total.overall_var, r.total.bias,
                r.total.sample_var);
  }
  std::fflush(stdout);
}

namespace {

// The first line of a LibTorch message (they append C++ stack traces).
std::string first_line(const char* what) {
  std::string s(what);
  auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

}  // namespace

static int run_body(CLI::App& app, int argc, char** argv, const std::function<int()>& body, const std::string& name) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);  // --help: stdout, status 0
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << name << ": " << e.what() << "\nTry '" << name << " --help'.\n";
    return kUsage;
  }
  try {
    return body();
  } catch (const std::invalid_argument& e) {
    std::cerr << name << ": " << first_line(e.what()) << "\nTry '" << name << " --help'.\n";
    return kUsage;
  } catch (const c10::Error& e) {
    std::cerr << name << ": " << (is_out_of_memory(e) ? "out of memory: " : "") << error_line(e) << "\n";
  } catch (const std::bad_alloc&) {
    std::cerr << name << ": out of host memory\n";
  } catch (const std::exception& e) {
    std::cerr << name << ": " << first_line(e.what()) << "\n";
  }
  return kRuntime;
}

void refuse_existing(const std::string& path, bool force) {
  struct stat st {};
  if (!force && !path.empty() && path != "-" && ::lstat(path.c_str(), &st) == 0)
    throw std::invalid_argument(path + " exists: replace it with --force");
}

void flush_stdout() {
  errno = 0;
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    const int err = errno ? errno : EIO;
    throw std::runtime_error(std::string("cannot write to standard output: ") + std::strerror(err));
  }
}

int run(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  const std::string name = std::filesystem::path(argv[0]).filename().string();
  std::signal(SIGPIPE, SIG_IGN);
  const int status = run_body(app, argc, argv, body, name);
  if (status != kOk) return status;  // its one line is out; a write error may be it
  try {
    flush_stdout();
  } catch (const std::runtime_error& e) {
    std::cerr << name << ": " << e.what() << "\n";
    return kRuntime;
  }
  return status;
}

}  // namespace cli
}  // namespace aq
