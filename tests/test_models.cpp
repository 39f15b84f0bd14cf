// ActNN's architectures: layouts and names (torchvision's for the
// ImageNet-style nets), shapes, what -c changes, the memory they hold,
// loading a state into them, and their blocks recomputed in backward.
#include "aq/adaptive.h"
#include "aq/models.h"
#include "aq/modules.h"
#include "aq/evaluate.h"
#include "aq/loss.h"
#include "aq/memory.h"
#include "aq/optim.h"
#include "aq/step.h"
#include "device_test.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdio>

namespace {

class Models : public DeviceTest {};
AQ_PER_DEVICE(Models);

int64_t count(const aq::models::Model& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

TEST(ModelsLayout, ParameterCountsAndNamesMatchTheReference) {
  // torchvision's resnet18/50 at 1000 classes, and the pre-activation
  // ResNets' published sizes (0.27M for depth 20, 1.7M for 164 on CIFAR-10).
  EXPECT_EQ(count(*aq::models::build("resnet18", 3, 1000)), 11689512);
  EXPECT_EQ(count(*aq::models::build("resnet50", 3, 1000)), 25557032);
  EXPECT_EQ(count(*aq::models::build("resnet34", 3, 1000)), 21797672);
  const int64_t p20 = count(*aq::models::build("preact_resnet20", 3, 10));
  EXPECT_GT(p20, 265000);
  EXPECT_LT(p20, 280000);
  const int64_t p164 = count(*aq::models::build("preact_resnet164", 3, 10));
  EXPECT_GT(p164, 1650000);
  EXPECT_LT(p164, 1750000);
  auto r = aq::models::build("resnet18", 3, 10);
  auto params = r->named_parameters();
  for (const char* name : {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                           "layer2.0.downsample.1.bias", "layer4.1.bn2.weight", "fc.weight", "fc.bias"})
    EXPECT_TRUE(params.contains(name)) << name;
  EXPECT_TRUE(r->named_buffers().contains("bn1.running_mean"));
  auto p = aq::models::build("preact_resnet56", 1, 10)->named_parameters();
  for (const char* name : {"conv1.weight", "layer1.8.conv2.weight", "layer2.0.shortcut.weight", "bn.weight", "fc.weight"})
    EXPECT_TRUE(p.contains(name)) << name;
  EXPECT_FALSE(p.contains("layer1.0.shortcut.weight"));  // identity where shapes agree
}

TEST(ModelsLayout, UnknownArchitecturesAndCountsAreRejected) {
  EXPECT_THROW(aq::models::build("preact_resnet21", 3, 10), std::invalid_argument);
  EXPECT_THROW(aq::models::build("resnet19", 3, 10), std::invalid_argument);
  EXPECT_THROW(aq::models::build("preact_resnet20x", 3, 10), std::invalid_argument);
  EXPECT_THROW(aq::models::build("resnet18", 0, 10), std::invalid_argument);
  EXPECT_THROW(aq::models::build("resnet18", 3, 0), std::invalid_argument);
  EXPECT_EQ(aq::models::architectures().size(), 15u);
}

TEST(ModelsLayout, FanInInitialisation) {
  torch::manual_seed(0);
  auto m = aq::models::build("preact_resnet110", 3, 10);
  // Kaiming normal, fan-in, ReLU gain: std = sqrt(2 / fan_in).
  auto w = m->named_parameters()["layer3.5.conv1.weight"];
  const double fan_in = w.size(1) * w.size(2) * w.size(3);
  EXPECT_NEAR(w.std().item<double>(), std::sqrt(2.0 / fan_in), 0.05 * std::sqrt(2.0 / fan_in));
  EXPECT_NEAR(w.mean().item<double>(), 0.0, 0.01);
  EXPECT_TRUE(torch::equal(m->named_parameters()["layer3.5.bn1.weight"], torch::ones({64})));
}

TEST_P(Models, ShapesOnEveryFamily) {
  for (const auto& [arch, c, hw] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"preact_resnet20", 1, 28}, {"preact_resnet164", 3, 32}, {"resnet18", 3, 64}, {"resnet50", 3, 32}}) {
    auto m = aq::models::build(arch, c, 7);
    m->to(dev());
    auto y = m->forward(torch::randn({2, c, hw, hw}, dev()));
    EXPECT_EQ(y.sizes(), torch::IntArrayRef({2, 7})) << arch;
    y.sum().backward();
    EXPECT_TRUE(m->named_parameters()["conv1.weight"].grad().defined()) << arch;
  }
}

