#include "aq/bench.h"

#include "aq/adaptive.h"
#include "aq/compress.h"
#include "aq/log.h"
#include "aq/loss.h"
#include "aq/optim.h"
#include "aq_config.h"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>
#if AQ_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <set>
#include <stdexcept>

namespace aq::bench {

namespace {

void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

template <typename Row>
void emit(const Report<Row>& report, std::vector<Row>& rows, Row row) {
  if (report.row) report.row(row);
  rows.push_back(std::move(row));
}

template <typename Row>
void begin(const Report<Row>& report) {
  if (report.start) report.start();
}

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

// Median over `reps` batches of the mean seconds per call of f.
template <typename F>
double time_it(const c10::Device& d, int reps, int inner, F&& f) {
  f();  // warm-up (allocator, caches)
  sync(d);
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < inner; ++i) f();
    sync(d);
    t.push_back(since(t0) / inner);
  }
  return median(std::move(t));
}

void to_channels_last(torch::nn::Module& model) {
  torch::NoGradGuard g;
  for (auto& p : model.parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
}

// A random batch of `n` images on `device` with labels and their sample
// indices 0..n-1 (CPU, as set_batch_indices takes them).
struct Batch {
  torch::Tensor images, labels, indices;
};
// Token models: random tokens [n, context] and next-token targets.
Batch random_batch(const ModelOptions& o, int64_t n, const c10::Device& device) {
  Batch b;
  if (train::takes_tokens(o.arch)) {
    const auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
    b.images = torch::randint(o.classes, {n, o.context}, opts);
    b.labels = torch::randint(o.classes, {n, o.context}, opts);
  } else {
    b.images = torch::randn({n, o.channels, o.image_size, o.image_size}, torch::TensorOptions().device(device));
    if (channels_last(o, device)) b.images = b.images.contiguous(torch::MemoryFormat::ChannelsLast);
    b.labels = torch::randint(o.classes, {n}, torch::TensorOptions().dtype(torch::kLong).device(device));
  }
  b.indices = torch::arange(n, torch::kLong);
  return b;
}

train::StepOptions step_options(const ModelOptions& o, const QuantConfig& config) {
  train::StepOptions s;
  s.amp = o.amp;
  s.quant = config;
  return s;
}

torch::optim::SGDOptions sgd_options() { return torch::optim::SGDOptions(0.01).momentum(0.9); }

}  // namespace

std::vector<KernelRow> bench_kernels(const KernelOptions& a, const c10::Device& dev, const Report<KernelRow>& report) {
  const int reps = a.reps ? a.reps : (dev.is_cuda() ? 5 : 3);
  const int inner = a.inner ? a.inner : (dev.is_cuda() ? 10 : 1);
  CompressOptions o;
  o.group_size = a.group_size;
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
      if (c.n < 1 || c.numel % c.n)
        throw std::invalid_argument("size " + size + " does not split into " + std::to_string(a.samples) +
                                    " samples");
      cases.push_back(c);
    }
  begin(report);
  std::vector<KernelRow> rows;
  for (const Case& c : cases) {
    log().info("{} {} on {}: {} x {}", c.size, c.dts, dev.str(), c.n, c.numel / c.n);
    auto x = torch::randn({c.n, c.numel / c.n}, torch::TensorOptions().dtype(c.dt).device(dev));
    auto y = torch::empty_like(x);
    const double tc = time_it(dev, reps, inner, [&] { y.copy_(x); });
    const double copy_rate = 2.0 * c.bytes / tc;
    y.reset();
    for (int b : a.bits) {
      Packed p = quantize(x, b, o);
      const double tq = time_it(dev, reps, inner, [&] { p = quantize(x, b, o); });
      torch::Tensor back;
      const double td = time_it(dev, reps, inner, [&] { back = dequantize(p); });
      for (auto [op, t] : {std::pair{"compress", tq}, std::pair{"decompress", td}})
        emit(report, rows, KernelRow{c.dts, c.bytes, b, op, t, c.bytes / t, copy_rate, p.nbytes()});
    }
  }
  return rows;
}

bool channels_last(const ModelOptions& o, const c10::Device& device) {
  if (train::takes_tokens(o.arch)) return false;  // no images
  return o.channels_last.value_or(device.is_cuda());
}

