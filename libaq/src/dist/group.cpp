// The process group and the reducer over c10d.  Built with USE_C10D_GLOO
// (and USE_C10D_NCCL with CUDA) where the headers those backends need were
// found (libaq/src/dist/meson.build).
#include "aq/dist.h"

#include "aq_config.h"

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/ATen.h>
#include <c10/util/Logging.h>

#include <algorithm>
#include <cstdlib>

#include <map>
#include <mutex>
#include <stdexcept>

namespace aq::dist {

struct Group::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
};

namespace {

// c10d's message, first line, as a runtime_error that says what failed.
template <class F>
auto guarded(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    const std::string m = e.what_without_backtrace();
    throw std::runtime_error(what + ": " + m.substr(0, m.find('\n')));
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    throw std::runtime_error(what + ": " + m.substr(0, m.find('\n')));
  }
}

std::mutex current_mu;
std::shared_ptr<Group> current_group;

}  // namespace

Group::~Group() = default;

std::shared_ptr<Group> connect(const Env& env, const c10::Device& device, std::chrono::milliseconds timeout) {
  std::shared_ptr<Group> g(new Group());
  g->impl_ = std::make_unique<Group::Impl>();
  g->rank_ = env.rank;
  g->size_ = env.world_size;
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0;
  so.numWorkers = static_cast<int>(env.world_size);
  so.waitWorkers = true;
  so.timeout = timeout;
  // c10d logs each failed connection attempt, with a stack trace, before it
  // throws; the exception's one line is the message (TORCH_CPP_LOG_LEVEL,
  // where set, keeps LibTorch's own choice).
  const int log_level = FLAGS_caffe2_log_level;
  if (!std::getenv("TORCH_CPP_LOG_LEVEL")) FLAGS_caffe2_log_level = std::max(log_level, 3);
  struct Restore {
    int level;
    ~Restore() { FLAGS_caffe2_log_level = level; }
  } restore{log_level};
  g->impl_->store = guarded("rendezvous at " + where + " (rank " + std::to_string(env.rank) + " of " +
                                std::to_string(env.world_size) + ", timeout " +
                                std::to_string(timeout.count() / 1000) + " s)",
                            [&] { return c10::make_intrusive<c10d::TCPStore>(env.master_addr, so); });
  auto pg = c10::make_intrusive<c10d::ProcessGroup>(g->impl_->store, static_cast<int>(env.rank),
                                                    static_cast<int>(env.world_size));
#ifdef USE_C10D_GLOO
  guarded("Gloo process group", [&] {
    auto o = c10d::ProcessGroupGloo::Options::create(timeout);
    // The address this host is known by to the others (the master's when the
    // master is this host), else the interface its hostname resolves to.
    o->devices.push_back(env.master_addr == "127.0.0.1" || env.master_addr == "localhost"
                             ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                             : c10d::ProcessGroupGloo::createDefaultDevice());
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(g->impl_->store, static_cast<int>(env.rank),
                                                            static_cast<int>(env.world_size), o);
    pg->setBackend(c10::kCPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    g->backend_ = "gloo";
    return 0;
  });
#else
  throw std::runtime_error("distributed runs need Gloo, and this build has none (install libgloo-dev and rebuild)");
#endif
  if (device.is_cuda()) {
#ifdef USE_C10D_NCCL
    guarded("NCCL process group", [&] {
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      pg->setBoundDeviceId(device);
      auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->impl_->store, static_cast<int>(env.rank),
                                                              static_cast<int>(env.world_size), o);
      pg->setBackend(c10::kCUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
      pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
      g->backend_ = "nccl";
      return 0;
    });
#else
    throw std::runtime_error(device.str() + ": this build has no NCCL (built without CUDA)");
#endif
  }
  g->impl_->pg = pg;
  return g;
}

void Group::all_reduce_sum(std::vector<at::Tensor>& t) {
  guarded("all-reduce", [&] { return impl_->pg->allreduce(t)->wait(); });
}

void Group::all_reduce_max(std::vector<at::Tensor>& t) {
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  guarded("all-reduce", [&] { return impl_->pg->allreduce(t, o)->wait(); });
}

void Group::broadcast(std::vector<at::Tensor>& t, int64_t root) {
  c10d::BroadcastOptions o;
  o.rootRank = root;
  guarded("broadcast", [&] { return impl_->pg->broadcast(t, o)->wait(); });
}

at::Tensor Group::all_gather(const at::Tensor& tensor) {
  auto in = tensor.contiguous().view({-1});  // Gloo wants the output's shape flat like the input's
  auto out = at::empty({size_ * in.numel()}, in.options());
  guarded("all-gather", [&] { return impl_->pg->_allgather_base(out, in)->wait(); });
  std::vector<int64_t> shape{size_};
  for (auto s : tensor.sizes()) shape.push_back(s);
  return out.view(shape);
}

void Group::barrier() {
  guarded("barrier", [&] { return impl_->pg->barrier()->wait(); });
}

void set_current(std::shared_ptr<Group> group) {
  std::lock_guard<std::mutex> lock(current_mu);
  current_group = std::move(group);
}

std::shared_ptr<Group> current() {
  std::lock_guard<std::mutex> lock(current_mu);
  return current_group;
}

void broadcast_from_root(Group& group, std::vector<at::Tensor> tensors) {
  // One broadcast per dtype and device, of the tensors flattened together.
  std::map<std::pair<c10::ScalarType, std::string>, std::vector<at::Tensor>> by_kind;
  for (auto& t : tensors)
    if (t.defined() && t.numel() > 0) by_kind[{t.scalar_type(), t.device().str()}].push_back(t);
  at::NoGradGuard no_grad;
  for (auto& [kind, list] : by_kind) {
    std::vector<at::Tensor> flat;
    for (auto& t : list) flat.push_back(t.detach().reshape(-1));
    std::vector<at::Tensor> one{at::cat(flat)};
    group.broadcast(one, 0);
    int64_t at_ = 0;
    for (auto& t : list) {
      t.detach().copy_(one[0].narrow(0, at_, t.numel()).view(t.sizes()));
      at_ += t.numel();
    }
  }
}

struct GradientReducer::Impl {
  std::unique_ptr<c10d::Reducer> reducer;
};

GradientReducer::GradientReducer(Group& group, std::vector<at::Tensor> params, int64_t bucket_mb)
    : impl_(std::make_unique<Impl>()) {
  // As DistributedDataParallel: buckets by size in parameter order, handed
  // over last first (backward reaches the last parameters first); a small
  // first bucket so that communication starts early.  After the first
  // backward the reducer rebuilds them in the order gradients arrived.
  const size_t cap = static_cast<size_t>(bucket_mb) << 20, first = size_t{1} << 20;
  auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(params, {first, cap});
  std::reverse(buckets.begin(), buckets.end());
  std::vector<int64_t> caps(limits.rbegin(), limits.rend());
  impl_->reducer = guarded("gradient reducer", [&] {
    return std::make_unique<c10d::Reducer>(params, buckets, group.impl().pg, std::vector<bool>(params.size(), false),
                                           static_cast<int64_t>(cap), /*find_unused_parameters=*/false,
                                           /*gradient_as_bucket_view=*/false,
                                           std::unordered_map<size_t, std::string>{}, static_cast<int64_t>(first),
                                           /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
                                           caps);
  });
}

GradientReducer::~GradientReducer() = default;

void GradientReducer::prepare(const at::Tensor& output) {
  guarded("gradient reducer", [&] {
    impl_->reducer->rebuild_buckets();
    impl_->reducer->prepare_for_backward({output});
    return 0;
  });
}

}  // namespace aq::dist
