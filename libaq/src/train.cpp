#include "aq/train.h"

#include "aq/adaptive.h"
#include "aq/log.h"
#include "aq/modules.h"
#include "aq/variance.h"
#include "aq_config.h"

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/AllocatorConfig.h>
#include <c10/core/CPUAllocator.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>
#include <torch/version.h>
#if AQ_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <cerrno>
#include <cstring>
#include <map>
#include <unordered_map>
#include <mutex>
#include <set>
#include <optional>
#include <random>
#include <stdexcept>
#include <string_view>
#include <tuple>

namespace aq::train {

// --- Names ---------------------------------------------------------------------

Amp parse_amp(const std::string& s) {
  if (s == "off" || s == "fp32" || s == "none") return Amp::kOff;
  if (s == "bf16" || s == "bfloat16") return Amp::kBFloat16;
  if (s == "fp16" || s == "float16") return Amp::kFloat16;
  throw std::invalid_argument("--amp must be off, bf16 or fp16, not '" + s + "'");
}
std::string to_string(Amp a) { return a == Amp::kOff ? "off" : a == Amp::kBFloat16 ? "bf16" : "fp16"; }

Schedule parse_schedule(const std::string& s) {
  if (s == "onecycle" || s == "one-cycle") return Schedule::kOneCycle;
  if (s == "cosine") return Schedule::kCosine;
  if (s == "step") return Schedule::kStep;
  if (s == "constant") return Schedule::kConstant;
  throw std::invalid_argument("--lr-schedule must be onecycle, cosine, step or constant, not '" + s + "'");
}
std::string to_string(Schedule s) {
  switch (s) {
    case Schedule::kOneCycle: return "onecycle";
    case Schedule::kCosine: return "cosine";
    case Schedule::kStep: return "step";
    case Schedule::kConstant: return "constant";
  }
  return "?";
}

// --- Memory --------------------------------------------------------------------

namespace {

// Wraps LibTorch's CPU allocator and counts the bytes it has handed out.
// Its pointers are their own contexts (as the wrapped allocator's are), so
// raw_allocate/raw_deallocate, which some kernels use, keep working.
class CountingCPUAllocator final : public c10::Allocator {
 public:
  explicit CountingCPUAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    void* data = base_->raw_allocate(n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      sizes_[data] = static_cast<int64_t>(n);
      allocated_ += static_cast<int64_t>(n);
      peak_ = std::max(peak_, allocated_);
    }
    return {data, data, &release, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  Memory stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {allocated_, peak_};
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = allocated_;
  }
  static CountingCPUAllocator* instance;

 private:
  static void release(void* p) {
    if (!p) return;
    auto* self = instance;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->sizes_.find(p);
      if (it != self->sizes_.end()) {
        self->allocated_ -= it->second;
        self->sizes_.erase(it);
      }
    }
    self->base_->raw_deallocate(p);
  }
  c10::Allocator* base_;
  std::mutex mu_;
  std::unordered_map<void*, int64_t> sizes_;
  int64_t allocated_ = 0, peak_ = 0;
};
CountingCPUAllocator* CountingCPUAllocator::instance = nullptr;

CountingCPUAllocator* cpu_counter = nullptr;

}  // namespace

void install_cpu_memory_counter() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::Allocator* base = c10::GetCPUAllocator();
    if (!base->raw_deleter()) {
      log().debug("LibTorch's CPU allocator has no raw deleter: CPU memory is not counted");
      return;
    }
    // Never freed: tensors allocated through it may outlive everything else.
    cpu_counter = CountingCPUAllocator::instance = new CountingCPUAllocator(base);
    c10::SetCPUAllocator(cpu_counter, /*priority=*/100);
  });
}

