// The optimizers and what goes with them: aq's multi-tensor AdamW against
// torch::optim::AdamW on each device, its state through a checkpoint, gradient clipping
// against torch::nn::utils::clip_grad_norm_, warm-up and cosine values, the
// per-token loss, and a training step of a token model.
#include "aq/loss.h"
#include "aq/memory.h"
#include "aq/models.h"
#include "aq/optim.h"
#include "aq/step.h"
#include "aq/train.h"
#include "device_test.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Parameters of several shapes (and one that gets no gradient on odd
// steps, so that step counts differ between parameters).
std::vector<torch::Tensor> make_params(uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> ps = {torch::randn({7, 5}), torch::randn({5}), torch::randn({3, 4, 2}),
                                   torch::randn({11})};
  for (auto& p : ps) p.set_requires_grad(true);
  return ps;
}

void set_grads(std::vector<torch::Tensor>& ps, int step) {
  torch::manual_seed(1000 + step);
  for (size_t i = 0; i < ps.size(); ++i) {
    if (i == 3 && step % 2 == 1) {
      ps[i].mutable_grad() = torch::Tensor();
      continue;
    }
    ps[i].mutable_grad() = torch::randn(ps[i].sizes()) * (i + 1);
  }
}

bool bitwise_equal(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.numel() * a.element_size()) == 0;
}

class AdamWEquals : public ::testing::TestWithParam<bool> {};

// The same parameters after every one of 12 steps, bit for bit, and the
// same state, with and without amsgrad, weight decay and lr changes.
TEST_P(AdamWEquals, LibTorchAdamW) {
  const bool amsgrad = GetParam();
  auto mine = make_params(1), theirs = make_params(1);
  auto options = torch::optim::AdamWOptions(3e-3).betas({0.8, 0.95}).eps(1e-6).weight_decay(0.1).amsgrad(amsgrad);
  aq::train::AdamW a(mine, options);
  torch::optim::AdamW b(theirs, options);
  for (int step = 0; step < 12; ++step) {
    set_grads(mine, step);
    set_grads(theirs, step);
    aq::train::set_lr(a, 3e-3 * (step + 1) / 12);
    aq::train::set_lr(b, 3e-3 * (step + 1) / 12);
    a.step();
    b.step();
    for (size_t i = 0; i < mine.size(); ++i)
      ASSERT_TRUE(bitwise_equal(mine[i], theirs[i])) << "step " << step << ", parameter " << i;
  }
  for (size_t i = 0; i < mine.size(); ++i) {
    const auto& sa = static_cast<torch::optim::AdamWParamState&>(*a.state().at(mine[i].unsafeGetTensorImpl()));
    const auto& sb = static_cast<torch::optim::AdamWParamState&>(*b.state().at(theirs[i].unsafeGetTensorImpl()));
    EXPECT_EQ(sa.step(), sb.step());
    EXPECT_EQ(sa.step(), i == 3 ? 6 : 12);
    EXPECT_TRUE(bitwise_equal(sa.exp_avg(), sb.exp_avg()));
    EXPECT_TRUE(bitwise_equal(sa.exp_avg_sq(), sb.exp_avg_sq()));
    if (amsgrad) {
      EXPECT_TRUE(bitwise_equal(sa.max_exp_avg_sq(), sb.max_exp_avg_sq()));
    }
  }
}
INSTANTIATE_TEST_SUITE_P(Optim, AdamWEquals, ::testing::Values(false, true));