// The exact and the 2-bit model compute the same forward; at 8 bits their
// gradients agree; at 2 bits the memory the step holds for backward, as
// the allocator counts it, is far smaller.
TEST_P(Models, ConfigDecidesWhatIsCompressed) {
  aq::install_cpu_memory_counter();
  torch::manual_seed(1);
  auto exact_cfg = aq::QuantConfig::for_level(aq::Level::L3);
  exact_cfg.scope = aq::Scope::kNone;
  auto q_cfg = aq::QuantConfig::for_level(aq::Level::L3);
  q_cfg.cabits = q_cfg.ibits = 8;
  auto exact = aq::models::build("preact_resnet20", 1, 10, exact_cfg);
  auto q = aq::models::build("preact_resnet20", 1, 10, q_cfg);
  exact->to(dev());
  q->to(dev());
  {
    torch::NoGradGuard g;
    auto qp = q->named_parameters();
    for (const auto& p : exact->named_parameters()) qp[p.key()].copy_(p.value());
  }
  auto x = torch::randn({16, 1, 28, 28}, dev());
  auto ye = exact->forward(x), yq = q->forward(x);
  EXPECT_TRUE(torch::allclose(ye, yq, 1e-4, 1e-4));
  ye.pow(2).sum().backward();
  yq.pow(2).sum().backward();
  for (const char* name : {"conv1.weight", "layer2.0.conv1.weight", "fc.weight"}) {
    auto ge = exact->named_parameters()[name].grad(), gq = q->named_parameters()[name].grad();
    EXPECT_LE((ge - gq).abs().max().item<double>(), 0.05 * ge.abs().max().item<double>()) << name;
  }
  // Activation memory: allocated after the forward minus before, 2 bits vs exact.
  auto held = [&](const aq::QuantConfig& cfg) {
    aq::QModule(*q, cfg);
    q->zero_grad();
    auto xin = torch::randn({32, 1, 28, 28}, dev());
    const int64_t before = aq::memory(dev()).allocated;
    auto y = q->forward(xin);
    const int64_t bytes = aq::memory(dev()).allocated - before;
    y.sum().backward();
    return bytes;
  };
  auto two = q_cfg;
  two.cabits = two.ibits = 2;
  const int64_t e = held(exact_cfg), t = held(two);
  ASSERT_GT(t, 0);
  EXPECT_GE(double(e) / t, 8.0) << "exact " << e << " bytes, 2-bit " << t;
}

