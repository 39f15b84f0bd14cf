#include "data_parallel.h"

#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "aq/log.h"

#include <torch/cuda.h>
#include <torch/torch.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace aq::train::detail {

std::unique_ptr<DataParallel> DataParallel::connect(c10::Device& device, std::chrono::milliseconds timeout) {
  // A bad variable is the environment's fault, not the command line's:
  // one line and exit 1, without the usage hint.
  std::optional<dist::Env> env;
  try {
    env = dist::read_env();
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(e.what());
  }
  if (!env) return nullptr;
  if (device.is_cuda()) {
    const int64_t n = static_cast<int64_t>(torch::cuda::device_count());
    if (env->local_rank >= n)
      throw std::invalid_argument("local rank " + std::to_string(env->local_rank) + " has no GPU: this node has " +
                                  std::to_string(n) + " (one process per GPU)");
    device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env->local_rank));
  }
  // Rank 0 speaks for all at info level (the others' lines are debug).
  log().log(env->rank == 0 ? spdlog::level::info : spdlog::level::debug,
            "rank {} of {} (local rank {}, from {}), master {}:{}, {}", env->rank, env->world_size, env->local_rank,
            env->launcher, env->master_addr, env->master_port, device.str());
  auto g = dist::connect(*env, device, timeout);
  dist::set_current(g);
  return std::unique_ptr<DataParallel>(new DataParallel(std::move(g)));
}

DataParallel::~DataParallel() { dist::set_current(nullptr); }

void DataParallel::make_equal(models::Model& model, torch::optim::Optimizer& opt) {
  std::vector<at::Tensor> all;
  for (auto& p : model.parameters()) all.push_back(p);
  for (auto& b : model.buffers()) all.push_back(b);
  // Every rank restored the same checkpoint or none, so the same parameters
  // have optimizer state on each (AdamW's step counts are equal with it).
  for (auto& p : model.parameters()) {
    auto it = opt.state().find(p.unsafeGetTensorImpl());
    if (it == opt.state().end()) continue;
    if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(it->second.get())) {
      if (sgd->momentum_buffer().defined()) all.push_back(sgd->momentum_buffer());
    } else if (const auto* adam = dynamic_cast<const torch::optim::AdamWParamState*>(it->second.get())) {
      for (const auto& t : {adam->exp_avg(), adam->exp_avg_sq(), adam->max_exp_avg_sq()})
        if (t.defined()) all.push_back(t);
    }
  }
  dist::broadcast_from_root(*group_, all);
}

void DataParallel::equal_buffers(models::Model& model) { dist::broadcast_from_root(*group_, model.buffers()); }

void DataParallel::hook(models::Model& model, StepOptions& options) {
  reducer_ = std::make_unique<dist::GradientReducer>(*group_, model.parameters());
  options.before_backward = [r = reducer_.get()](const torch::Tensor& loss) { r->prepare(loss); };
  options.all_gather = [g = group_.get()](const at::Tensor& t) { return g->all_gather(t); };
}

std::string DataParallel::differing(const std::vector<std::pair<std::string, at::Tensor>>& state) {
  // Entries can differ in number only if something is already wrong: the
  // counts first, so that the fingerprints' gather has one shape on all.
  const auto n = static_cast<int64_t>(state.size());
  const auto counts = group_->all_gather(torch::full({1}, n, torch::kLong));
  if (!torch::equal(counts, counts[0].expand_as(counts))) return "(the number of entries)";
  if (n == 0) return "";
  auto fp = torch::empty({n, 2}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = state[static_cast<size_t>(i)].second;
    fp[i][0] = static_cast<double>(t.numel());
    fp[i][1] = t.to(torch::kDouble).sum();
  }
  const auto all = group_->all_gather(fp);  // [ranks, n, 2]
  for (int64_t r = 1; r < size(); ++r)
    for (int64_t i = 0; i < n; ++i)
      if (!torch::allclose(all[r][i], all[0][i], 0, 0, /*equal_nan=*/true)) return state[static_cast<size_t>(i)].first;
  return "";
}

int DataParallel::agree(int value) {
  std::vector<at::Tensor> t{torch::full({1}, static_cast<int64_t>(value), torch::kLong)};
  group_->all_reduce_max(t);
  return static_cast<int>(t[0].item<int64_t>());
}

void DataParallel::sum(std::vector<double>& values) {
  if (values.empty()) return;
  std::vector<at::Tensor> t{torch::tensor(values, torch::kDouble)};
  group_->all_reduce_sum(t);
  auto a = t[0].accessor<double, 1>();
  for (size_t i = 0; i < values.size(); ++i) values[i] = a[static_cast<int64_t>(i)];
}

EvalResult DataParallel::reduce(const EvalResult& mine) {
  // Counts travel as int64, so that every image is counted exactly once.
  std::vector<at::Tensor> counts{
      torch::tensor({mine.images, mine.correct1, mine.correct5, int64_t{mine.stopped}, mine.tokens}, torch::kLong)};
  group_->all_reduce_sum(counts);
  std::vector<double> loss{mine.loss_sum};
  sum(loss);
  auto c = counts[0].accessor<int64_t, 1>();
  EvalResult r;
  r.images = c[0];
  r.correct1 = c[1];
  r.correct5 = c[2];
  r.stopped = c[3] > 0;
  r.tokens = c[4];
  r.loss_sum = loss[0];
  // Token models' figures are per token, as on one rank.
  if (const int64_t scored = r.tokens ? r.tokens : r.images) {
    r.loss = r.loss_sum / scored;
    r.top1 = 100.0 * r.correct1 / scored;
    r.top5 = 100.0 * r.correct5 / scored;
  }
  return r;
}

namespace {

at::Generator generator(const std::string& key, const c10::Device& device) {
  return at::globalContext().defaultGenerator(key == "cpu" ? c10::Device(c10::kCPU) : device);
}

}  // namespace

void DataParallel::gather_rng(ckpt::Checkpoint& c, const c10::Device& device) {
  std::vector<std::string> keys{"cpu"};
  if (device.is_cuda()) keys.push_back("cuda");
  for (const auto& key : keys) {
    at::Tensor state;
    {
      auto g = generator(key, device);
      std::lock_guard<std::mutex> lock(g.mutex());
      state = g.get_state();
    }
    const auto all = group_->all_gather(state);
    for (int64_t r = 1; r < size(); ++r) c.rng.emplace_back(key + ".rank" + std::to_string(r), all[r].clone());
  }
}

void DataParallel::restore_rng(const ckpt::Checkpoint* c, const c10::Device& device, uint64_t seed, int64_t step) {
  if (main()) return;  // rank 0's are the checkpoint's "cpu" and "cuda", restored already
  std::vector<std::string> keys{"cpu"};
  if (device.is_cuda()) keys.push_back("cuda");
  for (const auto& key : keys) {
    auto g = generator(key, device);
    std::lock_guard<std::mutex> lock(g.mutex());
    const at::Tensor* saved = nullptr;
    if (c)
      for (const auto& [k, t] : c->rng)
        if (k == key + ".rank" + std::to_string(rank())) saved = &t;
    if (saved) {
      try {
        g.set_state(*saved);
        continue;
      } catch (const c10::Error&) {
        throw std::runtime_error("bad '" + key + ".rank" + std::to_string(rank()) + "' generator state");
      }
    }
    // splitmix64 of (seed, rank, step): streams apart from rank 0's and from each other.
    uint64_t z = seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(rank()) +
                 0xBF58476D1CE4E5B9ULL * static_cast<uint64_t>(step + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    g.set_current_seed(z ^ (z >> 31));
  }
}

}  // namespace aq::train::detail
