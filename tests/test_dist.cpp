// The launcher's environment, SLURM's host lists, and the process group and
// gradient reducer over Gloo with ranks as threads of this process.
#include "aq/dist.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <map>
#include <string>
#include <thread>

namespace {

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
  const int port = 20000 + static_cast<int>(::getpid() % 20000);
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
  ranks(2, [&](aq::dist::Group& g) {
    auto m = build();
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

}  // namespace