// On each device: the same as LibTorch's AdamW there (on CUDA the
// multi-tensor kernels may round differently: to float precision), and
// clipping as LibTorch's.
class OptimOn : public DeviceTest {};
TEST_P(OptimOn, AdamWAndClipping) {
  auto mine = make_params(7), theirs = make_params(7);
  for (auto* ps : {&mine, &theirs})
    for (auto& p : *ps) p = p.detach().to(dev()).requires_grad_(true);
  auto options = torch::optim::AdamWOptions(1e-2).weight_decay(0.1);
  aq::train::AdamW a(mine, options);
  torch::optim::AdamW b(theirs, options);
  for (int step = 0; step < 8; ++step) {
    set_grads(mine, step);
    set_grads(theirs, step);
    for (auto* ps : {&mine, &theirs})
      for (auto& p : *ps)
        if (p.grad().defined()) p.mutable_grad() = p.grad().to(dev());
    const auto norm = aq::train::clip_grad_norm(mine, 2.0);
    EXPECT_EQ(norm.device(), mine[0].device());
    const double want = torch::nn::utils::clip_grad_norm_(theirs, 2.0);
    EXPECT_NEAR(norm.item<double>(), want, 1e-5 * want);
    a.step();
    b.step();
  }
  for (size_t i = 0; i < mine.size(); ++i)
    EXPECT_TRUE(torch::allclose(mine[i], theirs[i], 1e-5, 1e-6)) << i;
}
AQ_PER_DEVICE(OptimOn);

// On each device, as LibTorch's AdamW to float precision (on CUDA the fused
// kernel computes in float), with and without amsgrad, the learning rate
// changing, a parameter without a gradient on odd steps (its own bias
// corrections), and a parameter not dense, which on CUDA the multi-tensor
// kernels update beside the fused ones, holding off a capture (ready()).
TEST_P(OptimOn, AdamWEqualsLibTorchAdamW) {
  for (const bool amsgrad : {false, true}) {
    for (const bool dense : {true, false}) {
      auto mine = make_params(8), theirs = make_params(8);
      for (auto* ps : {&mine, &theirs}) {
        for (auto& p : *ps) p = p.detach().to(dev()).requires_grad_(true);
        if (!dense) ps->push_back(torch::arange(24, opts()).div(10).view({4, 6}).narrow(1, 1, 3).requires_grad_(true));
      }
      ASSERT_EQ(mine.back().is_non_overlapping_and_dense(), dense);
      auto options = torch::optim::AdamWOptions(1e-2).betas({0.8, 0.95}).eps(1e-6).weight_decay(0.1).amsgrad(amsgrad);
      aq::train::AdamW a(mine, options);
      torch::optim::AdamW b(theirs, options);
      for (int step = 0; step < 9; ++step) {
        for (auto* ps : {&mine, &theirs}) {
          set_grads(*ps, step);
          for (auto& p : *ps)
            if (p.grad().defined()) p.mutable_grad() = p.grad().to(dev());
        }
        aq::train::set_lr(a, 1e-2 * (step + 1) / 9);
        aq::train::set_lr(b, 1e-2 * (step + 1) / 9);
        a.step();
        b.step();
        for (size_t i = 0; i < mine.size(); ++i)
          ASSERT_TRUE(torch::allclose(mine[i], theirs[i], 1e-5, 1e-6))
              << "amsgrad " << amsgrad << ", dense " << dense << ", step " << step << ", parameter " << i;
      }
      for (size_t i = 0; i < mine.size(); ++i) {
        const auto& sa = static_cast<torch::optim::AdamWParamState&>(*a.state().at(mine[i].unsafeGetTensorImpl()));
        const auto& sb = static_cast<torch::optim::AdamWParamState&>(*b.state().at(theirs[i].unsafeGetTensorImpl()));
        EXPECT_EQ(sa.step(), i == 3 ? 5 : 9) << i;
        EXPECT_EQ(sa.step(), sb.step()) << i;
        EXPECT_TRUE(torch::allclose(sa.exp_avg(), sb.exp_avg(), 1e-5, 1e-7)) << i;
        EXPECT_TRUE(torch::allclose(sa.exp_avg_sq(), sb.exp_avg_sq(), 1e-5, 1e-9)) << i;
        if (amsgrad) {
          EXPECT_TRUE(torch::allclose(sa.max_exp_avg_sq(), sb.max_exp_avg_sq(), 1e-5, 1e-9)) << i;
        }
      }
      EXPECT_EQ(a.ready(), dev().is_cuda() && dense) << "amsgrad " << amsgrad << ", dense " << dense;
    }
  }
}