std::vector<NamedConfig> exact_and_levels(const ModelOptions& o) {
  std::vector<NamedConfig> configs;
  QuantConfig exact;
  exact.scope = Scope::kNone;
  configs.push_back({"exact", exact});
  for (const auto& l : o.levels) {
    if (l == "exact") continue;
    if (l == "ckpt") {
      configs.push_back({"ckpt", exact, /*recompute_blocks=*/true});
      continue;
    }
    Level level;
    try {
      level = parse_level(l);
    } catch (const std::invalid_argument&) {
      throw std::invalid_argument("unknown level '" + l + "' in --levels (use L0, L1, L2, L3, L3.1, L4, L5 or ckpt)");
    }
    auto c = QuantConfig::for_level(level);
    c.micro_batch_bytes = o.micro_batch_bytes;
    if (o.attention_bits) c.attention_bits = *o.attention_bits;
    if (o.cabits) c.cabits = *o.cabits, c.cabits_given = true;
    c = c.for_model(models::is_transformer(o.arch));
    c.validate();
    configs.push_back({to_string(level), c});
  }
  return configs;
}

namespace {

models::ModelOptions model_options(const ModelOptions& o) {
  models::ModelOptions mo;
  mo.image_height = mo.image_width = o.image_size;
  if (train::takes_tokens(o.arch)) mo.context = o.context;
  mo.layers = o.layers, mo.width = o.width, mo.heads = o.heads, mo.dropout = o.dropout;
  mo.class_token = o.class_token;
  return mo;
}

// The model's options are checked before the table's header goes out, so
// that a model that cannot be built leaves no header behind its error.
template <typename Row>
void begin(const ModelOptions& o, const Report<Row>& report) {
  models::check_options(o.arch, model_options(o));
  begin(report);
}

}  // namespace

models::ModelPtr bench_model(const ModelOptions& o, const NamedConfig& config, const c10::Device& device) {
  torch::manual_seed(0);
  models::ModelOptions mo = model_options(o);
  mo.recompute_blocks = config.recompute_blocks;
  auto model = models::build(o.arch, o.channels, o.classes, mo, config.config);
  model->to(device);
  if (channels_last(o, device)) to_channels_last(*model);
  model->train();
  return model;
}

bool fits_in_memory(const c10::Device& device, const std::function<void()>& f) {
  bool ok = true;
  std::string why;
  try {
    f();
  } catch (const c10::Error& e) {
    if (!is_out_of_memory(e)) throw;
    ok = false, why = error_line(e);
  }
  if (!ok) log().debug("out of memory: {}", why);
#if AQ_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#else
  (void)device;
#endif
  return ok;
}

StepMemory measure_step(models::Model& model, const torch::Tensor& images, const torch::Tensor& labels,
                        const torch::Tensor& indices, const c10::Device& device, train::StepOptions options,
                        bool trace_ops) {
  install_cpu_memory_counter();
  model.train();
  // On the device before the baseline: the batch is not the step's memory.
  auto x = images.to(device), y = labels.to(device);
  options.count_saved = true;
  train::Step step(model, device, std::move(options));
  int64_t base = 0;
  auto run = [&](StepMemory* m) {
    model.zero_grad();
    sync(device);
    const auto t0 = std::chrono::steady_clock::now();
    base = memory(device).allocated;
    reset_peak(device);
    const auto r = step(x, y, indices);
    sync(device);
    if (m) {
      m->activations = r.activations;
      m->aq_saved = r.aq_saved;
      m->peak = memory(device).peak - base;
      m->seconds = since(t0);
    }
  };
  run(nullptr);
  StepMemory m;
  std::optional<OpMemoryTrace> trace;
  if (trace_ops) trace.emplace(device);
  run(&m);
  if (trace) {
    // The trace restarts the peak at each operation: the step's is theirs.
    m.ops = trace->ops();
    for (auto& op : m.ops) {
      op.before -= base, op.peak -= base, op.after -= base;
      m.peak = std::max(m.peak, op.peak);
    }
  }
  return m;
}