torch::Tensor SGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
    // The multi-tensor kernels take lists of one device and dtype.
    struct Lists {
      std::vector<at::Tensor> params, grads;
    };
    std::map<std::tuple<c10::DeviceType, c10::DeviceIndex, c10::ScalarType>, Lists> lists;
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      Lists& l = lists[{p.device().type(), p.device().index(), p.scalar_type()}];
      l.params.push_back(p);
      l.grads.push_back(p.grad());
    }
    for (auto& [key, l] : lists) {
      std::vector<at::Tensor> d = l.grads;
      if (o.weight_decay() != 0) d = at::_foreach_add(d, l.params, o.weight_decay());
      if (o.momentum() != 0) {
        // d_p, or the momentum buffer (new: a copy of d_p; else
        // buf = momentum buf + (1 - dampening) d_p), as torch::optim::SGD.
        std::vector<at::Tensor> bufs(d.size()), old_bufs, old_d;
        for (size_t i = 0; i < d.size(); ++i) {
          void* key_i = l.params[i].unsafeGetTensorImpl();
          auto it = state_.find(key_i);
          if (it == state_.end()) {
            bufs[i] = d[i].clone().detach();
            auto st = std::make_unique<torch::optim::SGDParamState>();
            st->momentum_buffer(bufs[i]);
            state_[key_i] = std::move(st);
          } else {
            bufs[i] = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
            old_bufs.push_back(bufs[i]);
            old_d.push_back(d[i]);
          }
        }
        if (!old_bufs.empty()) {
          at::_foreach_mul_(old_bufs, o.momentum());
          at::_foreach_add_(old_bufs, old_d, 1 - o.dampening());
        }
        d = o.nesterov() ? at::_foreach_add(d, bufs, o.momentum()) : bufs;
      }
      at::_foreach_add_(l.params, d, -o.lr());
    }
  }
  return loss;
}

Memory memory(const c10::Device& d) {
#if AQ_WITH_CUDA
  if (d.is_cuda()) {
    const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(d.has_index() ? d.index() : 0);
    const auto& b = s.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return {b.current, b.peak};
  }
#endif
  return cpu_counter && d.is_cpu() ? cpu_counter->stats() : Memory{};
}

void reset_peak(const c10::Device& d) {
#if AQ_WITH_CUDA
  if (d.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(d.has_index() ? d.index() : 0);
    return;
  }
#endif
  if (cpu_counter && d.is_cpu()) cpu_counter->reset_peak();
}

bool use_expandable_segments() {
  // The whole setting is parsed again (keys not in it go back to their
  // defaults), so the environment's own keys go with it.
  std::string conf;
  for (const char* name : {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) continue;
    if (std::string_view(v).find("expandable_segments") != std::string_view::npos)  // the environment decides
      return c10::CachingAllocator::AcceleratorAllocatorConfig::use_expandable_segments();
    if (conf.empty()) conf = v;
  }
  c10::CachingAllocator::setAllocatorSettings(conf.empty() ? "expandable_segments:True"
                                                           : conf + ",expandable_segments:True");
  return c10::CachingAllocator::AcceleratorAllocatorConfig::use_expandable_segments();
}

namespace {

// The active trace's state: the device it reads, the operations recorded,
// and per thread (forward runs on the caller's, backward on autograd's) how
// deep inside recorded functions the thread is.
struct OpTraceState {
  c10::Device device{c10::kCPU};
  std::mutex mu;
  std::vector<OpMemory> ops;
  bool backward = false;  // an autograd node has run: what follows is backward
};
OpTraceState* op_trace = nullptr;
thread_local int op_depth = 0;
thread_local int64_t op_before = 0;

std::unique_ptr<at::ObserverContext> op_enter(const at::RecordFunction&) {
  if (op_depth++ == 0 && op_trace) {
    op_before = memory(op_trace->device).allocated;
    reset_peak(op_trace->device);
  }
  return nullptr;
}
void op_leave(const at::RecordFunction& fn, at::ObserverContext*) {
  if (--op_depth != 0 || !op_trace) return;
  const Memory m = memory(op_trace->device);
  // The engine wraps each node in a function scope named after it; aq's own
  // nodes are named by their function's type.
  static constexpr std::string_view engine = "autograd::engine::evaluate_function: ",
                                     node = "torch::autograd::CppNode<", anon = "(anonymous namespace)::";
  std::string name = fn.name();
  const bool node_scope = name.rfind(engine, 0) == 0;
  if (node_scope) name.erase(0, engine.size());
  if (name.rfind(node, 0) == 0 && name.back() == '>') {
    name = name.substr(node.size(), name.size() - node.size() - 1);
    const auto at = name.find(anon);
    if (at != std::string::npos) name.erase(at, anon.size());
  }
  std::lock_guard<std::mutex> lock(op_trace->mu);
  if (node_scope || fn.scope() == at::RecordScope::BACKWARD_FUNCTION) op_trace->backward = true;
  op_trace->ops.push_back({name, op_trace->backward, op_before, m.peak, m.allocated});
}

}  // namespace

