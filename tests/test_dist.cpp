// The launcher's environment, SLURM's host lists, the process group and
// gradient reducer, and adaptive precision across ranks, over Gloo with
// ranks as threads of this process.
#include "aq/adaptive.h"
#include "aq/dist.h"
#include "aq/models.h"
#include "aq/modules.h"
#include "aq/optim.h"
#include "aq/step.h"
#include "device_test.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace {

// c10d's flight recorder (on unless TORCH_FR_BUFFER_SIZE is 0) enters each
// process group into a process-wide map on the group's first collective
// without holding its lock (FlightRecorder::recordWithResetEnabled).  Ranks as
// threads of one process start their groups' first collectives at once and
// corrupt that map; ranks as processes, as the launchers run them, never
// share it.  Off before any group exists.
[[maybe_unused]] const bool flight_recorder_off = [] {
  setenv("TORCH_FR_BUFFER_SIZE", "0", 1);
  setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "0", 1);
  return true;
}();

using aq::dist::expand_nodelist;
using aq::dist::read_env;

aq::dist::Getenv vars(const std::map<std::string, std::string>& m) {
  return [m](const char* n) -> const char* {
    auto it = m.find(n);
    return it == m.end() ? nullptr : it->second.c_str();
  };
}

TEST(DistEnv, NoLauncherIsAlone) {
  EXPECT_FALSE(read_env(vars({})).has_value());
  EXPECT_FALSE(read_env(vars({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}})).has_value());
}

TEST(DistEnv, Torchrun) {
  const auto e = read_env(vars({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                                {"MASTER_ADDR", "10.0.0.2"}, {"MASTER_PORT", "29511"}}));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->rank, 3);
  EXPECT_EQ(e->world_size, 8);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->master_addr, "10.0.0.2");
  EXPECT_EQ(e->master_port, 29511);
  EXPECT_EQ(e->launcher, "torchrun");
}

TEST(DistEnv, BadTorchrunVariablesAreErrors) {
  auto msg = [](const std::map<std::string, std::string>& m) {
    try {
      read_env(vars(m));
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::map<std::string, std::string> ok{
      {"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}};
  auto with = [&](const std::string& k, const char* v) {
    auto m = ok;
    if (v) m[k] = v; else m.erase(k);
    return m;
  };
  EXPECT_NE(msg(with("MASTER_ADDR", nullptr)).find("MASTER_ADDR is not set"), std::string::npos);
  EXPECT_NE(msg(with("MASTER_PORT", nullptr)).find("MASTER_PORT is not set"), std::string::npos);
  EXPECT_NE(msg(with("RANK", "2")).find("not below the world size 2"), std::string::npos);
  EXPECT_NE(msg(with("RANK", "x")).find("RANK must be a whole number"), std::string::npos);
  EXPECT_NE(msg(with("WORLD_SIZE", nullptr)).find("WORLD_SIZE is not set"), std::string::npos);
  EXPECT_NE(msg(with("MASTER_PORT", "70000")).find("1..65535"), std::string::npos);
  EXPECT_NE(msg(with("WORLD_SIZE", "0")).find("at least 1"), std::string::npos);
}

TEST(DistEnv, Slurm) {
  const auto e = read_env(vars({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                                {"SLURM_JOB_NODELIST", "gpu[07-08,12],login1"}, {"SLURM_JOB_ID", "123456"}}));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->launcher, "slurm");
  EXPECT_EQ(e->rank, 5);
  EXPECT_EQ(e->world_size, 8);
  EXPECT_EQ(e->local_rank, 1);
  EXPECT_EQ(e->master_addr, "gpu07");
  EXPECT_EQ(e->master_port, 20000 + 123456 % 20000);
  // MASTER_ADDR and MASTER_PORT, where a batch script sets them, win.
  const auto f = read_env(vars({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "a[1-2]"},
                                {"MASTER_ADDR", "b"}, {"MASTER_PORT", "1234"}}));
  EXPECT_EQ(f->master_addr, "b");
  EXPECT_EQ(f->master_port, 1234);
  EXPECT_THROW(read_env(vars({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}})), std::invalid_argument);
  // torchrun's variables come first (torchrun inside an allocation).
  EXPECT_EQ(read_env(vars({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"RANK", "1"}, {"WORLD_SIZE", "4"},
                           {"MASTER_ADDR", "x"}, {"MASTER_PORT", "2"}}))->launcher,
            "torchrun");
}

