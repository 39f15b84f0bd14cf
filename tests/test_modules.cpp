// Quantized modules against their torch::nn twins: names, forward, running
// statistics, eval mode, padding modes, and the bytes they keep.
#include "aq/modules.h"
#include "device_test.h"

#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

namespace {

namespace nn = torch::nn;

class Modules : public DeviceTest {};
AQ_PER_DEVICE(Modules);

std::vector<std::string> keys(const torch::OrderedDict<std::string, torch::Tensor>& d) {
  std::vector<std::string> k;
  for (const auto& item : d) k.push_back(item.key());
  return k;
}

// Copies parameters and buffers of `from` into `to` (same names).
void copy_state(nn::Module& from, nn::Module& to) {
  torch::NoGradGuard g;
  auto tp = to.named_parameters(), tb = to.named_buffers();
  for (const auto& p : from.named_parameters()) tp[p.key()].copy_(p.value());
  for (const auto& b : from.named_buffers()) tb[b.key()].copy_(b.value());
}

auto eight_bits() {
  auto c = std::make_shared<aq::QuantConfig>(aq::QuantConfig::for_level(aq::Level::L3));
  c->cabits = c->ibits = 8;
  return c;
}

// Twin and quantized module: same names, same forward in train and eval
// mode, gradients within `rel` at 8 bits, same buffers afterwards.
template <typename Q, typename T>
void check_twin(Q q, T t, const torch::Tensor& x0, double rel) {
  EXPECT_EQ(keys(q->named_parameters()), keys(t->named_parameters()));
  EXPECT_EQ(keys(q->named_buffers()), keys(t->named_buffers()));
  q->to(x0.device());
  t->to(x0.device());
  copy_state(*t, *q);
  q->set_config(eight_bits());
  for (bool train : {true, false}) {
    q->train(train);
    t->train(train);
    auto xq = x0.clone().requires_grad_(), xt = x0.clone().requires_grad_();
    auto yq = q->forward(xq), yt = t->forward(xt);
    EXPECT_TRUE(torch::allclose(yq, yt, 1e-5, 1e-5)) << "forward, train=" << train;
    auto probe = torch::randn_like(yt);
    (yq * probe).sum().backward();
    (yt * probe).sum().backward();
    const double s = xt.grad().abs().max().template item<double>() + 1e-12;
    EXPECT_LE((xq.grad() - xt.grad()).abs().max().template item<double>(), rel * s) << "input gradient, train=" << train;
    auto pq = q->named_parameters(), pt = t->named_parameters();
    for (const auto& p : pt) {
      if (!p.value().grad().defined()) continue;
      const double sp = p.value().grad().abs().max().template item<double>() + 1e-12;
      EXPECT_LE((pq[p.key()].grad() - p.value().grad()).abs().max().template item<double>(), rel * sp)
          << p.key() << " gradient, train=" << train;
    }
    auto bq = q->named_buffers();
    for (const auto& b : t->named_buffers())
      EXPECT_TRUE(torch::allclose(bq[b.key()].to(torch::kDouble), b.value().to(torch::kDouble), 1e-5, 1e-6))
          << b.key();
    q->zero_grad();
    t->zero_grad();
  }
}

TEST_P(Modules, SameAsTheirTwins) {
  auto d = dev();
  check_twin(aq::QLinear(nn::LinearOptions(20, 7)), nn::Linear(nn::LinearOptions(20, 7)),
             torch::randn({6, 3, 20}, d), 0.02);
  auto co = nn::Conv2dOptions(4, 6, 3).stride(2).padding(1).groups(2);
  check_twin(aq::QConv2d(co), nn::Conv2d(co), torch::randn({5, 4, 11, 9}, d), 0.02);
  for (auto mode : std::vector<nn::detail::conv_padding_mode_t>{torch::kReflect, torch::kReplicate, torch::kCircular}) {
    auto cm = nn::Conv2dOptions(3, 4, 3).padding(1).padding_mode(mode);
    check_twin(aq::QConv2d(cm), nn::Conv2d(cm), torch::randn({2, 3, 8, 8}, d), 0.02);
  }
  auto same = nn::Conv1dOptions(3, 5, 4).padding(torch::kSame).dilation(2);  // asymmetric 'same'
  check_twin(aq::QConv1d(same), nn::Conv1d(same), torch::randn({4, 3, 17}, d), 0.02);
  auto c3 = nn::Conv3dOptions(2, 4, {2, 3, 1}).bias(false);
  check_twin(aq::QConv3d(c3), nn::Conv3d(c3), torch::randn({2, 2, 5, 6, 4}, d), 0.02);
  auto ct = nn::ConvTranspose2dOptions(4, 2, 3).stride(2).padding(1).output_padding(1).groups(2);
  check_twin(aq::QConvTranspose2d(ct), nn::ConvTranspose2d(ct), torch::randn({3, 4, 5, 6}, d), 0.02);
  auto c1t = nn::ConvTranspose1dOptions(3, 3, 2).stride(3);
  check_twin(aq::QConvTranspose1d(c1t), nn::ConvTranspose1d(c1t), torch::randn({3, 3, 7}, d), 0.02);
  for (auto bo : {nn::BatchNormOptions(5), nn::BatchNormOptions(5).momentum(std::nullopt),
                  nn::BatchNormOptions(5).affine(false), nn::BatchNormOptions(5).track_running_stats(false)}) {
    check_twin(aq::QBatchNorm2d(bo), nn::BatchNorm2d(bo), torch::randn({6, 5, 4, 4}, d) * 3 + 1, 0.03);
  }
  check_twin(aq::QBatchNorm1d(nn::BatchNormOptions(7)), nn::BatchNorm1d(nn::BatchNormOptions(7)),
             torch::randn({9, 7}, d), 0.03);
  check_twin(aq::QBatchNorm3d(nn::BatchNormOptions(2)), nn::BatchNorm3d(nn::BatchNormOptions(2)),
             torch::randn({3, 2, 3, 4, 5}, d), 0.03);
  check_twin(aq::QReLU(), nn::ReLU(), torch::randn({4, 10}, d), 0.0);
  auto mp = nn::MaxPool2dOptions({3, 2}).stride(2).padding(1).dilation({1, 2}).ceil_mode(true);
  check_twin(aq::QMaxPool2d(mp), nn::MaxPool2d(mp), torch::randn({2, 3, 11, 12}, d), 1e-6);  // overlapping windows: CUDA adds atomically
  check_twin(aq::QMaxPool1d(nn::MaxPool1dOptions(4)), nn::MaxPool1d(nn::MaxPool1dOptions(4)),
             torch::randn({2, 3, 17}, d), 0.0);
  check_twin(aq::QMaxPool3d(nn::MaxPool3dOptions(2)), nn::MaxPool3d(nn::MaxPool3dOptions(2)),
             torch::randn({2, 2, 4, 5, 6}, d), 0.0);
  auto ap = nn::AvgPool2dOptions(3).stride(2).padding(1).count_include_pad(false);
  check_twin(aq::QAvgPool2d(ap), nn::AvgPool2d(ap), torch::randn({2, 3, 9, 9}, d), 1e-6);
  auto aa = nn::AdaptiveAvgPool2dOptions({3, std::nullopt});
  check_twin(aq::QAdaptiveAvgPool2d(aa), nn::AdaptiveAvgPool2d(aa), torch::randn({2, 3, 10, 7}, d), 1e-6);
  auto up = nn::UpsampleOptions().scale_factor(std::vector<double>{2, 2}).mode(torch::kBilinear).align_corners(false);
  check_twin(aq::QUpsample(up), nn::Upsample(up), torch::randn({2, 3, 5, 4}, d), 1e-6);
}

TEST_P(Modules, ReluInPlaceAndDropout) {
  auto r = aq::QReLU(nn::ReLUOptions(true));
  auto x = torch::randn({3, 50}, dev()).requires_grad_();
  auto y = x * 1.0;
  auto out = r->forward(y);
  EXPECT_EQ(out.data_ptr(), y.data_ptr());
  aq::QDropout drop(nn::DropoutOptions(0.25));
  auto z = torch::rand({100, 100}, dev()) + 1;
  auto zd = drop->forward(z.requires_grad_());
  EXPECT_NEAR((zd != 0).to(torch::kFloat).mean().item<double>(), 0.75, 0.02);
  drop->eval();
  EXPECT_TRUE(torch::equal(drop->forward(z), z));
}

TEST_P(Modules, EvalModeKeepsNothingExtra) {
  aq::QConv2d c(nn::Conv2dOptions(3, 8, 3).padding(1));
  c->to(dev());
  c->eval();
  auto y = c->forward(torch::randn({2, 3, 8, 8}, dev()).requires_grad_());
  y.sum().backward();
  EXPECT_EQ(c->state()->saved_bytes, 0);
}

// A small ResNet-style stack: the bytes each layer keeps follow the layout
// formula, and at 2 bits they are over 10x fewer than the exact model's.
TEST_P(Modules, SavedBytesMatchTheFormula) {
  auto cfg = std::make_shared<aq::QuantConfig>();
  cfg->cabits = cfg->ibits = 2;
  const int64_t N = 8, C = 16, H = 20;
  aq::QConv2d conv1(nn::Conv2dOptions(3, C, 3).padding(1)), conv2(nn::Conv2dOptions(C, C, 3).padding(1));
  aq::QBatchNorm2d bn1{nn::BatchNormOptions(C)}, bn2{nn::BatchNormOptions(C)};
  aq::QReLU relu1, relu2;
  aq::QLinear fc(nn::LinearOptions(C, 10));
  std::vector<aq::QLayer*> layers = {conv1.get(), bn1.get(), relu1.get(), conv2.get(), bn2.get(), relu2.get(), fc.get()};
  for (auto* l : layers) l->set_config(cfg);
  for (nn::Module* m : std::vector<nn::Module*>{conv1.get(), conv2.get(), bn1.get(), bn2.get(), fc.get()}) m->to(dev());
  auto x = torch::randn({N, 3, H, H}, dev()).requires_grad_();
  auto h = relu1(bn1(conv1(x)));
  auto h2 = relu2(bn2(conv2(h)));
  auto out = fc(h2.mean({2, 3}));
  // What autograd would keep for the exact model: each layer's fp32 input
  // (ReLU: its output), per sample D elements.
  auto expected = [](int64_t n, int64_t d, int bits) {
    const int64_t groups = (d + 255) / 256;
    return n * ((d + 31) / 32 * 32 * bits / 8) + n * groups * 2 * 2;  // codes + bf16 min/max
  };
  const int64_t D0 = 3 * H * H, D = C * H * H;
  EXPECT_EQ(conv1->state()->saved_bytes, expected(N, D0, 2));
  EXPECT_EQ(conv2->state()->saved_bytes, expected(N, D, 2));
  EXPECT_EQ(bn1->state()->saved_bytes, expected(N, D, 2) + 2 * C * 4);  // + mean and invstd
  EXPECT_EQ(relu1->state()->saved_bytes, aq::packed_bits_nbytes(N * D, 1));
  EXPECT_EQ(fc->state()->saved_bytes, expected(N, C, 2));
  int64_t total = 0;
  for (auto* l : layers) total += l->state()->saved_bytes;
  const int64_t exact = 4 * (N * D0 + 2 * N * D /*bn inputs*/ + 2 * N * D /*relu outputs*/ + N * D /*conv2 input*/ +
                             N * C);
  EXPECT_GE(double(exact) / total, 10.0) << exact << " vs " << total;
  out.sum().backward();
  EXPECT_FALSE(fc->state()->grad_sq.defined());  // uniform bits: no statistics to keep
}

TEST_P(Modules, AutocastBFloat16) {
  const auto type = dev().type();
  aq::QLinear q(nn::LinearOptions(32, 16));
  nn::Linear t(nn::LinearOptions(32, 16));
  aq::QConv2d qc(nn::Conv2dOptions(3, 4, 3));
  nn::Conv2d tc(nn::Conv2dOptions(3, 4, 3));
  for (nn::Module* m : std::vector<nn::Module*>{q.get(), t.get(), qc.get(), tc.get()}) m->to(dev());
  copy_state(*t, *q);
  copy_state(*tc, *qc);
  q->set_config(eight_bits());
  qc->set_config(eight_bits());
  auto x = torch::randn({8, 32}, dev());
  auto xc = torch::randn({2, 3, 9, 9}, dev());
  at::autocast::set_autocast_enabled(type, true);
  at::autocast::set_autocast_dtype(type, torch::kBFloat16);
  auto yq = q(x.requires_grad_()), yt = t(x);
  auto ycq = qc(xc.requires_grad_()), yct = tc(xc);
  at::autocast::set_autocast_enabled(type, false);
  at::autocast::clear_cache();
  EXPECT_EQ(yq.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(yq, yt));
  EXPECT_TRUE(torch::equal(ycq, yct));
  (yq.to(torch::kFloat).sum() + ycq.to(torch::kFloat).sum()).backward();
  auto gq = q->weight.grad().clone(), gcq = qc->weight.grad().clone();
  (yt.to(torch::kFloat).sum() + yct.to(torch::kFloat).sum()).backward();
  EXPECT_EQ(gq.scalar_type(), torch::kFloat);
  EXPECT_EQ(x.grad().scalar_type(), torch::kFloat);  // back through the lowering of the kept input
  EXPECT_LE((gq - t->weight.grad()).abs().max().item<double>(), 0.03 * t->weight.grad().abs().max().item<double>());
  EXPECT_LE((gcq - tc->weight.grad()).abs().max().item<double>(), 0.03 * tc->weight.grad().abs().max().item<double>());
}

TEST_P(Modules, PerSampleBitsFromTheState) {
  aq::QLinear q(nn::LinearOptions(300, 4));
  q->to(dev());
  auto x = torch::randn({5, 300}, dev()).requires_grad_();
  q->state()->bits = torch::tensor({1, 2, 3, 8, 4}, torch::kInt);
  q(x).sum().backward();
  // Codes: each sample's bits times 320 padded elements; bounds: 2 groups x bf16 min and max.
  EXPECT_EQ(q->state()->saved_bytes, (1 + 2 + 3 + 8 + 4) * 320 / 8 + 5 * 2 * 2 * 2 + 5 * 4 /*bits*/ + 5 * 8 /*offsets*/);
  q->state()->bits = torch::tensor({1, 2}, torch::kInt);  // wrong batch size: a clear error
  EXPECT_THROW(q(x), std::invalid_argument);
}

TEST_P(Modules, ConvertingASequentialSharesTensorsAndNames) {
  nn::Sequential exact(nn::Conv2d(nn::Conv2dOptions(3, 8, 3).padding(1)), nn::BatchNorm2d(8), nn::ReLU(),
                       nn::MaxPool2d(2), nn::Flatten(), nn::Dropout(0.0), nn::Linear(8 * 4 * 4, 10));
  exact->to(dev());
  auto cfg = aq::QuantConfig::for_level(aq::Level::L3);
  cfg.cabits = cfg.ibits = 8;
  auto q = aq::quantized(exact, cfg);
  EXPECT_EQ(keys(q->named_parameters()), keys(exact->named_parameters()));
  EXPECT_EQ(keys(q->named_buffers()), keys(exact->named_buffers()));
  auto qp = q->named_parameters();
  for (const auto& p : exact->named_parameters()) EXPECT_EQ(qp[p.key()].data_ptr(), p.value().data_ptr()) << p.key();
  auto qb = q->named_buffers();
  for (const auto& b : exact->named_buffers()) EXPECT_EQ(qb[b.key()].data_ptr(), b.value().data_ptr()) << b.key();  // same storage
  int converted = 0;
  for (const auto& c : q->children()) converted += dynamic_cast<aq::QLayer*>(c.get()) != nullptr;
  EXPECT_EQ(converted, 6);  // all but Flatten
  // Same forward; the converted model updates the shared running statistics.
  auto x = torch::randn({4, 3, 8, 8}, dev());
  torch::Tensor ye;
  {
    torch::NoGradGuard g;
    exact->eval();
    ye = exact->forward(x);
  }
  q->eval();
  EXPECT_TRUE(torch::allclose(q->forward(x), ye, 1e-5, 1e-5));
  q->train();
  auto before = exact->named_buffers()["1.running_mean"].clone();
  auto y = q->forward(x.requires_grad_());
  y.sum().backward();
  EXPECT_FALSE(torch::equal(exact->named_buffers()["1.running_mean"], before));
  EXPECT_TRUE(exact->named_parameters()["0.weight"].grad().defined());
  // -c fanin converts nothing; qlinear only conv/linear, BatchNorm exact.
  EXPECT_EQ(aq::QModule(*q, aq::QuantConfig::for_level(aq::Level::L3)), 6);
  auto fanin = cfg;
  fanin.scope = aq::Scope::kNone;
  int none = 0;
  for (const auto& c : aq::quantized(exact, fanin)->children()) none += dynamic_cast<aq::QLayer*>(c.get()) != nullptr;
  EXPECT_EQ(none, 0);
  auto lin = cfg;
  lin.scope = aq::Scope::kLinear;
  aq::QModule(*q, lin);
  auto bn = std::dynamic_pointer_cast<aq::QBatchNorm2dImpl>(q->ptr(1));
  ASSERT_TRUE(bn);
  bn->state()->saved_bytes = 0;
  q->forward(torch::randn({4, 3, 8, 8}, dev()).requires_grad_()).sum().backward();
  EXPECT_EQ(bn->state()->saved_bytes, 0);  // exact BatchNorm: aq kept nothing
  EXPECT_GT(std::dynamic_pointer_cast<aq::QConv2dImpl>(q->ptr(0))->state()->saved_bytes, 0);
  auto sync = cfg;
  sync.scope = aq::Scope::kSyncBN;
  EXPECT_NO_THROW(aq::QModule(*q, sync));  // QSyncBatchNorm: in one process, QBatchNorm itself
}

}  // namespace