// L4 moves the packed activations off the device (CUDA) or restores them in
// micro-batches (CPU); either way the gradients are L3's for the same
// random numbers, and on CUDA the forward pass leaves far less on the device.
TEST_P(Models, SwappingKeepsTheGradients) {
  aq::install_cpu_memory_counter();
  torch::manual_seed(3);
  auto model = aq::models::build("preact_resnet20", 3, 10, aq::QuantConfig::for_level(aq::Level::L3));
  model->to(dev());
  auto x = torch::randn({24, 3, 32, 32}, dev());
  auto run = [&](aq::Level level, int64_t* held) {
    aq::QModule(*model, aq::QuantConfig::for_level(level));
    model->zero_grad();
    torch::manual_seed(11);  // CPU and CUDA generators: the same random rounding
    const int64_t before = aq::memory(dev()).allocated;
    auto y = model->forward(x);
    if (held) *held = aq::memory(dev()).allocated - before;
    y.pow(2).sum().backward();
    std::vector<torch::Tensor> g;
    for (const auto& p : model->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  int64_t held3 = 0, held4 = 0;
  const auto g3 = run(aq::Level::L3, &held3);
  const auto g4 = run(aq::Level::L4, &held4);
  ASSERT_EQ(g3.size(), g4.size());
  // Not bitwise on CUDA: cuDNN's weight-gradient algorithms add atomically,
  // so elements near zero differ relatively; compare to each tensor's scale.
  for (size_t i = 0; i < g3.size(); ++i)
    EXPECT_LE((g3[i] - g4[i]).abs().max().item<double>(), 1e-4 * g3[i].abs().max().item<double>() + 1e-12)
        << "parameter " << i;
  if (dev().is_cuda()) {
    EXPECT_LT(held4 * 2, held3) << "L3 " << held3 << " bytes, L4 " << held4;
  }
}

// Activation checkpointing (ModelOptions::recompute_blocks): with every block
// recomputed in backward, one training step computes the plain model's loss
// and gradients, leaves the BatchNorm running statistics and the random
// generators where the plain step leaves them (dropout draws the same masks
// again), and holds less for backward.  Under bf16 autocast too: the
// recomputation runs under the forward's autocast, on autograd's thread.
TEST_P(Models, RecomputedBlocksComputeThePlainModelsStep) {
  aq::install_cpu_memory_counter();
  const DeterministicCudnn det;  // the recomputation picks the first run's algorithms
  aq::QuantConfig exact;
  exact.scope = aq::Scope::kNone;
  struct Case {
    std::string arch;
    int64_t channels, classes, image;
    double dropout;
    aq::train::Amp amp;
  };
  const std::vector<Case> cases = {
      {"preact_resnet20", 1, 10, 28, 0, aq::train::Amp::kOff},
      {"resnet18", 3, 10, 32, 0, aq::train::Amp::kOff},
      {"vit_tiny", 1, 10, 28, 0, aq::train::Amp::kOff},
      {"vit_tiny", 1, 10, 28, 0.1, aq::train::Amp::kOff},
      {"gpt_small", 1, 256, 16, 0.1, aq::train::Amp::kOff},
      {"resnet18", 3, 10, 32, 0, aq::train::Amp::kBFloat16},
      {"vit_tiny", 1, 10, 28, 0.1, aq::train::Amp::kBFloat16},
      {"gpt_small", 1, 256, 16, 0, aq::train::Amp::kBFloat16},
  };
  for (const auto& c : cases) {
    const std::string what = c.arch + " dropout " + std::to_string(c.dropout) + " amp " + aq::train::to_string(c.amp);
    const bool tokens = aq::train::takes_tokens(c.arch);
    aq::models::ModelOptions o;
    o.layers = 2, o.width = 32, o.heads = 4, o.context = c.image;  // transformers: tiny
    o.image_height = o.image_width = c.image;
    o.dropout = c.dropout;
    torch::manual_seed(3);
    const auto x = tokens ? torch::randint(c.classes, {4, c.image}, torch::TensorOptions().dtype(torch::kLong))
                          : torch::randn({4, c.channels, c.image, c.image});
    const auto y = torch::randint(c.classes, tokens ? std::vector<int64_t>{4, c.image} : std::vector<int64_t>{4},
                                  torch::TensorOptions().dtype(torch::kLong));
    struct Ran {
      double loss;
      int64_t activations;
      std::vector<torch::Tensor> grads, buffers;
      torch::Tensor next_random;
    };
    auto run = [&](bool recompute) {
      o.recompute_blocks = recompute;
      torch::manual_seed(0);  // the same weights
      auto model = aq::models::build(c.arch, c.channels, c.classes, o, exact);
      EXPECT_EQ(model->recomputes_blocks(), recompute);
      model->to(dev());
      model->train();
      aq::train::StepOptions so;
      so.amp = c.amp;
      so.quant = exact;
      aq::train::Step step(*model, dev(), so);
      torch::manual_seed(7);  // the same dropout masks
      const auto r = step(x, y, torch::arange(4, torch::kLong));
      Ran out{r.loss.item<double>(), r.activations, {}, {}, torch::rand({4}, dev())};
      for (const auto& p : model->parameters()) out.grads.push_back(p.grad().defined() ? p.grad().clone() : p.grad());
      for (const auto& b : model->buffers()) out.buffers.push_back(b.clone());
      return out;
    };
    const Ran plain = run(false), ckpt = run(true);
    EXPECT_NEAR(ckpt.loss, plain.loss, 1e-6 * std::max(1.0, std::abs(plain.loss))) << what;
    ASSERT_EQ(ckpt.grads.size(), plain.grads.size()) << what;
    // The same operations on the same values (bitwise equal on the CPU);
    // the tolerances leave room for kernels that sum in no fixed order
    // (cuDNN's, atomically), whose bf16 sums move by a bf16 rounding.
    const double tol = c.amp == aq::train::Amp::kOff ? 1e-5 : 1e-2;
    for (size_t i = 0; i < plain.grads.size(); ++i) {
      ASSERT_EQ(ckpt.grads[i].defined(), plain.grads[i].defined()) << what << " parameter " << i;
      if (!plain.grads[i].defined()) continue;
      const double scale = plain.grads[i].abs().max().item<double>() + 1e-12;
      EXPECT_LE((ckpt.grads[i] - plain.grads[i]).abs().max().item<double>(), tol * scale) << what << " parameter " << i;
    }
    ASSERT_EQ(ckpt.buffers.size(), plain.buffers.size()) << what;
    for (size_t i = 0; i < plain.buffers.size(); ++i)
      EXPECT_LE((ckpt.buffers[i].to(torch::kDouble) - plain.buffers[i].to(torch::kDouble)).abs().max().item<double>(),
                1e-5)
          << what << " buffer " << i;
    EXPECT_TRUE(torch::equal(ckpt.next_random, plain.next_random)) << what << ": the generators moved on differently";
    EXPECT_LT(ckpt.activations, plain.activations) << what;
  }
}

TEST(ModelsLayout, RecomputedBlocksAreForTheExactModel) {
  aq::models::ModelOptions o;
  o.recompute_blocks = true;
  EXPECT_THROW(aq::models::build("preact_resnet20", 1, 10, o, aq::QuantConfig::for_level(aq::Level::L3)),
               std::invalid_argument);
  auto names = [](const aq::models::ModelPtr& m) {
    std::vector<std::string> n;
    for (const auto& p : m->named_parameters()) n.push_back(p.key());
    return n;
  };
  // Parameter names (and so checkpoints and exported weights) do not change.
  torch::manual_seed(0);
  const auto r = aq::models::build("resnet18", 3, 10, o);
  EXPECT_TRUE(r->recomputes_blocks());
  EXPECT_EQ(names(r), names(aq::models::build("resnet18", 3, 10)));
}

// Adaptive precision: per-sample bits vary, per-layer budgets move and
// average at most cabits; the statistics saved (as in a checkpoint or a
// calibration file) and loaded into another model allocate the same bits.
TEST(ModelsAdaptive, SavedStatisticsAllocateTheSameBits) {
  const auto cfg = aq::QuantConfig::for_level(aq::Level::L3);  // cabits 2, ibits 8, perlayer, usegradient
  torch::manual_seed(0);
  auto a = aq::models::build("preact_resnet20", 1, 10, cfg);
  auto b = aq::models::build("preact_resnet20", 1, 10, cfg);
  {
    torch::NoGradGuard g;
    auto pb = b->named_parameters();
    for (const auto& p : a->named_parameters()) pb[p.key()].copy_(p.value());
  }
  auto x = torch::randn({16, 1, 28, 28}) * torch::linspace(0.2, 3.0, 16).view({16, 1, 1, 1});
  auto y = torch::randint(10, {16}, torch::kLong);
  const auto idx = torch::arange(100, 116, torch::kLong);
  for (int step = 0; step < 3; ++step) {
    a->zero_grad();
    aq::set_batch_indices(idx);
    torch::nn::functional::cross_entropy(a->forward(x), y).backward();
    EXPECT_GT(aq::adapt_layers(*a), 10);
  }
  double weighted = 0, elements = 0;
  bool moved = false, varied = false;
  int sharing = 0;
  for (const auto& l : aq::layer_bits(*a)) {
    if (l.name.find("bn") != std::string::npos) continue;
    if (!l.shares.empty()) {  // uses another layer's copy: no bits of its own
      ++sharing;
      continue;
    }
    weighted += l.budget * l.elements;
    elements += l.elements;
    moved = moved || std::abs(l.budget - 2.0) > 0.1;
  }
  for (const auto& m : a->modules(false))
    if (auto* q = dynamic_cast<aq::QLayer*>(m.get()))
      if (const auto& lb = q->state()->last_bits; lb.defined())
        varied = varied || (lb != lb[0]).any().item<bool>();
  EXPECT_LE(weighted / elements, 2.0 + 1e-9);
  EXPECT_GT(sharing, 0) << "no shortcut shared its block's compressed input";
  EXPECT_TRUE(moved) << "per-layer budgets stayed at cabits";
  EXPECT_TRUE(varied) << "every sample got the same bits";
  // Through a file, as aq-train's checkpoints and aq-calibrate keep them.
  const std::string path = "/tmp/aq-test-adaptive-" + std::to_string(::getpid()) + ".h5";
  aq::ckpt::Checkpoint c;
  c.meta["kind"] = "aq-calibration";
  c.adaptive = aq::adaptive_state(*a);
  aq::ckpt::save(path, c);
  aq::load_adaptive_state(*b, aq::ckpt::load(path).adaptive);
  std::remove(path.c_str());
  aq::set_batch_indices(idx);
  torch::manual_seed(5);
  a->forward(x);
  torch::manual_seed(5);
  b->forward(x);
  auto ma = a->named_modules(), mb = b->named_modules();
  int compared = 0;
  for (const auto& item : ma) {
    auto* qa = dynamic_cast<aq::QLayer*>(item.value().get());
    if (!qa || !qa->state()->last_bits.defined()) continue;
    auto* qb = dynamic_cast<aq::QLayer*>(mb[item.key()].get());
    EXPECT_TRUE(torch::equal(qa->state()->last_bits, qb->state()->last_bits)) << item.key();
    ++compared;
  }
  EXPECT_GT(compared, 20);
  aq::set_batch_indices(torch::Tensor());
}

// Deferred per-layer budgets (training loops): a call leaves its budgets
// pending and the next call applies them before computing its own; they
// equal what an immediate call computes from the same statistics, and a
// checkpoint keeps them pending.
TEST_P(Models, DeferredBudgetsApplyAtTheNextCall) {
  const auto cfg = aq::QuantConfig::for_level(aq::Level::L3);
  auto a = aq::models::build("preact_resnet20", 1, 10, cfg);
  a->to(dev());
  auto x = torch::randn({8, 1, 28, 28}, opts()) * torch::linspace(0.2, 3.0, 8, opts()).view({8, 1, 1, 1});
  auto y = torch::randint(10, {8}, opts(torch::kLong));
  aq::set_batch_indices(torch::arange(8, torch::kLong));
  auto budgets = [&](torch::nn::Module& m) {
    std::vector<double> out;
    for (const auto& item : m.named_modules())
      if (auto* q = dynamic_cast<aq::QLayer*>(item.value().get())) out.push_back(q->state()->budget);
    return out;
  };
  for (int step = 0; step < 2; ++step) {
    a->zero_grad();
    torch::nn::functional::cross_entropy(a->forward(x), y).backward();
  }
  const auto before = budgets(*a);
  EXPECT_GT(aq::adapt_layers(*a, /*defer=*/true), 10);
  EXPECT_EQ(budgets(*a), before) << "a deferred call changed the budgets at once";
  // A checkpoint of this moment, loaded into a twin, holds the same pending budgets.
  auto b = aq::models::build("preact_resnet20", 1, 10, cfg);
  b->to(dev());
  aq::load_adaptive_state(*b, aq::adaptive_state(*a));
  aq::apply_pending_budgets(*a);
  aq::apply_pending_budgets(*b);
  const auto deferred = budgets(*a);
  EXPECT_EQ(budgets(*b), deferred);
  EXPECT_NE(deferred, before);
  // The same statistics give the same budgets immediately.
  aq::adapt_layers(*a);
  EXPECT_EQ(budgets(*a), deferred);
  aq::set_batch_indices(torch::Tensor());
}

// The allocation's unit weights follow the batch's shape: after a batch of
// another size, and one of other images, the budgets are those of a call
// that builds its weights afresh.
TEST_P(Models, BudgetsFollowTheBatchShape) {
  const auto cfg = aq::QuantConfig::for_level(aq::Level::L3);
  auto a = aq::models::build("preact_resnet20", 1, 10, cfg);
  a->to(dev());
  auto budgets = [&] {
    std::vector<double> out;
    for (const auto& m : a->modules(false))
      if (auto* q = dynamic_cast<aq::QLayer*>(m.get())) out.push_back(q->state()->budget);
    return out;
  };
  for (const auto& [n, side] : std::vector<std::pair<int64_t, int64_t>>{{8, 28}, {5, 28}, {5, 20}}) {
    auto x = torch::randn({n, 1, side, side}, opts()) * torch::linspace(0.2, 3.0, n, opts()).view({n, 1, 1, 1});
    auto y = torch::randint(10, {n}, opts(torch::kLong));
    aq::set_batch_indices(torch::arange(n, torch::kLong));
    a->zero_grad();
    torch::nn::functional::cross_entropy(a->forward(x), y).backward();
    EXPECT_GT(aq::adapt_layers(*a), 10);
    const auto kept = budgets();
    for (const auto& m : a->modules(false))
      if (auto* q = dynamic_cast<aq::QLayer*>(m.get())) q->state()->unit_weights = torch::Tensor();
    aq::adapt_layers(*a);
    EXPECT_EQ(budgets(), kept) << "batch " << n << " of " << side << "x" << side;
  }
  aq::set_batch_indices(torch::Tensor());
}

TEST(ModelsState, LoadStateChecksNamesAndShapes) {
  auto m = aq::models::build("preact_resnet20", 1, 10);
  auto src = aq::models::build("preact_resnet20", 1, 10);
  aq::ckpt::Checkpoint c;
  for (const auto& p : src->named_parameters()) c.parameters.emplace_back(p.key(), p.value().detach());
  for (const auto& b : src->named_buffers()) c.buffers.emplace_back(b.key(), b.value());
  aq::train::load_state(*m, c, "x.h5");
  EXPECT_TRUE(torch::equal(m->named_parameters()["fc.weight"], src->named_parameters()["fc.weight"]));
  auto expect_error = [&](aq::ckpt::Checkpoint bad, const std::string& what) {
    try {
      aq::train::load_state(*m, bad, "x.h5");
      ADD_FAILURE() << "no error for " << what;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("x.h5"), std::string::npos) << e.what();
    }
  };
  auto missing = c;
  missing.parameters.pop_back();
  expect_error(missing, "fc.bias");
  auto shaped = c;
  shaped.parameters[0].second = torch::zeros({3});
  expect_error(shaped, "conv1.weight");
  auto extra = c;
  extra.buffers.emplace_back("nonexistent.running_mean", torch::zeros({2}));
  expect_error(extra, "nonexistent.running_mean");
  // A different architecture's checkpoint.
  aq::ckpt::Checkpoint other;
  for (const auto& p : aq::models::build("preact_resnet32", 1, 10)->named_parameters())
    other.parameters.emplace_back(p.key(), p.value().detach());
  expect_error(other, "not in the model");
}

// aq's SGD (multi-tensor kernels) makes torch::optim::SGD's updates: the
// same parameters and momentum buffers, step after step, for every option,
// with parameters of two dtypes, one channels_last, one without a gradient
// at first and one never given one; the gradients are left as they were.
TEST_P(Models, MultiTensorSgdMatchesLibTorchs) {
  struct Case {
    double momentum, dampening, weight_decay;
    bool nesterov;
  };
  for (const Case& c : {Case{0, 0, 0, false}, Case{0.9, 0, 0, false}, Case{0.9, 0.1, 5e-4, false},
                        Case{0.9, 0, 1e-4, true}, Case{0, 0, 1e-2, false}}) {
    auto make = [&] {
      torch::manual_seed(1);
      return std::vector<torch::Tensor>{
          torch::randn({8, 3, 3, 3}, opts()).contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_(),
          torch::randn({8}, opts()).requires_grad_(), torch::randn({5, 4}, opts(torch::kDouble)).requires_grad_(),
          torch::randn({6}, opts()).requires_grad_(), torch::randn({3}, opts()).requires_grad_()};
    };
    auto ours_p = make(), theirs_p = make();
    auto so = torch::optim::SGDOptions(0.05)
                  .momentum(c.momentum)
                  .dampening(c.dampening)
                  .weight_decay(c.weight_decay)
                  .nesterov(c.nesterov);
    aq::train::SGD ours(ours_p, so);
    torch::optim::SGD theirs(theirs_p, so);
    for (int step = 0; step < 4; ++step) {
      torch::manual_seed(100 + step);
      for (size_t i = 0; i + 1 < ours_p.size(); ++i) {
        if (i == 3 && step < 2) continue;  // its buffer starts at step 2
        const torch::Tensor g = torch::randn_like(ours_p[i]);
        ours_p[i].mutable_grad() = g.clone();
        theirs_p[i].mutable_grad() = g.clone();
      }
      const torch::Tensor g0 = ours_p[0].grad().clone();
      ours.step();
      theirs.step();
      EXPECT_TRUE(torch::equal(ours_p[0].grad(), g0)) << "gradient changed";
      for (size_t i = 0; i < ours_p.size(); ++i) {
        const double tol = dev().is_cuda() ? 1e-6 : 0.0;  // CUDA's kernels may contract a + alpha b
        EXPECT_LE((ours_p[i] - theirs_p[i]).abs().max().item<double>(), tol)
            << "param " << i << " step " << step << " momentum " << c.momentum << " nesterov " << c.nesterov;
      }
    }
    for (size_t i = 0; i < ours_p.size(); ++i) {
      auto a = ours.state().find(ours_p[i].unsafeGetTensorImpl());
      auto b = theirs.state().find(theirs_p[i].unsafeGetTensorImpl());
      ASSERT_EQ(a == ours.state().end(), b == theirs.state().end()) << i;
      if (a == ours.state().end()) continue;
      const auto& ba = static_cast<torch::optim::SGDParamState&>(*a->second).momentum_buffer();
      const auto& bb = static_cast<torch::optim::SGDParamState&>(*b->second).momentum_buffer();
      EXPECT_LE((ba - bb).abs().max().item<double>(), dev().is_cuda() ? 1e-6 : 0.0) << "buffer " << i;
    }
  }
}

}  // namespace