TEST(DistEnv, Nodelist) {
  using V = std::vector<std::string>;
  EXPECT_EQ(expand_nodelist("node1"), V{"node1"});
  EXPECT_EQ(expand_nodelist("node[01-04,07]"), (V{"node01", "node02", "node03", "node04", "node07"}));
  EXPECT_EQ(expand_nodelist("a[9-11],b,c[3]"), (V{"a9", "a10", "a11", "b", "c3"}));
  EXPECT_EQ(expand_nodelist("r[1-2]n[1-2]"), (V{"r1n1", "r1n2", "r2n1", "r2n2"}));
  EXPECT_EQ(expand_nodelist("gpu-[008-010]-ib"), (V{"gpu-008-ib", "gpu-009-ib", "gpu-010-ib"}));
  for (const char* bad : {"", "a[", "a[1-", "a[2-1]", "a[x]", "a,,b", "a,", "a]", "a[]"})
    EXPECT_THROW(expand_nodelist(bad), std::invalid_argument) << bad;
}

// `world` ranks as threads, each running f(group).
template <class F>
void ranks(int world, F f) {
  // Below Linux's ephemeral ports (32768 up), which the ranks' own connections take.
  const int port = 20000 + static_cast<int>(::getpid() % 12000);
  std::vector<std::thread> t;
  std::vector<std::string> errors(world);
  for (int r = 0; r < world; ++r)
    t.emplace_back([&, r] {
      try {
        aq::dist::Env e;
        e.rank = r, e.world_size = world, e.master_addr = "127.0.0.1", e.master_port = port;
        auto g = aq::dist::connect(e, c10::Device(c10::kCPU), std::chrono::seconds(60));
        f(*g);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& x : t) x.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(DistGroup, Collectives) {
  ranks(3, [](aq::dist::Group& g) {
    std::vector<at::Tensor> t{torch::full({2}, double(g.rank() + 1), torch::kDouble)};
    g.all_reduce_sum(t);
    EXPECT_EQ(t[0][0].item<double>(), 6.0);
    std::vector<at::Tensor> m{torch::full({1}, int64_t(g.rank() * 10), torch::kLong)};
    g.all_reduce_max(m);
    EXPECT_EQ(m[0].item<int64_t>(), 20);
    auto all = g.all_gather(torch::full({2}, float(g.rank())));
    EXPECT_TRUE(torch::equal(all, torch::tensor({0.f, 0.f, 1.f, 1.f, 2.f, 2.f}).view({3, 2})));
    auto a = torch::full({3}, float(g.rank())), b = torch::full({2}, int64_t(g.rank()));
    aq::dist::broadcast_from_root(g, {a, b});
    EXPECT_EQ(a.sum().item<float>(), 0.f);
    EXPECT_EQ(b.sum().item<int64_t>(), 0);
  });
}

// Two ranks with half a batch each, gradients averaged by the reducer: the
// gradient of the whole batch's mean loss.  Not bit-exact: the sum of two
// half-batch means divided by two rounds differently from one mean.
TEST(DistGroup, ReducerAveragesGradients) {
  torch::manual_seed(7);
  auto x = torch::randn({8, 5}), y = torch::randint(0, 3, {8});
  auto build = [] {
    torch::manual_seed(1);
    return torch::nn::Sequential(torch::nn::Linear(5, 16), torch::nn::ReLU(), torch::nn::Linear(16, 3));
  };
  auto whole = build();
  torch::nn::functional::cross_entropy(whole->forward(x), y).backward();
  std::vector<std::vector<at::Tensor>> grads(2);
  // Built here: the threads would seed and draw from the one process generator at once.
  std::vector<torch::nn::Sequential> models{build(), build()};
  ranks(2, [&](aq::dist::Group& g) {
    auto& m = models[g.rank()];
    aq::dist::GradientReducer reducer(g, m->parameters(), /*bucket_mb=*/1);
    for (int step = 0; step < 2; ++step) {  // the second after the buckets' rebuild
      m->zero_grad();
      auto out = m->forward(x.narrow(0, g.rank() * 4, 4));
      auto loss = torch::nn::functional::cross_entropy(out, y.narrow(0, g.rank() * 4, 4));
      reducer.prepare(loss);
      loss.backward();
    }
    for (auto& p : m->parameters()) grads[g.rank()].push_back(p.grad().clone());
  });
  const auto ps = whole->parameters();
  ASSERT_EQ(grads[0].size(), ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_TRUE(torch::equal(grads[0][i], grads[1][i]));
    EXPECT_TRUE(torch::allclose(grads[0][i], ps[i].grad(), 1e-5, 1e-6))
        << "parameter " << i << ": reduced " << grads[0][i].norm().item<double>() << ", whole batch "
        << ps[i].grad().norm().item<double>() << ", max diff " << (grads[0][i] - ps[i].grad()).abs().max().item<double>();
  }
}

TEST(DistGroup, UnreachableMasterTimesOut) {
  aq::dist::Env e;
  e.rank = 1, e.world_size = 2, e.master_addr = "127.0.0.1", e.master_port = 9;  // discard: nobody listens
  try {
    aq::dist::connect(e, c10::Device(c10::kCPU), std::chrono::milliseconds(1500));
    FAIL() << "connected";
  } catch (const std::runtime_error& err) {
    EXPECT_NE(std::string(err.what()).find("rendezvous at 127.0.0.1:9"), std::string::npos) << err.what();
  }
}

// --- Adaptive precision across ranks -----------------------------------------------

// Every aq layer's adaptive state by layer name.
struct Adaptive {
  std::map<std::string, torch::Tensor> stat, mean;
  std::map<std::string, double> budget;
};
Adaptive adaptive_of(torch::nn::Module& model) {
  Adaptive a;
  for (const auto& item : model.named_modules()) {
    auto* q = dynamic_cast<aq::QLayer*>(item.value().get());
    if (!q) continue;
    const aq::LayerState& st = *q->state();
    if (st.sample_stat.defined()) a.stat[item.key()] = st.sample_stat.clone();
    if (st.grad_mean.defined()) a.mean[item.key()] = st.grad_mean.clone();
    if (aq::adaptive(q->config()) && st.last_bits.defined() && !st.batch_norm) a.budget[item.key()] = st.budget;
  }
  for (const auto& [name, t] : aq::adaptive_state(model))  // pending (deferred) budgets too
    if (name.size() > 15 && name.compare(name.size() - 15, 15, ".aq_budget_next") == 0)
      a.budget[name] = t.item<double>();
  return a;
}

// Three aq linear layers: their output gradients come from the weights and
// the exact forward alone (a linear layer's saved input only enters its
// weight gradient; ReLU's mask is exact), not from how activations were
// compressed.  So with fixed weights, ranks that allocate bits over their own
// half-batch see the same output gradients as one process over the whole.
struct Mlp : aq::models::Model {
  aq::QLinear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  aq::QReLU relu1, relu2;
  Mlp() {
    fc1 = register_module("fc1", aq::QLinear(12, 32));
    relu1 = register_module("relu1", aq::QReLU());
    fc2 = register_module("fc2", aq::QLinear(32, 32));
    relu2 = register_module("relu2", aq::QReLU());
    fc3 = register_module("fc3", aq::QLinear(32, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) override { return fc3(relu2(fc2(relu1(fc1(x))))); }
};

// A dataset of 16 samples, a new permutation each epoch, global batches of
// 8: over two epochs every sample moves to whichever rank its new place
// gives it.  indices(): rank r's part of step s's global batch.
struct Samples {
  torch::Tensor x = torch::randn({16, 12}, torch::TensorOptions().dtype(torch::kFloat));
  torch::Tensor y = torch::randint(4, {16}, torch::kLong);
  std::vector<torch::Tensor> order;  // per epoch
  Samples() {
    for (int e = 0; e < 2; ++e) order.push_back(torch::randperm(16, torch::kLong));
  }
  torch::Tensor indices(int step, int rank, int world) const {
    const int64_t b = 8 / world;
    return order[step / 2].narrow(0, (step % 2) * 8 + rank * b, b).clone();
  }
};

// Four L3 steps (two epochs) of rank `rank` of `world` over `data`, the Mlp
// (weights fixed) on `dev`, the step's gather `gather`: the layers' adaptive
// state.  Ranks as threads build their models one at a time (the generator
// is the process's).
Adaptive run_mlp(const Samples& data, int world, int rank, const aq::AllGather& gather, const torch::Device& dev) {
  static std::mutex seed_mu;
  const aq::QuantConfig c;  // L3: 2 of 8 bits, per sample and per layer, gradient statistics
  std::shared_ptr<Mlp> m;
  {
    std::lock_guard<std::mutex> lock(seed_mu);
    torch::manual_seed(5);
    m = std::make_shared<Mlp>();
  }
  aq::QModule(*m, c);
  m->to(dev);
  aq::train::StepOptions so;
  so.quant = c;
  so.index_bound = 16;
  so.all_gather = gather;
  aq::train::Step step(*m, dev, so);
  for (int s = 0; s < 4; ++s) {
    const auto idx = data.indices(s, rank, world);
    step(data.x.index({idx}).to(dev), data.y.index({idx}), idx);
  }
  Adaptive a = adaptive_of(*m);
  for (auto* map : {&a.stat, &a.mean})
    for (auto& [name, t] : *map) t = t.cpu();
  return a;
}

// Two ranks at batch 4 after L3 steps that cover two epochs: the per-sample
// gradient statistics (keyed by dataset index), batch means and per-layer
// budgets are bit-identical on both ranks, and the same as one process's at
// batch 8 over the same samples: the statistics to float tolerance, as the
// ranks' output gradients of half-batch losses (scaled back by 1/ranks^2)
// equal the whole batch's; the budgets, means of whole bits allocated from
// sensitivities that differ by rounding only, exactly.
// Weights stay fixed (no update): with updates, the compressed activations,
// whose bits each rank allocates over its own half-batch, would move the
// weights apart, and with them the gradients the statistics record.
TEST(DistAdaptive, StatisticsAndBudgetsFollowSamplesAcrossRanks) {
  torch::manual_seed(11);
  const Samples data;
  const aq::QuantConfig c;
  ASSERT_TRUE(aq::adaptive(c) && c.perlayer && c.usegradient);
  auto run = [&](int world, int rank, const aq::AllGather& gather) {
    return run_mlp(data, world, rank, gather, torch::kCPU);
  };
  const Adaptive one = run(1, 0, {});
  ASSERT_EQ(one.stat.size(), 3u);
  ASSERT_EQ(one.budget.size(), 6u);  // budgets applied and pending
  for (const auto& [name, t] : one.stat)
    EXPECT_TRUE(t.size(0) >= 16 && (t.narrow(0, 0, 16) >= 0).all().item<bool>()) << name << ": every sample seen";
  double moved = 0;  // budgets away from cabits: the reallocation decided something
  for (const auto& [name, b] : one.budget) moved += std::abs(b - c.cabits);
  EXPECT_GT(moved, 0.1);

  std::vector<Adaptive> two(2);
  ranks(2, [&](aq::dist::Group& g) {
    two[g.rank()] = run(2, static_cast<int>(g.rank()), [&g](const at::Tensor& t) { return g.all_gather(t); });
  });
  ASSERT_EQ(two[0].stat.size(), 3u);
  for (const auto& [name, t] : two[0].stat) {
    EXPECT_TRUE(torch::equal(two[1].stat.at(name), t)) << name << ": ranks differ";
    EXPECT_TRUE(torch::allclose(t, one.stat.at(name), 1e-5, 1e-12))
        << name << ": max diff " << (t - one.stat.at(name)).abs().max().item<float>();
  }
  for (const auto& [name, t] : two[0].mean) {
    EXPECT_TRUE(torch::equal(two[1].mean.at(name), t)) << name;
    EXPECT_TRUE(torch::allclose(t, one.mean.at(name), 1e-5, 1e-12)) << name;
  }
  EXPECT_EQ(two[0].budget, two[1].budget);
  EXPECT_EQ(two[0].budget, one.budget);
}

class DistAdaptiveDevice : public DeviceTest {};
AQ_PER_DEVICE(DistAdaptiveDevice);

// A gather over one rank (each tensor as it is) changes nothing, bit for
// bit: the shared update and the allocation over gathered units are the
// process's own, on a device too (indices gathered there, the tables sized
// by the dataset's size instead of read-back indices).
TEST_P(DistAdaptiveDevice, GatherOverOneRankChangesNothing) {
  const Samples data;
  const Adaptive own = run_mlp(data, 1, 0, {}, dev());
  const Adaptive gathered = run_mlp(data, 1, 0, [](const at::Tensor& t) { return t.unsqueeze(0); }, dev());
  ASSERT_EQ(own.stat.size(), 3u);
  for (const auto& [name, t] : own.stat) {
    // Gathered on a device, the tables were sized to the dataset at once.
    const at::Tensor g = gathered.stat.at(name);
    ASSERT_GE(g.size(0), 16) << name;
    ASSERT_GE(t.size(0), 16) << name;
    EXPECT_TRUE(torch::equal(g.narrow(0, 0, 16), t.narrow(0, 0, 16))) << name;
  }
  for (const auto& [name, t] : own.mean) EXPECT_TRUE(torch::equal(gathered.mean.at(name), t)) << name;
  EXPECT_EQ(gathered.budget, own.budget);
}

// Two ranks training preact_resnet20 at L3 (SGD, gradients averaged, each
// rank's own stochastic rounding and BatchNorm batch): after a few steps
// every rank holds the same per-sample statistics, batch means and
// per-layer budgets, bit for bit.  Not compared with one process: the
// ranks' compressed activations differ from its, and so do the gradients.
TEST(DistAdaptive, RanksTrainingAgree) {
  std::vector<Adaptive> two(2);
  ranks(2, [&](aq::dist::Group& g) {
    const aq::QuantConfig c;
    static std::mutex seed_mu;
    aq::models::ModelPtr m;
    {
      std::lock_guard<std::mutex> lock(seed_mu);
      torch::manual_seed(3);
      m = aq::models::build("preact_resnet20", 3, 4, c);
    }
    m->train();
    aq::dist::broadcast_from_root(g, m->parameters());
    aq::train::SGD opt(m->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    aq::dist::GradientReducer reducer(g, m->parameters());
    aq::train::StepOptions so;
    so.quant = c;
    so.index_bound = 64;
    so.before_backward = [&reducer](const torch::Tensor& loss) { reducer.prepare(loss); };
    so.all_gather = [&g](const at::Tensor& t) { return g.all_gather(t); };
    aq::train::Step step(*m, torch::kCPU, so);
    for (int s = 0; s < 3; ++s) {
      const auto idx = torch::arange(4, torch::kLong) + 8 * s + 4 * g.rank();
      // Each rank's own images, from its own generator (the process's is shared by the threads).
      auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + 10 * s + g.rank());
      step(torch::randn({4, 3, 8, 8}, gen), torch::randint(4, {4}, gen, torch::kLong), idx, &opt);
    }
    two[g.rank()] = adaptive_of(*m);
  });
  ASSERT_GT(two[0].stat.size(), 10u);
  for (const auto& [name, t] : two[0].stat) {
    EXPECT_TRUE(torch::equal(two[1].stat.at(name), t)) << name;
    EXPECT_EQ((t >= 0).sum().item<int64_t>(), 24) << name << ": the 24 samples of both ranks seen";
  }
  for (const auto& [name, t] : two[0].mean) EXPECT_TRUE(torch::equal(two[1].mean.at(name), t)) << name;
  ASSERT_GT(two[0].budget.size(), 10u);
  EXPECT_EQ(two[0].budget, two[1].budget);
}

}  // namespace