// Two layers saving the same tensor (a block's first conv and its shortcut)
// share one compressed copy, as autograd shares one saved tensor; a tensor
// changed in place in between is compressed again, and nothing is kept alive
// once the graph is gone.
TEST_P(Modules, LayersSavingOneTensorShareItsCompressedCopy) {
  aq::QConv2d a(nn::Conv2dOptions(4, 8, 3).padding(1)), b(nn::Conv2dOptions(4, 8, 1));
  auto cfg = std::make_shared<aq::QuantConfig>();
  cfg->cabits = cfg->ibits = 8;  // fine enough to compare b's gradient with the exact one
  a->set_config(cfg);
  b->set_config(cfg);
  a->to(dev());
  b->to(dev());
  auto x = torch::randn({6, 4, 16, 16}, dev()).requires_grad_();
  auto h = x * 1.0;  // a non-leaf both layers read
  auto ya = a(h);
  auto yb = b(h);
  auto out = ya + yb;
  EXPECT_GT(a->state()->saved_bytes, 0);
  EXPECT_EQ(b->state()->saved_bytes, 0);
  out.sum().backward();
  // b's weight gradient from the shared (8-bit) copy: close to the exact one.
  nn::Conv2d eb(nn::Conv2dOptions(4, 8, 1));
  eb->to(dev());
  {
    torch::NoGradGuard g;
    eb->weight.copy_(b->weight);
    eb->bias.copy_(b->bias);
  }
  eb(x.detach()).sum().backward();
  EXPECT_LE((b->weight.grad() - eb->weight.grad()).abs().max().item<double>(),
            0.01 * eb->weight.grad().abs().max().item<double>());
  // Changed in place between the two saves: two copies.
  auto h2 = x.detach() * 1.0;
  auto o1 = a(h2);
  h2.add_(1.0);
  auto o2 = b(h2);
  EXPECT_GT(b->state()->saved_bytes, 0);
}