OpMemoryTrace::OpMemoryTrace(const c10::Device& device) {
  if (op_trace) throw std::logic_error("aq: one operation memory trace at a time");
  op_trace = new OpTraceState;
  op_trace->device = device;
  handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&op_enter, &op_leave)
                                      .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION,
                                               at::RecordScope::USER_SCOPE}));
}
OpMemoryTrace::~OpMemoryTrace() {
  at::removeCallback(handle_);
  delete op_trace;
  op_trace = nullptr;
}
std::vector<OpMemory> OpMemoryTrace::ops() const {
  std::lock_guard<std::mutex> lock(op_trace->mu);
  return op_trace->ops;
}

// --- Checkpoints <-> models ---------------------------------------------------------

namespace {

std::string shape(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? "," : "") + std::to_string(t.size(i));
  return s + "]";
}

int64_t counter(const ckpt::Checkpoint& c, const std::string& key, const std::string& source) {
  auto it = c.counters.find(key);
  if (it == c.counters.end()) throw std::runtime_error(source + ": checkpoint has no '" + key + "' counter");
  return it->second;
}
std::string meta(const ckpt::Checkpoint& c, const std::string& key, const std::string& source) {
  auto it = c.meta.find(key);
  if (it == c.meta.end()) throw std::runtime_error(source + ": checkpoint has no '" + key + "' in /meta");
  return it->second;
}

void copy_named(const torch::OrderedDict<std::string, torch::Tensor>& into, const ckpt::Tensors& from,
                const std::string& kind, const std::string& source) {
  torch::NoGradGuard no_grad;
  std::set<std::string> seen;
  for (const auto& [name, t] : from) {
    const torch::Tensor* dst = into.find(name);
    if (!dst) throw std::runtime_error(source + ": " + kind + " '" + name + "' is not in the model");
    if (!dst->sizes().equals(t.sizes()))
      throw std::runtime_error(source + ": " + kind + " '" + name + "' has shape " + shape(t) + ", the model's " +
                               shape(*dst));
    const_cast<torch::Tensor*>(dst)->copy_(t);
    seen.insert(name);
  }
  for (const auto& item : into)
    if (!seen.count(item.key()))
      throw std::runtime_error(source + ": checkpoint lacks the model's " + kind + " '" + item.key() + "'");
}

}  // namespace

void load_state(models::Model& model, const ckpt::Checkpoint& c, const std::string& source) {
  copy_named(model.named_parameters(), c.parameters, "parameter", source);
  copy_named(model.named_buffers(), c.buffers, "buffer", source);
}

models::ModelPtr model_from_checkpoint(const ckpt::Checkpoint& c, const std::string& source,
                                       const QuantConfig& config) {
  const std::string arch = meta(c, "arch", source);
  models::ModelPtr m;
  try {
    m = models::build(arch, counter(c, "in_channels", source), counter(c, "num_classes", source), config);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(source + ": " + e.what());
  }
  load_state(*m, c, source);
  return m;
}

// --- Evaluation ------------------------------------------------------------------

AutocastScope::AutocastScope(const c10::Device& d, Amp amp) : type_(d.type()), on_(amp != Amp::kOff) {
  if (!on_) return;
  prev_enabled_ = at::autocast::is_autocast_enabled(type_);
  prev_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, amp == Amp::kBFloat16 ? at::kBFloat16 : at::kHalf);
}

AutocastScope::~AutocastScope() {
  if (!on_) return;
  at::autocast::set_autocast_enabled(type_, prev_enabled_);
  at::autocast::set_autocast_dtype(type_, prev_dtype_);
  at::autocast::clear_cache();
}

std::string resolve_dataset(const std::string& dataset, int64_t num_classes) {
  if ((dataset == "cifar10" || dataset == "cifar100") && num_classes == 100) return "cifar100";
  if (dataset == "cifar100" && num_classes == 10) return "cifar10";
  return dataset;
}