// The state as checkpoints keep it, on each device: a run stopped after 6
// steps and continued in a new optimizer from the state on the host ends
// where the uninterrupted one does, bit for bit.  AdamW on CUDA counts
// steps on the device again from the restored counts: not ready() to be
// captured before its first step.
TEST_P(OptimOn, OptimizerStateRoundTrip) {
  enum class Kind { kSGD, kAdamW, kAMSGrad };
  for (const Kind kind : {Kind::kSGD, Kind::kAdamW, Kind::kAMSGrad}) {
    const bool adamw = kind != Kind::kSGD;
    auto make = [&](std::vector<torch::Tensor> ps) -> std::unique_ptr<torch::optim::Optimizer> {
      aq::train::OptimizerOptions o;
      o.kind = adamw ? aq::train::OptimizerKind::kAdamW : aq::train::OptimizerKind::kSGD;
      o.lr = 1e-2;
      if (kind != Kind::kAMSGrad) return aq::train::make_optimizer(std::move(ps), o);
      return std::make_unique<aq::train::AdamW>(
          std::move(ps), torch::optim::AdamWOptions(o.lr).weight_decay(o.weight_decay).amsgrad(true));
    };
    auto whole = make_params(2), part = make_params(2);
    for (auto* ps : {&whole, &part})
      for (auto& p : *ps) p = p.detach().to(dev()).requires_grad_(true);
    auto a = make(whole), b = make(part);
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (size_t i = 0; i < part.size(); ++i) named.emplace_back("p" + std::to_string(i), part[i]);
    auto set_grads_on = [&](std::vector<torch::Tensor>& ps, int step) {
      set_grads(ps, step);
      for (auto& p : ps)
        if (p.grad().defined()) p.mutable_grad() = p.grad().to(dev());
    };
    for (int step = 0; step < 10; ++step) {
      set_grads_on(whole, step);
      aq::train::set_lr(*a, 1e-2 * (10 - step) / 10);
      a->step();
      if (step == 6) {  // what a checkpoint keeps, into a fresh optimizer
        auto saved = aq::train::optimizer_state(*b, named);
        EXPECT_EQ(saved.size(), kind == Kind::kSGD ? 4u : kind == Kind::kAdamW ? 4u * 3 : 4u * 4);
        for (auto& [name, t] : saved) t = t.to(torch::kCPU).clone();
        b = make(part);
        aq::train::load_optimizer_state(*b, named, saved, "test.h5");
        if (adamw) {
          EXPECT_FALSE(dynamic_cast<aq::train::GraphSafeOptimizer&>(*b).ready());
        }
      }
      set_grads_on(part, step);
      aq::train::set_lr(*b, 1e-2 * (10 - step) / 10);
      b->step();
      if (adamw && step == 6) {
        EXPECT_EQ(dynamic_cast<aq::train::GraphSafeOptimizer&>(*b).ready(), dev().is_cuda());
      }
    }
    for (size_t i = 0; i < whole.size(); ++i)
      EXPECT_TRUE(bitwise_equal(whole[i].cpu(), part[i].cpu())) << static_cast<int>(kind) << " parameter " << i;
  }
}

// A bad entry is refused, naming the file.
TEST(Optim, OptimizerStateRefusesBadEntries) {
  auto ps = make_params(3);
  aq::train::OptimizerOptions o;
  o.kind = aq::train::OptimizerKind::kAdamW;
  auto opt = aq::train::make_optimizer(ps, o);
  std::vector<std::pair<std::string, torch::Tensor>> named = {{"w", ps[0]}};
  aq::ckpt::Tensors bad = {{"w.step", torch::full({}, 0, torch::kInt64)}};
  try {
    aq::train::load_optimizer_state(*opt, named, bad, "x.h5");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "x.h5: optimizer state step of 'w' is not a count of 1 or more");
  }
  bad = {{"w.step", torch::full({}, 3, torch::kInt64)}, {"w.exp_avg", torch::zeros({2})}};
  try {
    aq::train::load_optimizer_state(*opt, named, bad, "x.h5");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "x.h5: optimizer state exp_avg of 'w' has shape [2]");
  }
}