std::vector<MemoryRow> bench_memory(const MemoryOptions& a, const c10::Device& dev, const Report<MemoryRow>& report) {
  const auto configs = exact_and_levels(a);
  // On the host: measure_step moves it, after the model is built, so that a
  // batch too large for the device fails inside fits_in_memory.
  const auto host = random_batch(a, a.batch_size, torch::kCPU);
  auto x = host.images;
  if (channels_last(a, dev)) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
  const auto y = host.labels, idx = host.indices;
  begin(a, report);
  std::vector<MemoryRow> rows;
  double exact_act = 0, exact_peak = 0;
  for (const auto& c : configs) {
    const std::string& name = c.name;
    MemoryRow row;
    row.level = name;
    row.fits = fits_in_memory(dev, [&] {
      auto model = bench_model(a, c, dev);
      row.memory = measure_step(*model, x, y, idx, dev, step_options(a, c.config), a.trace_ops);
    });
    set_batch_indices(torch::Tensor());
    if (!row.fits) {
      log().warn("{}: batch {} does not fit in device memory", name, a.batch_size);
      row.memory = {};
      emit(report, rows, std::move(row));
      continue;
    }
    const auto& m = row.memory;
    if (name == "exact") exact_act = m.activations, exact_peak = m.peak;
    const auto ratio = [](double exact, double v) -> std::optional<double> {
      if (exact > 0) return exact / std::max<double>(1, v);
      return std::nullopt;
    };
    row.act_ratio = ratio(exact_act, m.activations);
    row.peak_ratio = ratio(exact_peak, m.peak);
    emit(report, rows, std::move(row));
  }
  return rows;
}

SyncCounter::SyncCounter(bool cuda) : cuda_(cuda), prev_(c10::WarningUtils::get_warning_handler()) {
  if (cuda_) c10::WarningUtils::set_warning_handler(this);
}

SyncCounter::~SyncCounter() {
  stop();
  if (cuda_) c10::WarningUtils::set_warning_handler(prev_);
}

