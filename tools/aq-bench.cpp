// aq-bench: measured numbers for aq: compression kernels, training-step memory and time.
// TSV on stdout, one line per measurement; logs on stderr.
#include "aq/cli.h"
#include "aq/compress.h"
#include "aq/adaptive.h"
#include "aq_config.h"
#include "aq/log.h"
#include "aq/models.h"
#include "aq/train.h"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>
#if AQ_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct KernelArgs {
  std::vector<std::string> sizes = {"256M", "1G"};
  std::vector<std::string> dtypes = {"fp32", "bf16"};
  std::vector<int> bits = {2, 4};
  int64_t group_size = 256;
  int64_t samples = 256;
  int reps = 0;    // 0: 5 on CUDA, 3 on CPU
  int inner = 0;   // calls per timed batch; 0: 10 on CUDA, 1 on CPU
};

int64_t parse_size(const std::string& s) {
  size_t pos = 0;
  double v;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    throw std::invalid_argument("bad size '" + s + "' (e.g. 256M, 1G)");
  }
  std::string unit = s.substr(pos);
  double mul = 1;
  if (unit == "K" || unit == "KiB") mul = 1024.0;
  else if (unit == "M" || unit == "MiB") mul = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB") mul = 1024.0 * 1024 * 1024;
  else if (!unit.empty() && unit != "B") throw std::invalid_argument("bad size unit in '" + s + "' (use K, M or G)");
  if (v <= 0) throw std::invalid_argument("size must be positive: '" + s + "'");
  return static_cast<int64_t>(v * mul);
}

torch::Dtype parse_dtype(const std::string& s) {
  if (s == "fp32" || s == "float32") return torch::kFloat;
  if (s == "bf16" || s == "bfloat16") return torch::kBFloat16;
  if (s == "fp16" || s == "float16") return torch::kHalf;
  throw std::invalid_argument("unknown dtype '" + s + "' (use fp32, bf16 or fp16)");
}

void sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

// Median over `reps` batches of the mean seconds per call of f.
template <typename F>
double time_it(const torch::Device& d, int reps, int inner, F&& f) {
  f();  // warm-up (allocator, caches)
  sync(d);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    sync(d);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / inner);
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

int bench_kernels(const KernelArgs& a, const torch::Device& dev) {
  const int reps = a.reps ? a.reps : (dev.is_cuda() ? 5 : 3);
  const int inner = a.inner ? a.inner : (dev.is_cuda() ? 10 : 1);
  aq::CompressOptions o;
  o.group_size = a.group_size;
  // Every size and dtype is parsed before the first line: a usage error
  // leaves stdout empty.
  struct Case {
    std::string size, dts;
    int64_t bytes;
    torch::Dtype dt;
    int64_t n, numel;
  };
  std::vector<Case> cases;
  for (const auto& size : a.sizes)
    for (const auto& dts : a.dtypes) {
      Case c{size, dts, parse_size(size), parse_dtype(dts), 0, 0};
      c.numel = c.bytes / torch::elementSize(c.dt);
      c.n = std::min<int64_t>(a.samples, c.numel);
      if (c.n < 1 || c.numel % c.n) throw std::invalid_argument("size " + size + " does not split into " + std::to_string(a.samples) + " samples");
      cases.push_back(c);
    }
  std::printf("device\tdtype\tinput_bytes\tbits\top\tmedian_ms\tGB_per_s\tcopy_GB_per_s\tratio_to_copy\tpacked_bytes\n");
  for (const Case& c : cases) {
    aq::log().info("{} {} on {}: {} x {}", c.size, c.dts, dev.str(), c.n, c.numel / c.n);
    auto x = torch::randn({c.n, c.numel / c.n}, torch::TensorOptions().dtype(c.dt).device(dev));
    auto y = torch::empty_like(x);
    // The device's own copy: bytes read + written per second.
    const double tc = time_it(dev, reps, inner, [&] { y.copy_(x); });
    const double copy_rate = 2.0 * c.bytes / tc;
    y.reset();
    for (int b : a.bits) {
      aq::Packed p = aq::quantize(x, b, o);
      const double tq = time_it(dev, reps, inner, [&] { p = aq::quantize(x, b, o); });
      torch::Tensor back;
      const double td = time_it(dev, reps, inner, [&] { back = aq::dequantize(p); });
      for (auto [op, t] : {std::pair{"compress", tq}, std::pair{"decompress", td}}) {
        const double rate = c.bytes / t;
        std::printf("%s\t%s\t%lld\t%d\t%s\t%.4f\t%.3f\t%.3f\t%.4f\t%lld\n", dev.str().c_str(), c.dts.c_str(),
                    static_cast<long long>(c.bytes), b, op, t * 1e3, rate / 1e9, copy_rate / 1e9, rate / copy_rate,
                    static_cast<long long>(p.nbytes()));
      }
      std::fflush(stdout);
    }
  }
  return aq::cli::kOk;
}