// As torch.nn.utils.clip_grad_norm_: the norm before clipping returned,
// gradients scaled down only when above the limit.
TEST(Optim, ClipGradNormEqualsLibTorch) {
  for (double max_norm : {0.5, 1e6}) {
    auto mine = make_params(4), theirs = make_params(4);
    set_grads(mine, 0);
    set_grads(theirs, 0);
    const auto norm = aq::train::clip_grad_norm(mine, max_norm);
    const double want = torch::nn::utils::clip_grad_norm_(theirs, max_norm);
    EXPECT_NEAR(norm.item<double>(), want, 1e-5 * want);
    double after = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_TRUE(torch::allclose(mine[i].grad(), theirs[i].grad(), 1e-6, 0)) << i;
      after += mine[i].grad().pow(2).sum().item<double>();
    }
    if (max_norm < want) EXPECT_NEAR(std::sqrt(after), max_norm, 1e-5);
    else EXPECT_NEAR(std::sqrt(after), want, 1e-4);
  }
  std::vector<torch::Tensor> none = {torch::zeros({2}, torch::requires_grad())};
  EXPECT_FALSE(aq::train::clip_grad_norm(none, 1.0).defined());
}

// Warm-up in steps, then cosine to 0 at the last step.
TEST(Optim, WarmupStepsThenCosine) {
  aq::train::LrSchedule s;
  s.kind = aq::train::Schedule::kCosine;
  s.lr = 6e-4;
  s.warmup_steps = 10;
  s.epochs = 5;
  const int64_t total = 110, per_epoch = 22;
  EXPECT_DOUBLE_EQ(s.at(0, total, per_epoch), 6e-4 / 10);
  EXPECT_DOUBLE_EQ(s.at(4, total, per_epoch), 6e-4 * 5 / 10);
  EXPECT_DOUBLE_EQ(s.at(9, total, per_epoch), 6e-4);
  EXPECT_DOUBLE_EQ(s.at(10, total, per_epoch), 6e-4);
  EXPECT_NEAR(s.at(60, total, per_epoch), 3e-4, 1e-15);
  EXPECT_NEAR(s.at(35, total, per_epoch), 3e-4 * (1 + std::cos(M_PI / 4)), 1e-15);
  EXPECT_NEAR(s.at(110, total, per_epoch), 0, 1e-15);
  for (int64_t t = 11; t < total; ++t) EXPECT_LT(s.at(t, total, per_epoch), s.at(t - 1, total, per_epoch)) << t;
  // --warmup in epochs still works, and warmup_steps takes its place.
  s.warmup_steps = 0;
  s.warmup = 1;
  EXPECT_DOUBLE_EQ(s.at(0, total, per_epoch), 6e-4 / 22);
  s.kind = aq::train::Schedule::kConstant;
  s.warmup_steps = 4;
  EXPECT_DOUBLE_EQ(s.at(1, total, per_epoch), 6e-4 / 2);
  EXPECT_DOUBLE_EQ(s.at(50, total, per_epoch), 6e-4);
}

// Cross-entropy per token: the mean (or sum) over every token of -log
// softmax at its target, and the correct count over tokens.
TEST(Optim, PerTokenLoss) {
  torch::manual_seed(5);
  const auto logits = torch::randn({3, 7, 11});
  const auto targets = torch::randint(0, 11, {3, 7});
  double sum = 0;
  int64_t hits = 0;
  const auto lsm = torch::log_softmax(logits.to(torch::kDouble), -1);
  for (int b = 0; b < 3; ++b)
    for (int t = 0; t < 7; ++t) {
      const int64_t y = targets[b][t].item<int64_t>();
      sum -= lsm[b][t][y].item<double>();
      hits += logits[b][t].argmax().item<int64_t>() == y;
    }
  EXPECT_NEAR(aq::train::cross_entropy(logits, targets).item<double>(), sum / 21, 1e-5);
  EXPECT_NEAR(aq::train::cross_entropy(logits, targets, 0, true).item<double>(), sum, 1e-4);
  EXPECT_EQ(aq::train::correct(logits, targets).item<int64_t>(), hits);
  // Images: as LibTorch's cross-entropy.
  const auto l2 = torch::randn({4, 5});
  const auto y2 = torch::randint(0, 5, {4});
  EXPECT_TRUE(torch::allclose(aq::train::cross_entropy(l2, y2, 0.1),
                              torch::nn::functional::cross_entropy(
                                  l2, y2, torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1))));
  EXPECT_THROW(aq::train::cross_entropy(logits, targets.flatten()), std::invalid_argument);
  EXPECT_TRUE(aq::train::takes_tokens("gpt_small"));
  EXPECT_FALSE(aq::train::takes_tokens("preact_resnet20"));
}