// A layer that shared another's copy may go away first (another model on the
// same input): the owner's next allocation must not read it.
TEST_P(Modules, OwnerOutlivesTheLayerThatSharedItsCopy) {
  auto cfg = std::make_shared<aq::QuantConfig>(aq::QuantConfig::for_level(aq::Level::L3));
  aq::QConv2d a(nn::Conv2dOptions(4, 8, 3).padding(1));
  a->set_config(cfg);
  a->to(dev());
  auto x = torch::randn({5, 4, 12, 12}, dev());
  {
    aq::QConv2d b(nn::Conv2dOptions(4, 8, 1));
    b->set_config(cfg);
    b->to(dev());
    auto ya = a(x);
    auto yb = b(x);
    EXPECT_EQ(b->state()->shared_from, a->state().get());
    EXPECT_EQ(b->state()->saved_bytes, 0);
    (ya.sum() + yb.sum()).backward();
  }
  for (int i = 0; i < 2; ++i) {
    auto y = a(torch::randn({5, 4, 12, 12}, dev()));
    y.sum().backward();
    EXPECT_EQ(a->state()->last_bits.sum().item<int64_t>(), 2 * 5);
  }
}

// A layer gone, what its state held goes with it, though the thread still
// remembers its compression (a weak reference, for sharing): on a device
// that memory would otherwise stay taken until the thread ends.
TEST_P(Modules, AGoneLayerLetsGoOfItsTensors) {
  auto cfg = std::make_shared<aq::QuantConfig>(aq::QuantConfig::for_level(aq::Level::L3));
  at::Tensor last_bits, range_sq;
  c10::weak_intrusive_ptr<aq::LayerState> weak{c10::intrusive_ptr<aq::LayerState>()};
  {
    aq::QLinear fc(nn::LinearOptions(64, 8));
    fc->set_config(cfg);
    fc->to(dev());
    fc(torch::randn({6, 64}, dev()).requires_grad_()).sum().backward();
    last_bits = fc->state()->last_bits;
    range_sq = fc->state()->range_sq;
    ASSERT_TRUE(last_bits.defined() && range_sq.defined());
    EXPECT_GT(last_bits.use_count(), 1);
    weak = c10::weak_intrusive_ptr<aq::LayerState>(fc->state());
  }
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(last_bits.use_count(), 1);
  EXPECT_EQ(range_sq.use_count(), 1);
}