// What the model benchmarks share: the model, its input, and the levels
// compared with the exact model.
struct ModelArgs {
  std::string arch = "resnet50";
  int64_t image_size = 224, channels = 3, classes = 1000;
  std::vector<std::string> levels;
  std::string amp = "off";
  int64_t micro_batch_mb = aq::QuantConfig().micro_batch_bytes >> 20;
  std::string channels_last = "auto";  // auto: on CUDA
};

// Channels-last input and convolution weights, as a user runs a CNN on a GPU.
bool channels_last_on(const ModelArgs& a, const torch::Device& dev) {
  return a.channels_last == "auto" ? dev.is_cuda() : aq::parse_bool(a.channels_last);
}
void to_channels_last(torch::nn::Module& model) {
  torch::NoGradGuard g;
  for (auto& p : model.parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
}

// The model every subcommand measures for one configuration: built from
// seed 0, on dev, channels last where asked, in training mode.
aq::models::ModelPtr bench_model(const ModelArgs& a, const aq::QuantConfig& cfg, const torch::Device& dev, bool cl) {
  torch::manual_seed(0);
  auto model = aq::models::build(a.arch, a.channels, a.classes, cfg);
  model->to(dev);
  if (cl) to_channels_last(*model);
  model->train();
  return model;
}

void add_model_options(CLI::App& sub, ModelArgs& m) {
  sub.add_option("--arch", m.arch, "Architecture (see aq-train --arch)")->capture_default_str();
  sub.add_option("--image-size", m.image_size, "Image side")->check(aq::cli::Positive)->capture_default_str();
  sub.add_option("--channels", m.channels, "Input channels")->check(aq::cli::Positive)->capture_default_str();
  sub.add_option("--classes", m.classes, "Classes")->check(aq::cli::Positive)->capture_default_str();
  sub.add_option("--levels", m.levels, "Levels besides the exact model: L0, L1, L2, L3, L3.1, L4, L5")
      ->delimiter(',')->capture_default_str();
  sub.add_option("--amp", m.amp, "Autocast: off, bf16 or fp16")->capture_default_str();
  sub.add_option("--micro-batch-mb", m.micro_batch_mb, "Restored input per backward micro-batch, MiB (L3.1, L4, L5)")
      ->check(aq::cli::Positive)
      ->capture_default_str();
  sub.add_option("--channels-last", m.channels_last, "auto (on CUDA), True or False")->capture_default_str();
}

// A subcommand over a model: the common options, the model's, and batch size
// when the subcommand has one.
CLI::App* add_model_subcommand(CLI::App& app, const std::string& name, const std::string& what,
                               aq::cli::Common& common, ModelArgs& m, int64_t* batch_size = nullptr) {
  auto* sub = app.add_subcommand(name, what);
  aq::cli::add_common(*sub, common);
  add_model_options(*sub, m);
  if (batch_size)
    sub->add_option("-b,--batch-size", *batch_size, "Batch size")->check(aq::cli::Positive)->capture_default_str();
  return sub;
}

// A TSV written beside stdout (--profile, --ops): FILE, or stderr for "-",
// its header first; finish() reports whatever did not reach the file.
class SideTsv {
 public:
  SideTsv(const std::string& path, const char* header) : path_(path) {
    if (path.empty()) return;
    f_ = path == "-" ? stderr : std::fopen(path.c_str(), "w");
    if (!f_) throw std::runtime_error("cannot write " + path + ": " + std::strerror(errno));
    std::fputs(header, f_);
  }
  ~SideTsv() {
    if (f_ && f_ != stderr) std::fclose(f_);
  }
  SideTsv(const SideTsv&) = delete;
  SideTsv& operator=(const SideTsv&) = delete;
  std::FILE* get() const { return f_; }
  void finish() {
    std::FILE* f = f_;
    f_ = nullptr;
    if (f && f != stderr && std::fclose(f) != 0)
      throw std::runtime_error("cannot write " + path_ + ": " + std::strerror(errno));
  }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// The exact model's configuration first (the baseline of every ratio), then
// each level's.
std::vector<std::pair<std::string, aq::QuantConfig>> exact_and_levels(const ModelArgs& m) {
  std::vector<std::pair<std::string, aq::QuantConfig>> configs;
  aq::QuantConfig exact;
  exact.scope = aq::Scope::kNone;
  configs.emplace_back("exact", exact);
  for (const auto& l : m.levels) {
    if (l == "exact") continue;
    const auto level = aq::parse_level(l);
    auto c = aq::QuantConfig::for_level(level);
    c.micro_batch_bytes = m.micro_batch_mb << 20;
    configs.emplace_back(aq::to_string(level), c);
  }
  return configs;
}

// Runs f and says whether it fit in device memory: false when it ran out
// (LibTorch's error, or cuBLAS's and cuDNN's own allocation failures, which
// they report as errors of their own), with the error's first line logged.
// The device's cached blocks are given back either way.
bool fits_in_memory(const torch::Device& dev, const std::function<void()>& f) {
  bool ok = true;
  std::string why;
  try {
    f();
  } catch (const c10::OutOfMemoryError& e) {
    ok = false, why = e.what();
  } catch (const c10::Error& e) {
    why = e.what();
    if (why.find("ALLOC_FAILED") == std::string::npos) throw;
    ok = false;
  }
  if (!ok) aq::log().debug("out of memory: {}", why.substr(0, why.find('\n')));
#if AQ_WITH_CUDA
  if (dev.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  return ok;
}

struct MemoryArgs : ModelArgs {
  int64_t batch_size = 32;
  std::string ops;  // per-operation memory TSV (-: stderr)
  MemoryArgs() { levels = {"L1", "L2", "L3", "L3.1"}; }
};

// Activation and peak memory of one training step: the exact model, then
// each level, with their ratios to exact measured in the same process.
int bench_memory(const MemoryArgs& a, const torch::Device& dev) {
  const auto amp = aq::train::parse_amp(a.amp);
  const auto configs = exact_and_levels(a);
  const bool cl = channels_last_on(a, dev);
  auto x = torch::randn({a.batch_size, a.channels, a.image_size, a.image_size});
  if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  auto y = torch::randint(a.classes, {a.batch_size}, torch::kLong);
  SideTsv ops(a.ops, "level\tseq\tpass\top\tbefore_MB\tpeak_MB\tafter_MB\n");
  std::FILE* ops_out = ops.get();
  std::printf("device\tarch\tbatch\timage\tamp\tlevel\tact_MB\tpeak_MB\taq_saved_MB\tact_ratio\tpeak_ratio\tstep_ms\n");
  double exact_act = 0, exact_peak = 0;
  const double MB = 1048576.0;
  for (const auto& [name, cfg] : configs) {
    // The line's first columns, printed with its figures once the step ran
    // (logs on stderr may come in between).
    const std::string what =
        fmt::format("{}\t{}\t{}\t{}\t{}\t{}", dev.str(), a.arch, a.batch_size, a.image_size, a.amp, name);
    aq::train::StepMemory m;
    if (!fits_in_memory(dev, [&] {
          auto model = bench_model(a, cfg, dev, cl);
          m = aq::train::measure_step(*model, x, y, dev, amp, ops_out != nullptr);
        })) {
      // The levels are still measured: a batch too large for the exact
      // model is what they are for.
      aq::log().warn("{}: batch {} does not fit in device memory", name, a.batch_size);
      std::printf("%s\tNA\tNA\tNA\tNA\tNA\tNA\n", what.c_str());
      std::fflush(stdout);
      continue;
    }
    if (name == "exact") exact_act = m.activations, exact_peak = m.peak;
    if (ops_out) {
      size_t top = 0;
      for (size_t i = 0; i < m.ops.size(); ++i) {
        const auto& op = m.ops[i];
        std::fprintf(ops_out, "%s\t%zu\t%s\t%s\t%.2f\t%.2f\t%.2f\n", name.c_str(), i,
                     op.backward ? "backward" : "forward", op.name.c_str(), op.before / MB, op.peak / MB,
                     op.after / MB);
        if (op.peak > m.ops[top].peak) top = i;
      }
      if (!m.ops.empty())
        aq::log().info("{}: the step's peak, {:.1f} MB, is in {} ({} #{}, {:.1f} MB allocated before it)", name,
                       m.ops[top].peak / MB, m.ops[top].name, m.ops[top].backward ? "backward" : "forward", top,
                       m.ops[top].before / MB);
    }
    const auto ratio = [](double exact, double v) {
      return exact > 0 ? fmt::format("{:.2f}", exact / std::max<double>(1, v)) : std::string("NA");
    };
    std::printf("%s\t%.2f\t%.2f\t%.2f\t%s\t%s\t%.1f\n", what.c_str(), m.activations / MB, m.peak / MB,
                m.aq_saved / MB, ratio(exact_act, m.activations).c_str(), ratio(exact_peak, m.peak).c_str(),
                m.seconds * 1e3);
    std::fflush(stdout);
  }
  ops.finish();
  return aq::cli::kOk;
}

struct StepArgs : ModelArgs {
  int64_t batch_size = 64;
  int steps = 0;   // 0: 20 on CUDA, 3 on CPU
  int warmup = 3;
  int profile_steps = 3;
  std::string profile, trace;
  StepArgs() { levels = {"L3"}; }
};

// Counts the synchronising CUDA calls LibTorch makes between start() and
// stop(): its sync debug mode reports each as a warning, which this handler
// counts instead of printing.  Warnings from autograd's device threads are
// replayed on the thread that called backward(), so backward is counted too.
class SyncCounter : public c10::WarningHandler {
 public:
  explicit SyncCounter(bool cuda) : cuda_(cuda), prev_(c10::WarningUtils::get_warning_handler()) {
    if (cuda_) c10::WarningUtils::set_warning_handler(this);
  }
  ~SyncCounter() override {
    stop();
    if (cuda_) c10::WarningUtils::set_warning_handler(prev_);
  }
  SyncCounter(const SyncCounter&) = delete;
  SyncCounter& operator=(const SyncCounter&) = delete;
  void start() {
#if AQ_WITH_CUDA
    if (cuda_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
#endif
  }
  void stop() {
#if AQ_WITH_CUDA
    if (cuda_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
#endif
  }
  void process(const c10::Warning& w) override {
    if (w.msg().find("synchroniz") != std::string::npos) ++count;
    else prev_->process(w);
  }
  int64_t count = 0;

 private:
  bool cuda_;
  c10::WarningHandler* prev_;
};

// Where a step's device time goes, from LibTorch's (Kineto) profiler: each
// device activity (a CUDA kernel, copy or fill; on the CPU, each outermost
// operator) is charged to the innermost aq:: scope around the call that
// launched it (aq::compress, aq::decompress, aq::allocate, aq::statistics,
// aq::mask, ...) or to "torch" (LibTorch's own layers, loss and optimizer).
struct Breakdown {
  struct Item {
    double ms = 0;
    int64_t calls = 0;
  };
  bool ok = false;
  int steps = 0;
  double device_ms = 0;                 // all device activity
  std::map<std::string, Item> scopes;   // device time per scope
  std::map<std::string, Item> kernels;  // device time per kernel name
  std::map<std::string, double> host;   // host time inside outermost aq:: scopes
  double scope_ms(const std::string& s) const {
    auto it = scopes.find(s);
    return it == scopes.end() ? 0.0 : it->second.ms;
  }
};

Breakdown profile_steps(const torch::Device& dev, int steps, const std::function<void()>& step,
                        const std::string& trace_path) {
  namespace prof = torch::profiler::impl;
  Breakdown b;
  if (steps <= 0) return b;
  const prof::ProfilerConfig cfg(prof::ProfilerState::KINETO);
  std::set<prof::ActivityType> acts = {prof::ActivityType::CPU};
  if (dev.is_cuda()) acts.insert(prof::ActivityType::CUDA);
  // Without a CUDA driver LibTorch's profiler library logs an ERROR line that
  // its GPU count failed, though only CPU activity was asked for: on such
  // machines its log stays off unless the user set its level.
  if (!torch::cuda::is_available()) setenv("KINETO_LOG_LEVEL", "5", 0);
  std::unique_ptr<torch::autograd::profiler::ProfilerResult> r;
  try {
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
    for (int i = 0; i < steps; ++i) step();
    sync(dev);
    r = torch::autograd::profiler::disableProfiler();
  } catch (const c10::Error& e) {
    aq::log().warn("profiler unavailable ({}); no breakdown", e.what_without_backtrace());
    return b;
  }
  if (!trace_path.empty()) r->save(trace_path);
  b.ok = true;
  b.steps = steps;
  const bool cuda = dev.is_cuda();
  // Host-side events: aq:: scopes, operators, and (on CUDA) the runtime
  // calls that launch device work, keyed by their correlation id.
  struct Span {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Span> scopes, ops;
  std::map<uint64_t, uint64_t> launch_time;  // correlation id -> host time of the launch
  std::vector<const torch::autograd::profiler::KinetoEvent*> device;
  for (const auto& e : r->events()) {
    if (e.deviceType() == c10::DeviceType::CUDA) {
      device.push_back(&e);
      continue;
    }
    const std::string name = e.name();
    if (name.rfind("cuda", 0) == 0 || name.rfind("cu", 0) == 0) {
      launch_time[e.correlationId()] = e.startNs();
    } else if (name.rfind("aq::", 0) == 0) {
      scopes.push_back({e.startNs(), e.endNs(), name});
    } else {
      ops.push_back({e.startNs(), e.endNs(), name});
    }
  }
  const double per_step = 1e6 * steps;  // ns -> ms per step
  // Innermost aq:: scope open at host time t (autograd's threads never run
  // aq code at the same time as the thread that called backward).
  auto scope_at = [&](uint64_t t) {
    const Span* best = nullptr;
    for (const auto& s : scopes)
      if (s.begin <= t && t <= s.end && (!best || s.begin >= best->begin)) best = &s;
    return best ? best->name : std::string("torch");
  };
  auto charge = [&](const std::string& name, const std::string& scope, double ms) {
    auto& k = b.kernels[name.size() > 90 ? name.substr(0, 90) : name];
    k.ms += ms;
    k.calls += 1;
    auto& s = b.scopes[scope];
    s.ms += ms;
    s.calls += 1;
    b.device_ms += ms;
  };
  // Outermost spans of a list: what took the host's time (operators that
  // intra-op worker threads run inside another are nested in its time).
  auto outermost = [](std::vector<Span> v) {
    std::sort(v.begin(), v.end(), [](const Span& x, const Span& y) {
      return x.begin != y.begin ? x.begin < y.begin : x.end > y.end;
    });
    std::vector<Span> out;
    for (const auto& s : v)
      if (out.empty() || s.begin >= out.back().end) out.push_back(s);
    return out;
  };
  for (const auto& s : outermost(scopes)) b.host[s.name] += static_cast<double>(s.end - s.begin) / per_step;
  if (cuda) {
    for (const auto* e : device) {
      auto it = launch_time.find(e->correlationId());
      if (it == launch_time.end()) it = launch_time.find(e->linkedCorrelationId());
      charge(e->name(), it == launch_time.end() ? "unattributed" : scope_at(it->second),
             static_cast<double>(e->durationNs()) / per_step);
    }
  } else {
    std::vector<Span> all = ops;
    all.insert(all.end(), scopes.begin(), scopes.end());
    for (const auto& s : outermost(all))
      charge(s.name, s.name.rfind("aq::", 0) == 0 ? s.name : scope_at(s.begin),
             static_cast<double>(s.end - s.begin) / per_step);
  }
  return b;
}

// The breakdown as TSV rows: scopes, then the `top` largest kernels.
void write_breakdown(std::FILE* f, const std::string& level, double step_ms, const Breakdown& b, size_t top = 25) {
  auto row = [&](const char* kind, const std::string& name, const Breakdown::Item& it) {
    std::string n = name;
    std::replace(n.begin(), n.end(), '\t', ' ');
    std::fprintf(f, "%s\t%s\t%s\t%.2f\t%.3f\t%.4f\n", level.c_str(), kind, n.c_str(),
                 static_cast<double>(it.calls) / b.steps, it.ms, it.ms / step_ms);
  };
  row("all", "device", {b.device_ms, 0});
  for (const auto& [name, it] : b.scopes) row("scope", name, it);
  for (const auto& [name, ms] : b.host) row("host", name, {ms, 0});
  std::vector<std::pair<std::string, Breakdown::Item>> k(b.kernels.begin(), b.kernels.end());
  std::sort(k.begin(), k.end(), [](const auto& x, const auto& y) { return x.second.ms > y.second.ms; });
  for (size_t i = 0; i < k.size() && i < top; ++i) row("kernel", k[i].first, k[i].second);
}

// Training-step time and memory: the exact model, then each level, on one
// synthetic batch, as a user would run them (SGD with momentum, cuDNN
// autotuning and channels_last on CUDA, aq's per-layer reallocation after
// each step for adaptive levels), with ratios to exact from the same process.
int bench_step(const StepArgs& a, const torch::Device& dev) {
  const auto amp = aq::train::parse_amp(a.amp);
  const bool cl = channels_last_on(a, dev);
  const int steps = a.steps ? a.steps : (dev.is_cuda() ? 20 : 3);
  aq::train::install_cpu_memory_counter();
  if (dev.is_cuda()) at::globalContext().setBenchmarkCuDNN(true);
  const auto configs = exact_and_levels(a);
  auto x = torch::randn({a.batch_size, a.channels, a.image_size, a.image_size}, torch::TensorOptions().device(dev));
  if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  auto y = torch::randint(a.classes, {a.batch_size}, torch::TensorOptions().dtype(torch::kLong).device(dev));
  const auto idx = torch::arange(a.batch_size, torch::kLong);
  SideTsv prof(a.profile, "level\tkind\tname\tcalls_per_step\tms_per_step\tshare_of_step\n");
  std::FILE* prof_out = prof.get();
  std::printf("device\tarch\tbatch\timage\tamp\tlevel\tmedian_ms\timg_per_s\tact_MB\tpeak_MB\tspeed_ratio\tact_ratio"
              "\tpeak_ratio\tsyncs_per_step\tdevice_busy\tcompress_ms\tdecompress_ms\talloc_ms\talloc_share\n");
  SyncCounter syncs(dev.is_cuda());
  double exact_ips = 0, exact_act = 0, exact_peak = 0;
  const double MB = 1048576.0;
  for (const auto& [name, cfg] : configs) {
    auto model = bench_model(a, cfg, dev, cl);
    aq::train::SGD opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
    const bool per_layer = aq::adaptive(cfg) && cfg.perlayer;
    int64_t act = 0;
    auto step = [&](bool measure) {
      opt.zero_grad();
      aq::set_batch_indices(idx);
      const int64_t before = aq::train::memory(dev).allocated;
      torch::Tensor logits;
      {
        aq::train::AutocastScope ac(dev, amp);
        logits = model->forward(x);
      }
      auto loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y);
      if (measure) act = aq::train::memory(dev).allocated - before;
      loss.backward();
      opt.step();
      if (per_layer) aq::adapt_layers(*model, /*defer=*/true);
    };
    for (int i = 0; i < a.warmup; ++i) step(false);
    sync(dev);
    const int64_t base = aq::train::memory(dev).allocated;
    aq::train::reset_peak(dev);
    std::vector<double> t;
    syncs.count = 0;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      syncs.start();
      step(i == 0);
      syncs.stop();
      sync(dev);
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double peak = static_cast<double>(aq::train::memory(dev).peak - base);
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    const double med = t[t.size() / 2], ips = a.batch_size / med;
    if (name == "exact") exact_ips = ips, exact_act = act, exact_peak = peak;
    const double sync_rate = dev.is_cuda() ? static_cast<double>(syncs.count) / steps : 0.0;
    const auto br = profile_steps(dev, a.profile_steps, [&] { step(false); },
                                  a.trace.empty() ? "" : a.trace + "/" + name + ".json");
    auto ms = [&](double v) { return br.ok ? fmt::format("{:.3f}", v) : std::string("NA"); };
    if (prof_out && br.ok) write_breakdown(prof_out, name, med * 1e3, br);
    std::printf("%s\t%s\t%lld\t%lld\t%s\t%s\t%.2f\t%.1f\t%.2f\t%.2f\t%.3f\t%.2f\t%.2f\t%.1f\t%s\t%s\t%s\t%s\t%s\n",
                dev.str().c_str(), a.arch.c_str(), static_cast<long long>(a.batch_size),
                static_cast<long long>(a.image_size), a.amp.c_str(), name.c_str(), med * 1e3, ips, act / MB, peak / MB,
                ips / exact_ips, exact_act / std::max<double>(1, act), exact_peak / std::max<double>(1, peak), sync_rate,
                br.ok ? fmt::format("{:.3f}", br.device_ms / (med * 1e3)).c_str() : "NA",
                ms(br.scope_ms("aq::compress")).c_str(), ms(br.scope_ms("aq::decompress")).c_str(),
                ms(br.scope_ms("aq::allocate")).c_str(),
                br.ok ? fmt::format("{:.4f}", br.scope_ms("aq::allocate") / (med * 1e3)).c_str() : "NA");
    std::fflush(stdout);
  }
  aq::set_batch_indices(torch::Tensor());
  prof.finish();
  return aq::cli::kOk;
}

struct MaxBatchArgs : ModelArgs {
  int64_t start = 16, limit_mb = 0, resolution = 1;
  int steps = 3;  // adaptive levels: the third runs on the budgets the first set (they apply a step late)
  MaxBatchArgs() { levels = {"L3", "L5"}; }
};

// Largest batch whose training steps (forward, backward, SGD step) fit: the
// exact model and each level; doubling from --start, then bisection.  Each
// trial starts from a fresh model and runs --steps steps, so that what it
// finds does not depend on the trials before it (adaptive levels move bits
// between layers after every step, which moves the peak).  On CUDA "fits"
// means no out-of-memory error (and, with --limit-mb, a peak within the
// limit); on the CPU the limit is required.
int bench_max_batch(const MaxBatchArgs& a, const torch::Device& dev) {
  if (!dev.is_cuda() && a.limit_mb <= 0)
    throw std::invalid_argument("max-batch on the CPU needs --limit-mb (host memory is no device budget)");
  aq::train::install_cpu_memory_counter();
  const auto amp = aq::train::parse_amp(a.amp);
  const auto configs = exact_and_levels(a);
  const bool cl = channels_last_on(a, dev);
  std::printf("device\tarch\timage\tamp\tlevel\tmax_batch\tratio\ttrials\n");
  // The device's allocator must exist before the first trial reads its
  // statistics (a trial builds its model only after).
  if (dev.is_cuda()) torch::empty({1}, torch::TensorOptions().device(dev));
  int64_t exact_max = 0;
  for (const auto& [name, cfg] : configs) {
    const bool per_layer = aq::adaptive(cfg) && cfg.perlayer;
    int trials = 0;
    auto fits = [&](int64_t b) {
      ++trials;
      const int64_t base = aq::train::memory(dev).allocated;
      aq::train::reset_peak(dev);
      bool ok = fits_in_memory(dev, [&] {
        auto model = bench_model(a, cfg, dev, cl);
        aq::train::SGD opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9));
        auto x = torch::randn({b, a.channels, a.image_size, a.image_size}, torch::TensorOptions().device(dev));
        if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        auto y = torch::randint(a.classes, {b}, torch::TensorOptions().dtype(torch::kLong).device(dev));
        aq::set_batch_indices(torch::arange(b, torch::kLong));
        for (int i = 0; i < a.steps; ++i) {
          opt.zero_grad();
          torch::Tensor logits;
          {
            aq::train::AutocastScope ac(dev, amp);
            logits = model->forward(x);
          }
          torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y).backward();
          opt.step();
          if (per_layer) aq::adapt_layers(*model, /*defer=*/true);
          sync(dev);
        }
      });
      if (ok && a.limit_mb > 0) ok = aq::train::memory(dev).peak - base <= a.limit_mb * 1048576;
      aq::set_batch_indices(torch::Tensor());
      aq::log().debug("{} batch {}: {}", name, b, ok ? "fits" : "does not fit");
      return ok;
    };
    // One small step first, so that cuBLAS and cuDNN create their handles
    // and workspaces while memory is free (created inside a trial that
    // nearly fills memory, they fail and would end the search).  Whether
    // it fits is for the search to find out.
    fits(2);
    trials = 0;
    int64_t lo = 0, hi = 0;
    for (int64_t b = std::max<int64_t>(1, a.start); b <= (int64_t(1) << 22); b *= 2) {
      if (fits(b)) {
        lo = b;
      } else {
        hi = b;
        break;
      }
    }
    if (lo == 0 && hi > 1) {  // even --start failed: search below it
      for (int64_t b = hi / 2; b >= 1; b /= 2)
        if (fits(b)) {
          lo = b;
          break;
        } else {
          hi = b;
        }
    }
    while (lo > 0 && hi - lo > a.resolution) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (fits(mid)) lo = mid;
      else hi = mid;
    }
    if (name == "exact") exact_max = lo;
    std::printf("%s\t%s\t%lld\t%s\t%s\t%lld\t%.2f\t%d\n", dev.str().c_str(), a.arch.c_str(),
                static_cast<long long>(a.image_size), a.amp.c_str(), name.c_str(), static_cast<long long>(lo),
                exact_max ? double(lo) / exact_max : 0.0, trials);
    std::fflush(stdout);
  }
  return aq::cli::kOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"aq-bench: measure aq's compression kernels and training steps; TSV on stdout", "aq-bench"};
  app.set_version_flag("--version", AQ_VERSION_STRING);
  app.require_subcommand(1);
  aq::cli::Common common;
  KernelArgs ka;
  auto* k = app.add_subcommand("kernels",
                               "Compress/decompress throughput against the device's copy bandwidth, same run");
  aq::cli::add_common(*k, common);
  k->add_option("--sizes", ka.sizes, "Input sizes in bytes (K, M, G suffixes)")->delimiter(',')->capture_default_str();
  k->add_option("--dtypes", ka.dtypes, "Input dtypes: fp32, bf16, fp16")->delimiter(',')->capture_default_str();
  k->add_option("--bits", ka.bits, "Bits per element, 1..8")->delimiter(',')->check(CLI::Range(1, 8))->capture_default_str();
  k->add_option("--group-size", ka.group_size, "Elements per quantization group (power of two, 32 .. 2^20)")->capture_default_str();
  k->add_option("--samples", ka.samples, "Samples (first dimension) of the input")->check(aq::cli::Positive)->capture_default_str();
  k->add_option("--reps", ka.reps, "Timed batches, median reported (0: 5 on CUDA, 3 on CPU)")->check(aq::cli::NonNegative);
  k->add_option("--inner", ka.inner, "Calls per timed batch (0: 10 on CUDA, 1 on CPU)")->check(aq::cli::NonNegative);
  MemoryArgs ma;
  auto* mem = add_model_subcommand(app, "memory", "Activation and peak memory of a training step: exact model and each level",
                                   common, ma, &ma.batch_size);
  mem->add_option("--ops", ma.ops,
                  "Write each operation's memory (before it, peak while it ran, after; forward and backward) as TSV to "
                  "FILE (-: stderr)");
  StepArgs sa;
  auto* st = add_model_subcommand(app, "step", "Training-step time and memory: exact model and each level, same process",
                                  common, sa, &sa.batch_size);
  st->add_option("--steps", sa.steps, "Timed steps, median reported (0: 20 on CUDA, 3 on CPU)")
      ->check(aq::cli::NonNegative);
  st->add_option("--warmup", sa.warmup, "Untimed steps first")->check(aq::cli::NonNegative)->capture_default_str();
  st->add_option("--profile-steps", sa.profile_steps,
                 "Steps run under the profiler after the timed ones, for the breakdown columns (0: none)")
      ->check(aq::cli::NonNegative)->capture_default_str();
  st->add_option("--profile", sa.profile, "Write the per-scope and per-kernel breakdown as TSV to FILE (-: stderr)");
  st->add_option("--trace", sa.trace, "Write each level's profiler trace (Chrome JSON) into this folder")
      ->check(CLI::ExistingDirectory);
  MaxBatchArgs mb;
  auto* mx = add_model_subcommand(app, "max-batch", "Largest batch whose training step fits: exact model and each level",
                                  common, mb);
  mx->add_option("--start", mb.start, "First batch tried (then doubled)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 22))
      ->capture_default_str();
  mx->add_option("--limit-mb", mb.limit_mb, "Also require the step's peak within this many MiB (required on the CPU)")
      ->check(aq::cli::NonNegative)->capture_default_str();
  mx->add_option("--steps", mb.steps,
                 "Training steps per trial, each trial from a fresh model; a batch fits when all of them do")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  mx->add_option("--resolution", mb.resolution,
                 "Stop bisecting once the largest batch that fits and the smallest that does not are this close")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 22))
      ->capture_default_str();
  return aq::cli::run(app, argc, argv, [&] {
    const auto dev = aq::cli::apply_common(common);
    if (k->parsed()) return bench_kernels(ka, dev);
    if (mem->parsed()) return bench_memory(ma, dev);
    if (st->parsed()) return bench_step(sa, dev);
    if (mx->parsed()) return bench_max_batch(mb, dev);
    return static_cast<int>(aq::cli::kUsage);
  });
}