// A token model of the smallest kind (an embedding and a linear layer) for
// the step's token path; the library's own models are tested elsewhere.
class TinyLM : public aq::models::Model {
 public:
  TinyLM() {
    emb = register_module("emb", torch::nn::Embedding(256, 16));
    out = register_module("out", torch::nn::Linear(16, 256));
  }
  torch::Tensor forward(const torch::Tensor& x) override { return out(emb(x)); }
  torch::nn::Embedding emb{nullptr};
  torch::nn::Linear out{nullptr};
};

// The step on tokens: logits [B, T, V], per-token loss, AdamW with clipping
// learning a repeating sequence.
TEST(Optim, TokenStepLearns) {
  aq::install_cpu_memory_counter();
  torch::manual_seed(6);
  TinyLM model;
  aq::train::StepOptions so;
  so.quant.scope = aq::Scope::kNone;
  so.clip_grad_norm = 1.0;
  aq::train::Step step(model, torch::kCPU, so);
  aq::train::OptimizerOptions oo;
  oo.kind = aq::train::OptimizerKind::kAdamW;
  oo.lr = 3e-2;
  oo.weight_decay = 0.01;
  auto opt = aq::train::make_optimizer(model.parameters(), oo);
  const auto seq = torch::arange(0, 33, torch::kInt64).remainder(5) + 97;  // "abcdeabcde..."
  const auto x = seq.narrow(0, 0, 32).view({2, 16}), y = seq.narrow(0, 1, 32).view({2, 16});
  const auto idx = torch::arange(2, torch::kInt64);
  auto first = step(x, y, idx, opt.get());
  ASSERT_EQ(first.logits.sizes(), (std::vector<int64_t>{2, 16, 256}));
  EXPECT_NEAR(first.loss.item<double>(), aq::train::cross_entropy(first.logits, y).item<double>(), 1e-4);
  aq::train::StepResult last;
  for (int i = 0; i < 60; ++i) last = step(x, y, idx, opt.get());
  EXPECT_LT(last.loss.item<double>(), 0.1 * first.loss.item<double>());
  EXPECT_EQ(aq::train::correct(last.logits, y).item<int64_t>(), 32);
}

// A text run's row: per-token columns, perplexities from the losses, and
// the values a checkpoint keeps give the same line back (resume).
TEST(Optim, TextRowsOfTheTsv) {
  aq::train::EpochRow r;
  r.text = true;
  r.epoch = 2, r.step = 40, r.lr = 3e-4, r.train_loss = 1.5, r.train_acc = 55.5, r.val_loss = 2.0, r.val_top1 = 44.25;
  r.img_per_s = 12345.6, r.act_mb = 10.5, r.peak_mb = 20.25;
  const auto& cols = aq::train::EpochRow::columns(true);
  ASSERT_EQ(cols.size(), r.values().size());
  EXPECT_EQ(cols[4], "train_ppl");
  EXPECT_EQ(cols[9], "tok_per_s");
  const std::string line = r.tsv();
  EXPECT_EQ(line, "2\t40\t0.0003\t1.5000\t4.482\t55.50\t2.0000\t7.389\t44.25\t12345.6\t10.50\t20.25\n");
  EXPECT_EQ(aq::train::EpochRow::from_values(r.values(), true).tsv(), line);
  aq::train::EpochRow img = r;
  img.text = false;
  EXPECT_EQ(aq::train::EpochRow::columns(false).size(), img.values().size());
  EXPECT_EQ(aq::train::EpochRow::from_values(img.values(), false).tsv(), img.tsv());
}

}  // namespace