namespace {

void sync(const c10::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

}  // namespace

EvalResult evaluate(models::Model& model, data::Loader& loader, const c10::Device& device, Amp amp,
                    int64_t max_batches) {
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  auto loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  auto top1 = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto top5 = top1.clone();
  int64_t images = 0, batches = 0;
  loader.start(0);
  while (auto b = loader.next()) {
    if (max_batches > 0 && batches++ >= max_batches) break;
    auto x = b->images.to(device, /*non_blocking=*/true);
    auto y = b->labels.to(device, /*non_blocking=*/true);
    torch::Tensor logits;
    {
      AutocastScope ac(device, amp);
      logits = model.forward(x);
    }
    logits = logits.to(torch::kFloat);
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .to(torch::kDouble);
    const int64_t k = std::min<int64_t>(5, logits.size(1));
    auto topk = std::get<1>(logits.topk(k, 1));
    auto hit = topk.eq(y.unsqueeze(1));
    top1 += hit.select(1, 0).sum();
    top5 += hit.any(1).sum();
    images += y.size(0);
  }
  model.train(was_training);
  EvalResult r;
  r.images = images;
  if (images) {
    r.loss = loss_sum.item<double>() / images;
    r.top1 = 100.0 * top1.item<int64_t>() / images;
    r.top5 = 100.0 * top5.item<int64_t>() / images;
  }
  return r;
}

StepMemory measure_step(models::Model& model, const torch::Tensor& images, const torch::Tensor& labels,
                        const c10::Device& device, Amp amp, bool trace_ops) {
  install_cpu_memory_counter();
  model.train();
  auto x = images.to(device), y = labels.to(device);
  int64_t base = 0;
  auto step = [&](StepMemory* m) {
    for (auto& p : model.parameters()) p.mutable_grad() = torch::Tensor();
    sync(device);
    const auto t0 = std::chrono::steady_clock::now();
    base = memory(device).allocated;
    reset_peak(device);
    torch::Tensor logits;
    {
      AutocastScope ac(device, amp);
      logits = model.forward(x);
    }
    auto loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y);
    if (m) {
      m->activations = memory(device).allocated - base;
      for (const auto& mod : model.modules(/*include_self=*/false))
        if (auto* q = dynamic_cast<QLayer*>(mod.get())) m->aq_saved += q->state()->saved_bytes;
    }
    loss.backward();
    sync(device);
    if (m) {
      m->peak = memory(device).peak - base;
      m->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  };
  step(nullptr);  // warm-up: cuDNN plans, allocator caches, gradient buffers
  StepMemory m;
  std::optional<OpMemoryTrace> trace;
  if (trace_ops) trace.emplace(device);
  step(&m);
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

// --- Training ----------------------------------------------------------------------

namespace {

std::atomic<int> g_signal{0};
extern "C" void on_signal(int s) { g_signal.store(s); }

// SIGINT/SIGTERM set a flag the loop reads after each step; a second one
// (SA_RESETHAND) kills as usual.
class SignalScope {
 public:
  SignalScope() {
    g_signal.store(0);
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~SignalScope() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

const std::vector<std::string> kColumns = {"epoch",   "step",     "lr",       "train_loss", "train_acc", "val_loss",
                                           "val_top1", "val_top5", "img_per_s", "act_mb",    "peak_mb"};

// lr at optimizer step `t` (0-based) of `total`.
double lr_at(const Options& o, int64_t t, int64_t total, int64_t per_epoch) {
  const double warm = o.warmup * per_epoch;
  if (o.schedule == Schedule::kOneCycle) {
    // PyTorch's OneCycleLR: from lr/25 up to lr over the first 30% of the
    // steps, then down to lr/25/1e4, both cosine.
    const double init = o.lr / 25, fin = init / 1e4;
    const double up = std::max(1.0, 0.3 * total - 1), down = std::max(1.0, total - 1 - up);
    auto cos_anneal = [](double a, double b, double f) { return b + (a - b) / 2 * (1 + std::cos(M_PI * f)); };
    return t <= up ? cos_anneal(init, o.lr, t / up) : cos_anneal(o.lr, fin, std::min(1.0, (t - up) / down));
  }
  if (t < warm) return o.lr * (t + 1) / warm;
  switch (o.schedule) {
    case Schedule::kCosine:
      return o.lr * 0.5 * (1 + std::cos(M_PI * (t - warm) / std::max(1.0, total - warm)));
    case Schedule::kStep: {
      std::vector<double> ms = o.milestones;
      if (ms.empty()) ms = {0.5 * o.epochs, 0.75 * o.epochs};
      double lr = o.lr;
      for (double m : ms)
        if (t >= m * per_epoch) lr *= 0.1;
      return lr;
    }
    default:
      return o.lr;
  }
}

// Dynamic loss scaling for fp16 autocast (LibTorch has no GradScaler).
struct Scaler {
  torch::Tensor scale, growth_tracker;
  explicit Scaler(const c10::Device& d)
      : scale(torch::full({1}, 65536.0, torch::TensorOptions().device(d))),
        growth_tracker(torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt).device(d))) {}
  // Unscales the gradients; false if any is not finite (skip the step).
  bool unscale(const std::vector<torch::Tensor>& params) {
    std::vector<torch::Tensor> grads;
    for (const auto& p : params)
      if (p.grad().defined()) grads.push_back(p.grad());
    auto found_inf = torch::zeros({1}, scale.options());
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.reciprocal());
    at::_amp_update_scale_(scale, growth_tracker, found_inf, 2.0, 0.5, 2000);
    return found_inf.item<float>() == 0;
  }
};

std::string now_iso() {
  char buf[32];
  std::time_t t = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

struct Progress {
  bool on;
  std::chrono::steady_clock::time_point last{};
  // Whether to redraw now (reading the running loss syncs with the device).
  bool due(int64_t batch, int64_t batches) {
    if (!on) return false;
    auto now = std::chrono::steady_clock::now();
    if (batch != batches && now - last < std::chrono::milliseconds(250)) return false;
    last = now;
    return true;
  }
  void show(int64_t epoch, int64_t epochs, int64_t batch, int64_t batches, double loss, double acc, double ips) {
    const int width = 24;
    const int done = static_cast<int>(width * batch / std::max<int64_t>(1, batches));
    std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld loss %.4f acc %.2f%% %.0f img/s ",
                 static_cast<long long>(epoch + 1), static_cast<long long>(epochs), std::string(done, '=').c_str(),
                 std::string(width - done, ' ').c_str(), static_cast<long long>(batch),
                 static_cast<long long>(batches), loss, acc, ips);
    std::fflush(stderr);
  }
  void end() {
    if (on) std::fprintf(stderr, "\r\033[K");
  }
};

struct Partial {  // of the current epoch, kept across a mid-epoch checkpoint
  double loss_sum = 0, correct = 0, seen = 0, act_sum = 0, act_n = 0;
};

// mkdir -p with POSIX calls: LibTorch exports its own copies of some
// std::filesystem functions, which the dynamic linker may bind instead.
// With create false nothing is made: it only checks, before the slow part of
// setup (datasets, checkpoints), what creating would meet: a prefix that is
// not a folder, a missing folder whose parent takes no new entries, or an
// existing workspace that takes no files.
void make_folders(const std::string& path, bool create = true) {
  std::string parent = !path.empty() && path[0] == '/' ? "/" : ".";
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (prefix.empty()) continue;
    struct stat st {};
    const auto cannot_create = [&] {
      return std::runtime_error("--workspace " + path + ": cannot create " + prefix + ": " + std::strerror(errno));
    };
    if (::stat(prefix.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) throw std::runtime_error("--workspace " + path + ": " + prefix + " is not a folder");
    } else if (!create) {  // the rest would be made inside parent
      if (errno != ENOENT || ::access(parent.c_str(), W_OK | X_OK) != 0) throw cannot_create();
      return;
    } else if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
      throw cannot_create();
    }
    parent = prefix;
  }
  const std::string dir = path.empty() ? "." : path;
  if (!create && ::access(dir.c_str(), W_OK | X_OK) != 0)
    throw std::runtime_error("--workspace " + path + ": cannot write there: " + std::strerror(errno));
}

