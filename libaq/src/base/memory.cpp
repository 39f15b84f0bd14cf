#include "aq/memory.h"

#include "aq/log.h"
#include "aq_config.h"

#include <ATen/record_function.h>
#include <c10/core/AllocatorConfig.h>
#include <c10/core/CPUAllocator.h>
#if AQ_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

namespace aq {

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

namespace {
constexpr const char* kCpuAllocFailed = "DefaultCPUAllocator: can't allocate memory";
}  // namespace

bool is_out_of_memory(const c10::Error& e) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e)) return true;
  const std::string m = e.what_without_backtrace();
  return m.find(kCpuAllocFailed) != std::string::npos || m.find("ALLOC_FAILED") != std::string::npos;
}

std::string error_line(const c10::Error& e) {
  std::string m = e.what_without_backtrace();
  if (const auto at = m.find(kCpuAllocFailed); at != std::string::npos) m.erase(0, at);
  return m.substr(0, m.find('\n'));
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

}  // namespace aq
