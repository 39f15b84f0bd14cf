// The training step as a CUDA graph (StepOptions::cuda_graphs): replays
// compute what eager steps compute, random numbers included (fresh in every
// replay, so stochastic rounding stays unbiased), adaptive levels recapture
// at each refresh, and whatever cannot be captured runs eagerly with a reason.
#include "aq/adaptive.h"
#include "aq/models.h"
#include "aq/modules.h"
#include "aq/optim.h"
#include "aq/step.h"
#include "device_test.h"

#include <ATen/Context.h>
#include <ATen/core/CachingHostAllocator.h>

#include <atomic>
#include <optional>
#include <thread>

namespace {

class StepGraphs : public DeviceTest {};
AQ_PER_DEVICE(StepGraphs);

struct Trainee {
  aq::models::ModelPtr model;
  std::unique_ptr<torch::optim::Optimizer> opt;
  std::unique_ptr<aq::train::Step> step;
};

// With aq's SGD, or its AdamW with `adamw`.
Trainee make(const std::string& level, const torch::Device& dev, aq::train::StepOptions so,
             const std::optional<torch::optim::AdamWOptions>& adamw = std::nullopt) {
  Trainee r;
  torch::manual_seed(0);
  aq::QuantConfig c;
  aq::models::ModelOptions mo;
  if (level == "exact" || level == "ckpt")
    c.scope = aq::Scope::kNone;
  else
    c = aq::QuantConfig::for_level(aq::parse_level(level));
  mo.recompute_blocks = level == "ckpt";  // every block recomputed in backward
  r.model = aq::models::build("preact_resnet20", 1, 10, mo, c);
  r.model->to(dev);
  r.model->train();
  if (adamw)
    r.opt = std::make_unique<aq::train::AdamW>(r.model->parameters(), *adamw);
  else
    r.opt = std::make_unique<aq::train::SGD>(r.model->parameters(),
                                             torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(5e-4));
  so.quant = c;
  r.step = std::make_unique<aq::train::Step>(*r.model, dev, so);
  return r;
}

// Batch `i` of a fixed sequence: n samples of a dataset of 64.
struct Batch {
  torch::Tensor x, y, idx;
};
Batch batch(int i, int64_t n, const torch::Device& dev) {
  torch::manual_seed(100 + i);
  Batch b;
  b.x = torch::randn({n, 1, 28, 28}).to(dev);
  b.y = torch::randint(10, {n}, torch::kLong);
  b.idx = (torch::arange(n, torch::kLong) + 8 * i) % 64;
  return b;
}

double max_diff(torch::nn::Module& a, torch::nn::Module& b) {
  const auto pa = a.parameters(), pb = b.parameters();
  double d = 0;
  for (size_t i = 0; i < pa.size(); ++i) d = std::max(d, (pa[i] - pb[i]).abs().max().item<double>());
  return d;
}

TEST_P(StepGraphs, ReplaysComputeWhatEagerStepsCompute) {
  if (!dev().is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  const DeterministicCudnn det;
  // exact, exact with its blocks recomputed in backward (their BatchNorm
  // statistics put back after the recomputation), and L2: 4-bit stochastic
  // rounding everywhere, no reallocation, so that eager and captured runs
  // are the same computation.  A replay reusing its capture's random
  // numbers would differ from the eager run by whole quantization steps.
  for (const std::string level : {"exact", "ckpt", "L2"}) {
    aq::train::StepOptions eager_o, graph_o;
    graph_o.cuda_graphs = true;
    graph_o.graph_warmup = 2;
    graph_o.index_bound = 64;
    Trainee e = make(level, dev(), eager_o), g = make(level, dev(), graph_o);
    ASSERT_EQ(g.step->eager_reason(), "") << level;
    torch::manual_seed(7);
    std::vector<double> eager_loss;
    for (int i = 0; i < 7; ++i) {
      const Batch b = batch(i, 16, dev());
      eager_loss.push_back((*e.step)(b.x, b.y, b.idx, e.opt.get()).loss.item<double>());
    }
    torch::manual_seed(7);
    int replayed = 0;
    for (int i = 0; i < 7; ++i) {
      const Batch b = batch(i, 16, dev());
      const auto r = (*g.step)(b.x, b.y, b.idx, g.opt.get());
      replayed += r.replayed;
      EXPECT_NEAR(r.loss.item<double>(), eager_loss[i], 1e-5 * std::max(1.0, std::abs(eager_loss[i])))
          << level << " step " << i;
    }
    EXPECT_EQ(replayed, 5) << level;
    EXPECT_EQ(g.step->captures(), 1) << level;
    EXPECT_LE(max_diff(*e.model, *g.model), 1e-5) << level;
    // The buffers a replay updates in place (BatchNorm's running statistics) moved as eagerly.
    const auto be = e.model->buffers(), bg = g.model->buffers();
    for (size_t i = 0; i < be.size(); ++i)
      EXPECT_LE((be[i].to(torch::kDouble) - bg[i].to(torch::kDouble)).abs().max().item<double>(), 1e-5)
          << level << " buffer " << i;
  }
}

// AdamW's update is captured too (its learning rate and step counts read
// from device memory): replays compute what eager steps compute with the
// learning rate changing at every step, and an eager step between replays
// (an epoch's last, smaller batch) counts steps as the replays do.
TEST_P(StepGraphs, AdamWUpdateIsCapturedAndReplaysComputeWhatEagerStepsCompute) {
  if (!dev().is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  const DeterministicCudnn det;
  aq::train::StepOptions eager_o, graph_o;
  graph_o.cuda_graphs = true;
  graph_o.graph_warmup = 2;
  graph_o.index_bound = 64;
  const auto adamw = torch::optim::AdamWOptions(1e-3).weight_decay(0.05).amsgrad(true);
  Trainee e = make("exact", dev(), eager_o, adamw), g = make("exact", dev(), graph_o, adamw);
  ASSERT_EQ(g.step->eager_reason(), "");
  // Full batches but the 8th: replays from the 3rd, the 8th eager, a new capture at the 9th.
  auto run = [&](Trainee& t, std::vector<double>& losses) {
    int replayed = 0;
    for (int i = 0; i < 10; ++i) {
      aq::train::set_lr(*t.opt, 1e-3 * (i + 1) / 10);
      const Batch b = batch(i, i == 7 ? 10 : 16, dev());
      const auto r = (*t.step)(b.x, b.y, b.idx, t.opt.get());
      EXPECT_TRUE(r.updated) << i;
      losses.push_back(r.loss.item<double>());
      replayed += r.replayed;
    }
    return replayed;
  };
  std::vector<double> eager_loss, graph_loss;
  EXPECT_EQ(run(e, eager_loss), 0);
  EXPECT_EQ(run(g, graph_loss), 7);
  EXPECT_EQ(g.step->eager_reason(), "");
  EXPECT_EQ(g.step->captures(), 2);
  for (size_t i = 0; i < eager_loss.size(); ++i)
    EXPECT_NEAR(graph_loss[i], eager_loss[i], 1e-5 * std::max(1.0, std::abs(eager_loss[i]))) << "step " << i;
  EXPECT_LE(max_diff(*e.model, *g.model), 1e-5);
  // Every parameter counted its 10 steps on the host, where checkpoints read them.
  for (const auto& p : g.model->parameters()) {
    const auto& st = static_cast<const torch::optim::AdamWParamState&>(*g.opt->state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(st.step(), 10);
  }
}

TEST_P(StepGraphs, AdaptiveLevelsRecaptureAtEachRefreshAndOnNewShapes) {
  if (!dev().is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  aq::train::StepOptions o;
  o.cuda_graphs = true;
  o.graph_warmup = 2;
  o.graph_refresh = 3;
  o.index_bound = 64;
  Trainee g = make("L3", dev(), o);
  ASSERT_EQ(g.step->eager_reason(), "");
  for (int i = 0; i < 11; ++i) {
    const Batch b = batch(i, 16, dev());
    const auto r = (*g.step)(b.x, b.y, b.idx, g.opt.get());
    ASSERT_TRUE(std::isfinite(r.loss.item<double>())) << i;
    EXPECT_EQ(r.replayed, i >= 2) << i;
  }
  // Captures at steps 2, 5 and 8 (every 3 replays).
  EXPECT_EQ(g.step->captures(), 3);
  // Each capture reallocated bits between layers from the last step's statistics.
  int reallocated = 0;
  for (const auto& l : aq::layer_bits(*g.model)) reallocated += std::abs(l.budget - 2.0) > 1e-9;
  EXPECT_GT(reallocated, 0);
  // Every per-sample statistic was sized for the dataset before a capture.
  for (const auto& m : g.model->modules(false)) {
    if (auto* q = dynamic_cast<aq::QLayer*>(m.get()); q && q->state()->sample_stat.defined()) {
      EXPECT_GE(q->state()->sample_stat.size(0), 64);
    }
  }
  // An epoch's last, smaller batch runs eagerly; the next full one captures anew.
  const Batch small = batch(11, 10, dev());
  EXPECT_FALSE((*g.step)(small.x, small.y, small.idx, g.opt.get()).replayed);
  const Batch full = batch(12, 16, dev());
  EXPECT_TRUE((*g.step)(full.x, full.y, full.idx, g.opt.get()).replayed);
  EXPECT_EQ(g.step->captures(), 4);
}

// aq-train's loader threads pin their batches while the step is captured.
TEST_P(StepGraphs, CaptureIsNotBrokenByOtherThreadsPinningMemory) {
  if (!dev().is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  aq::train::StepOptions o;
  o.cuda_graphs = true;
  o.graph_warmup = 1;
  o.index_bound = 64;
  Trainee g = make("L3", dev(), o);
  std::atomic<bool> done{false};
  std::thread loader([&] {
    while (!done) {
      // A fresh cudaHostAlloc and cudaFreeHost each time round.
      (void)torch::empty({1 << 20}, torch::TensorOptions().pinned_memory(true));
      at::getHostAllocator(at::kCUDA)->empty_cache();
    }
  });
  int replayed = 0;
  for (int i = 0; i < 6; ++i) {
    const Batch b = batch(i, 16, dev());
    replayed += (*g.step)(b.x, b.y, b.idx, g.opt.get()).replayed;
  }
  done = true;
  loader.join();
  EXPECT_EQ(g.step->eager_reason(), "");
  EXPECT_EQ(replayed, 5);
}

TEST_P(StepGraphs, WhatCannotBeCapturedRunsEagerlyWithAReason) {
  auto reason = [&](const std::string& level, aq::train::StepOptions o) {
    o.cuda_graphs = true;
    Trainee r = make(level, dev(), o);
    const Batch b = batch(0, 8, dev());
    const auto res = (*r.step)(b.x, b.y, b.idx, r.opt.get());
    EXPECT_FALSE(res.replayed);
    EXPECT_TRUE(std::isfinite(res.loss.item<double>()));
    return r.step->eager_reason();
  };
  aq::train::StepOptions o;
  o.index_bound = 64;
  if (!dev().is_cuda()) {
    EXPECT_NE(reason("L3", o).find("CUDA"), std::string::npos);
    return;
  }
  aq::train::StepOptions fp16 = o;
  fp16.amp = aq::train::Amp::kFloat16;
  EXPECT_NE(reason("L3", fp16).find("fp16"), std::string::npos);
  EXPECT_NE(reason("L4", o).find("host memory"), std::string::npos);
  EXPECT_NE(reason("L3", aq::train::StepOptions{}).find("dataset's size"), std::string::npos);
  // Without per-sample gradient statistics the dataset's size is not needed.
  EXPECT_EQ(reason("L2", aq::train::StepOptions{}), "");
  // Recomputed blocks with dropout read and set the generators' state on the host.
  aq::models::ModelOptions mo;
  mo.layers = 1, mo.width = 32, mo.heads = 4, mo.image_height = mo.image_width = 28;
  mo.dropout = 0.1;
  mo.recompute_blocks = true;
  aq::QuantConfig exact;
  exact.scope = aq::Scope::kNone;
  auto vit = aq::models::build("vit_tiny", 1, 10, mo, exact);
  vit->to(dev());
  vit->train();
  aq::train::StepOptions so;
  so.cuda_graphs = true;
  so.quant = exact;
  EXPECT_NE(aq::train::Step(*vit, dev(), so).eager_reason().find("dropout"), std::string::npos);
}

}  // namespace