// Checkpoints are first written at the end of an epoch: a workspace that
// takes no files (a read-only file system, even for root) fails now instead.
void check_writable(const std::string& workspace, const std::string& probe) {
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw std::runtime_error("--workspace " + workspace + ": cannot write there: " + std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

class Trainer {
 public:
  explicit Trainer(const Options& o) : o_(o), dev_(o.device) {}
  int run();

 private:
  void setup();
  void restore(const ckpt::Checkpoint& c);
  void save(int64_t epoch, int64_t batch, const Partial& part, bool gather);
  void print_row(const std::vector<double>& row);
  std::string in_workspace(const std::string& name) const {
    return o_.workspace.empty() || o_.workspace.back() == '/' ? o_.workspace + name : o_.workspace + "/" + name;
  }

  const Options& o_;
  c10::Device dev_;
  std::string dataset_;
  uint64_t seed_ = 0;
  std::shared_ptr<const data::Dataset> train_set_, test_set_;
  models::ModelPtr model_;
  std::unique_ptr<SGD> opt_;
  std::unique_ptr<data::Loader> train_loader_, test_loader_;
  int64_t epoch_ = 0, step_ = 0, batch_ = 0;
  Partial partial_;
  std::vector<std::vector<double>> history_;
  std::optional<ckpt::Checkpoint> resumed_;
  double lr_ = 0;
};

void Trainer::setup() {
  if (!o_.resume.empty()) resumed_ = ckpt::load(o_.resume);
  dataset_ = resolve_dataset(o_.dataset, o_.num_classes);
  if (resumed_) {
    const std::string src = o_.resume;
    if (meta(*resumed_, "arch", src) != o_.arch)
      throw std::runtime_error(src + ": checkpoint is a " + meta(*resumed_, "arch", src) + ", --arch says " + o_.arch);
    if (meta(*resumed_, "dataset", src) != dataset_)
      throw std::runtime_error(src + ": checkpoint was trained on " + meta(*resumed_, "dataset", src) +
                               ", --dataset says " + dataset_);
    const uint64_t s = static_cast<uint64_t>(counter(*resumed_, "seed", src));
    if (o_.seed_given && s != o_.seed)
      log().warn("--seed {} ignored: resuming the run of seed {} from {}", o_.seed, s, src);
    seed_ = s;
  } else {
    seed_ = o_.seed_given ? o_.seed : (static_cast<uint64_t>(std::random_device{}()) << 20) ^ std::random_device{}();
  }
  torch::manual_seed(seed_);
  data::OpenOptions oo;
  oo.image_size = o_.image_size;
  if (o_.num_classes > 0) oo.synthetic_classes = o_.num_classes;
  train_set_ = data::open(dataset_, o_.data_dir, data::Split::kTrain, oo);
  test_set_ = data::open(dataset_, o_.data_dir, data::Split::kTest, oo);
  const auto& info = train_set_->info();
  if (o_.num_classes > 0 && o_.num_classes != info.num_classes)
    throw std::invalid_argument("--num-classes " + std::to_string(o_.num_classes) + " but " + dataset_ + " has " +
                                std::to_string(info.num_classes) + " classes");
  model_ = models::build(o_.arch, info.channels, info.num_classes, o_.quant);
  model_->to(dev_);
  auto so = torch::optim::SGDOptions(o_.lr).momentum(o_.momentum).weight_decay(o_.weight_decay);
  so.nesterov(o_.nesterov && o_.momentum > 0);
  opt_ = std::make_unique<SGD>(model_->parameters(), so);
  data::LoaderOptions lo;
  lo.batch_size = o_.batch_size;
  lo.workers = o_.workers;
  lo.seed = seed_;
  lo.pin_memory = dev_.is_cuda();
  train_loader_ = std::make_unique<data::Loader>(train_set_, lo);
  lo.shuffle = lo.augment = false;
  test_loader_ = std::make_unique<data::Loader>(test_set_, lo);
  if (resumed_) restore(*resumed_);
  if (!o_.calibration.empty()) {
    if (resumed_) {
      log().warn("--calibration {} ignored: the --resume checkpoint has the run's own statistics", o_.calibration);
    } else {
      calibrate::load(*model_, o_.calibration, o_.arch);
      log().info("adaptive statistics and per-layer budgets from {}", o_.calibration);
    }
  }
  log().info("{} on {} ({} train / {} test images, {}x{}x{}, {} classes), {} on {}, seed {}", o_.arch, dataset_,
             train_set_->size(), test_set_->size(), info.channels, info.height, info.width, info.num_classes,
             o_.quant.to_flags(), dev_.str(), seed_);
}

void Trainer::restore(const ckpt::Checkpoint& c) {
  const std::string& src = o_.resume;
  load_state(*model_, c, src);
  // Momentum buffers, by parameter name.
  std::map<std::string, torch::Tensor> bufs(c.optimizer.begin(), c.optimizer.end());
  auto& state = opt_->state();
  for (const auto& p : model_->named_parameters()) {
    auto it = bufs.find(p.key() + ".momentum_buffer");
    if (it == bufs.end()) continue;
    if (!it->second.sizes().equals(p.value().sizes()))
      throw std::runtime_error(src + ": momentum buffer of '" + p.key() + "' has shape " + shape(it->second));
    auto st = std::make_unique<torch::optim::SGDParamState>();
    st->momentum_buffer(it->second.to(p.value().options()));
    state[p.value().unsafeGetTensorImpl()] = std::move(st);
  }
  load_adaptive_state(*model_, c.optimizer);
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
  auto scalar = [&](const char* k) {
    auto it = c.scalars.find(k);
    return it == c.scalars.end() ? 0.0 : it->second;
  };
  partial_ = {scalar("partial_loss_sum"), scalar("partial_correct"), scalar("partial_seen"), scalar("partial_act_sum"),
              scalar("partial_act_n")};
  history_ = c.metric_rows;
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
            {"created", now_iso()},
            {"optimizer", o_.nesterov ? "sgd-nesterov" : "sgd"},
            {"schedule", to_string(o_.schedule)},
            {"amp", to_string(o_.amp)}};
  c.counters = {{"epoch", epoch},
                {"step", step_},
                {"batch", batch},
                {"num_classes", info.num_classes},
                {"in_channels", info.channels},
                {"image_size", info.height},
                {"seed", static_cast<int64_t>(seed_)},
                {"batch_size", o_.batch_size},
                {"epochs", o_.epochs}};
  c.scalars = {{"lr", lr_},
               {"momentum", o_.momentum},
               {"weight_decay", o_.weight_decay},
               {"label_smoothing", o_.label_smoothing},
               {"partial_loss_sum", part.loss_sum},
               {"partial_correct", part.correct},
               {"partial_seen", part.seen},
               {"partial_act_sum", part.act_sum},
               {"partial_act_n", part.act_n}};
  for (const auto& p : model_->named_parameters()) c.parameters.emplace_back(p.key(), p.value().detach());
  for (const auto& b : model_->named_buffers()) c.buffers.emplace_back(b.key(), b.value());
  auto& state = opt_->state();
  for (const auto& p : model_->named_parameters()) {
    auto it = state.find(p.value().unsafeGetTensorImpl());
    if (it == state.end()) continue;
    const auto& buf = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
    if (buf.defined()) c.optimizer.emplace_back(p.key() + ".momentum_buffer", buf);
  }
  for (auto& t : adaptive_state(*model_)) c.optimizer.push_back(std::move(t));
  c.rng.emplace_back("cpu", at::globalContext().defaultGenerator(c10::kCPU).get_state());
  if (dev_.is_cuda()) c.rng.emplace_back("cuda", at::globalContext().defaultGenerator(dev_).get_state());
  c.metric_columns = kColumns;
  c.metric_rows = history_;
  ckpt::save(in_workspace("checkpoint.h5"), c);
  if (gather) ckpt::save(in_workspace("checkpoint-" + std::to_string(epoch) + ".h5"), c);
}

void Trainer::print_row(const std::vector<double>& r) {
  std::printf("%lld\t%lld\t%.6g\t%.4f\t%.2f\t%.4f\t%.2f\t%.2f\t%.1f\t%.2f\t%.2f\n", static_cast<long long>(r[0]),
              static_cast<long long>(r[1]), r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]);
  std::fflush(stdout);
}