void SyncCounter::start() {
#if AQ_WITH_CUDA
  if (cuda_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
#endif
}

void SyncCounter::stop() {
#if AQ_WITH_CUDA
  if (cuda_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
#endif
}

void SyncCounter::process(const c10::Warning& w) {
  if (w.msg().find("synchroniz") != std::string::npos) ++count;
  else prev_->process(w);
}

double Breakdown::scope_ms(const std::string& s) const {
  auto it = scopes.find(s);
  return it == scopes.end() ? 0.0 : it->second.ms;
}

Breakdown profile_steps(const c10::Device& dev, int steps, const std::function<void()>& step,
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
    log().warn("profiler unavailable ({}); no breakdown", e.what_without_backtrace());
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

std::vector<BreakdownRow> breakdown_rows(const Breakdown& b, double step_ms, size_t top) {
  std::vector<BreakdownRow> rows;
  auto row = [&](const char* kind, const std::string& name, const Breakdown::Item& it) {
    rows.push_back({kind, name, static_cast<double>(it.calls) / b.steps, it.ms, it.ms / step_ms});
  };
  row("all", "device", {b.device_ms, 0});
  for (const auto& [name, it] : b.scopes) row("scope", name, it);
  for (const auto& [name, ms] : b.host) row("host", name, {ms, 0});
  std::vector<std::pair<std::string, Breakdown::Item>> k(b.kernels.begin(), b.kernels.end());
  std::sort(k.begin(), k.end(), [](const auto& x, const auto& y) { return x.second.ms > y.second.ms; });
  for (size_t i = 0; i < k.size() && i < top; ++i) row("kernel", k[i].first, k[i].second);
  return rows;
}

std::vector<StepRow> bench_step(const StepBenchOptions& a, const c10::Device& dev, const Report<StepRow>& report) {
  const int steps = a.steps ? a.steps : (dev.is_cuda() ? 20 : 3);
  std::vector<bool> graph_modes;
  if (a.cuda_graphs == "both")
    graph_modes = dev.is_cuda() ? std::vector<bool>{false, true} : std::vector<bool>{false};
  else if (a.cuda_graphs == "off")
    graph_modes = {false};
  else if (a.cuda_graphs == "on")
    graph_modes = {true};
  else
    throw std::invalid_argument("--cuda-graphs must be both, off or on, not '" + a.cuda_graphs + "'");
  if (graph_modes.back() && !dev.is_cuda()) throw std::invalid_argument("--cuda-graphs on needs a CUDA device");
  install_cpu_memory_counter();
  if (dev.is_cuda()) at::globalContext().setBenchmarkCuDNN(true);
  const auto configs = exact_and_levels(a);
  const auto batch = random_batch(a, a.batch_size, dev);
  begin(a, report);
  std::vector<StepRow> rows;
  SyncCounter syncs(dev.is_cuda());
  double exact_ips = 0, exact_act = 0, exact_peak = 0;
  for (const auto& c : configs) {
    const std::string& name = c.name;
    for (const bool graph : graph_modes) {
      auto model = bench_model(a, c, dev);
      train::SGD opt(model->parameters(), sgd_options());
      auto so = step_options(a, c.config);
      so.cuda_graphs = graph;
      so.graph_refresh = a.graph_refresh;
      so.index_bound = a.batch_size;
      train::Step step(*model, dev, so);
      StepRow row;
      row.level = name;
      auto run = [&] { return step(batch.images, batch.labels, batch.indices, &opt); };
      // A graph's warm-up, and the step that captures it (timed apart),
      // come before the timed steps.
      const int64_t warmup = graph ? std::max<int64_t>(a.warmup, so.graph_warmup) : a.warmup;
      for (int64_t i = 0; i < warmup; ++i) run();
      sync(dev);
      // A graph allocates its working memory once, in its capture: the
      // peak counts from before it.
      const int64_t base = memory(dev).allocated;
      reset_peak(dev);
      if (graph) {
        const auto t0 = std::chrono::steady_clock::now();
        run();
        sync(dev);
        row.capture_ms = since(t0) * 1e3;
        row.graph = step.captures() > 0 && step.eager_reason().empty() ? "on" : "fallback";
      }
      std::vector<double> t;
      syncs.count = 0;
      for (int i = 0; i < steps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        syncs.start();
        const auto r = run();
        syncs.stop();
        if (i == 0) row.activations = r.activations;
        sync(dev);
        t.push_back(since(t0));
      }
      row.peak = static_cast<double>(memory(dev).peak - base);
      row.seconds = median(std::move(t));
      row.images_per_s = a.batch_size / row.seconds;
      if (name == "exact" && graph == graph_modes.front()) exact_ips = row.images_per_s, exact_act = row.activations, exact_peak = row.peak;
      row.speed_ratio = row.images_per_s / exact_ips;
      row.act_ratio = exact_act / std::max<double>(1, row.activations);
      row.peak_ratio = exact_peak / std::max<double>(1, row.peak);
      row.syncs_per_step = dev.is_cuda() ? static_cast<double>(syncs.count) / steps : 0.0;
      row.breakdown = profile_steps(dev, a.profile_steps, [&] { run(); },
                                    a.trace_dir.empty() ? ""
                                                        : a.trace_dir + "/" + name + (graph ? "-graph" : "") + ".json");
      emit(report, rows, std::move(row));
    }
  }
  set_batch_indices(torch::Tensor());
  return rows;
}

std::vector<MaxBatchRow> bench_max_batch(const MaxBatchOptions& a, const c10::Device& dev,
                                         const Report<MaxBatchRow>& report) {
  if (!dev.is_cuda() && a.limit_bytes <= 0)
    throw std::invalid_argument("max-batch on the CPU needs --limit-mb (host memory is no device budget)");
  install_cpu_memory_counter();
  const auto configs = exact_and_levels(a);
  begin(a, report);
  // The device's allocator must exist before the first trial reads its
  // statistics (a trial builds its model only after).
  if (dev.is_cuda()) torch::empty({1}, torch::TensorOptions().device(dev));
  std::vector<MaxBatchRow> rows;
  int64_t exact_max = 0;
  for (const auto& c : configs) {
    const std::string& name = c.name;
    int trials = 0;
    auto fits = [&](int64_t b) {
      ++trials;
      const int64_t base = memory(dev).allocated;
      reset_peak(dev);
      bool ok = fits_in_memory(dev, [&] {
        auto model = bench_model(a, c, dev);
        train::SGD opt(model->parameters(), sgd_options());
        train::Step step(*model, dev, step_options(a, c.config));
        const auto batch = random_batch(a, b, dev);
        for (int i = 0; i < a.steps; ++i) {
          step(batch.images, batch.labels, batch.indices, &opt);
          sync(dev);
        }
      });
      if (ok && a.limit_bytes > 0) ok = memory(dev).peak - base <= a.limit_bytes;
      set_batch_indices(torch::Tensor());
      log().debug("{} batch {}: {}", name, b, ok ? "fits" : "does not fit");
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
    if (lo == 0 && hi > 1) {  // even the start failed: search below it
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
    emit(report, rows, MaxBatchRow{name, lo, exact_max ? double(lo) / exact_max : 0.0, trials});
  }
  return rows;
}

}  // namespace aq::bench