int Trainer::run() {
  if (!o_.evaluate) make_folders(o_.workspace, false);
  setup();
  if (o_.evaluate) {
    auto r = evaluate(*model_, *test_loader_, dev_, o_.amp, o_.val_batches);
    std::printf("file\tloss\ttop1\ttop5\timages\n%s\t%.6f\t%.2f\t%.2f\t%lld\n",
                o_.resume.empty() ? "(initial)" : o_.resume.c_str(), r.loss, r.top1, r.top5,
                static_cast<long long>(r.images));
    return 0;
  }
  SignalScope signals;  // before the workspace appears: scripts wait for it
  make_folders(o_.workspace);
  check_writable(o_.workspace, in_workspace(".aq-write-test." + std::to_string(::getpid())));
  const int64_t per_epoch = train_loader_->batches_per_epoch();
  if (per_epoch == 0) throw std::runtime_error(dataset_ + ": no training batch (dataset smaller than --batch-size with drop_last)");
  const int64_t total = per_epoch * o_.epochs;
  if (epoch_ >= o_.epochs) {
    log().info("{} has already trained {} of --epochs {}: nothing to do", o_.resume, epoch_, o_.epochs);
    return 0;
  }
  if (o_.max_steps > 0 && step_ >= o_.max_steps) {
    log().info("{} is already at step {} of --max-steps {}: nothing to do", o_.resume, step_, o_.max_steps);
    return 0;
  }
  for (size_t i = 0; i < kColumns.size(); ++i) std::printf("%s%s", i ? "\t" : "", kColumns[i].c_str());
  std::printf("\n");
  std::fflush(stdout);
  Progress bar{o_.progress && isatty(STDERR_FILENO) && log().level() <= spdlog::level::info};
  std::optional<Scaler> scaler;
  if (o_.amp == Amp::kFloat16) scaler.emplace(dev_);
  const auto params = model_->parameters();
  namespace F = torch::nn::functional;
  const auto ce = F::CrossEntropyFuncOptions().label_smoothing(o_.label_smoothing);
  const bool per_layer = adaptive(o_.quant) && o_.quant.perlayer;
  for (; epoch_ < o_.epochs; ++epoch_) {
    model_->train();
    train_loader_->start(epoch_, batch_);
    reset_peak(dev_);
    Partial part = partial_;
    partial_ = {};
    auto loss_sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(dev_));
    auto correct = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(dev_));
    int64_t seen_now = 0;
    bool stop = false;
    const auto t0 = std::chrono::steady_clock::now();
    while (auto b = train_loader_->next()) {
      lr_ = lr_at(o_, step_, total, per_epoch);
      for (auto& g : opt_->param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr_);
      opt_->zero_grad();
      auto x = b->images.to(dev_, /*non_blocking=*/true);
      auto y = b->labels.to(dev_, /*non_blocking=*/true);
      const int64_t before = memory(dev_).allocated;
      torch::Tensor logits, loss;
      set_batch_indices(b->indices);
      {
        AutocastScope ac(dev_, o_.amp);
        logits = model_->forward(x);
      }
      logits = logits.to(torch::kFloat);
      loss = F::cross_entropy(logits, y, ce);
      part.act_sum += static_cast<double>(memory(dev_).allocated - before);
      part.act_n += 1;
      if (scaler) {
        (loss * scaler->scale).backward();
        if (scaler->unscale(params)) opt_->step();
      } else {
        loss.backward();
        opt_->step();
      }
      if (per_layer) adapt_layers(*model_, /*defer=*/true);
      loss_sum += loss.detach().to(torch::kDouble) * y.size(0);
      correct += logits.detach().argmax(1).eq(y).sum();
      seen_now += y.size(0);
      ++step_;
      ++batch_;
      if (bar.due(batch_, per_epoch)) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double seen = part.seen + seen_now;
        bar.show(epoch_, o_.epochs, batch_, per_epoch, (part.loss_sum + loss_sum.item<double>()) / seen,
                 100.0 * (part.correct + correct.item<int64_t>()) / seen, seen_now / std::max(secs, 1e-9));
      }
      if (g_signal.load() || (o_.max_steps > 0 && step_ >= o_.max_steps)) {
        stop = true;
        break;
      }
    }
    sync(dev_);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    bar.end();
    part.loss_sum += loss_sum.item<double>();
    part.correct += static_cast<double>(correct.item<int64_t>());
    part.seen += static_cast<double>(seen_now);
    const int sig = g_signal.load();
    if (sig) {
      save(epoch_, batch_, part, false);
      log().warn("stopped by signal {} at epoch {}, batch {}: checkpoint written to {}; continue with --resume",
                 sig, epoch_ + 1, batch_, in_workspace("checkpoint.h5"));
      return 128 + sig;
    }
    const auto peak = memory(dev_).peak;
    const auto val = evaluate(*model_, *test_loader_, dev_, o_.amp, o_.val_batches);
    const bool mid_epoch = stop && batch_ < per_epoch;
    std::vector<double> row = {double(epoch_ + 1),
                               double(step_),
                               lr_,
                               part.seen ? part.loss_sum / part.seen : NAN,
                               part.seen ? 100.0 * part.correct / part.seen : NAN,
                               val.loss,
                               val.top1,
                               val.top5,
                               seen_now / std::max(secs, 1e-9),
                               part.act_n ? part.act_sum / part.act_n / 1048576.0 : 0.0,
                               peak / 1048576.0};
    history_.push_back(row);
    print_row(row);
    if (mid_epoch) {
      save(epoch_, batch_, part, false);
      log().info("--max-steps {} reached at epoch {}, batch {}: checkpoint written", o_.max_steps, epoch_ + 1,
                 batch_);
      return 0;
    }
    batch_ = 0;
    save(epoch_ + 1, 0, {}, o_.gather_checkpoints);
    log().info("epoch {}/{}: train loss {:.4f}, val top-1 {:.2f}%", epoch_ + 1, o_.epochs, row[3], val.top1);
    if (stop) {
      ++epoch_;
      break;
    }
  }
  return 0;
}

}  // namespace

int run(const Options& o) {
  install_cpu_memory_counter();
  Trainer t(o);
  return t.run();
}

}  // namespace aq::train
