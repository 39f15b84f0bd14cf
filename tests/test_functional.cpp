// Compressed ops against LibTorch's: identical forward, gradients close at
// 8 bits and unbiased at 2 bits, exact masks; per device.
#include "aq/compress.h"
#include "aq/functional.h"
#include "aq/memory.h"
#include "device_test.h"
#include "grads.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>

namespace {

namespace F = aq::functional;

class Ops : public DeviceTest {};
AQ_PER_DEVICE(Ops);

// The worst-case error of the weight gradient of an op linear in x (linear,
// convolution) at 8 bits: every restored element is off by less than one
// step, at most (max x - min x + eps) / 255, so dL/dw, a sum of g * x, is off
// by at most the same op's weight gradient for x = step and g = |g|.  The
// input and bias gradients do not depend on x and must match exactly.
torch::Tensor weight_bound(const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& op,
                           const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& probe) {
  const double step = (x.max() - x.min()).item<double>() / 255 + 2e-6;
  auto wd = w.detach().clone().requires_grad_();
  (op(torch::full_like(x, step), wd) * probe.abs()).sum().backward();
  return wd.grad();
}

// At 8 bits every gradient is within `bound8[i]` (elementwise; undefined:
// `rel` of its largest entry) of the exact one; at 2 bits the mean over draws
// converges to it: within 6 standard errors, the spread measured from the
// draws.
void check_gradients(const std::function<torch::Tensor(const aq::QuantConfig&)>& q,
                     const std::function<torch::Tensor()>& exact, const std::vector<torch::Tensor>& leaves,
                     const torch::Tensor& probe, double rel8, const std::vector<torch::Tensor>& bound8 = {}) {
  const auto ge = grads(exact, leaves, probe);
  const auto c8 = bits(8);
  const auto g8 = grads([&] { return q(c8); }, leaves, probe);
  for (size_t i = 0; i < ge.size(); ++i) {
    const double scale = ge[i].abs().max().item<double>() + 1e-12;
    if (i < bound8.size() && bound8[i].defined()) {
      const auto excess = (g8[i] - ge[i]).abs() - bound8[i] - 1e-5 * scale;
      EXPECT_LE(excess.max().item<double>(), 0) << "8-bit gradient " << i << " beyond the step bound";
    } else {
      EXPECT_LE((g8[i] - ge[i]).abs().max().item<double>(), rel8 * scale) << "8-bit gradient " << i;
    }
  }
  const auto c2 = bits(2);
  const int S = 200;
  const Draws d = draw_grads([&] { return q(c2); }, leaves, probe, S);
  for (size_t i = 0; i < ge.size(); ++i) {
    const auto& mean = d.mean[i];
    const auto& sd = d.sd[i];
    const auto err = (mean - ge[i].to(torch::kDouble)).abs();
    const auto tol = 6 * sd / std::sqrt(double(S)) + 1e-6 * (ge[i].abs().max().item<double>() + 1e-12);
    EXPECT_TRUE((err <= tol).all().item<bool>()) << "2-bit mean gradient " << i << ": worst excess "
                                                 << (err - tol).max().item<double>();
  }
}

TEST_P(Ops, LinearMatchesLibTorch) {
  auto x = torch::randn({16, 5, 40}, opts()).requires_grad_();
  auto w = (torch::randn({24, 40}, opts()) * 0.2).requires_grad_();
  auto b = torch::randn({24}, opts()).requires_grad_();
  auto probe = torch::randn({16, 5, 24}, opts());
  auto st = aq::make_layer_state();
  auto c2 = bits(2);
  EXPECT_TRUE(torch::equal(F::linear(x, w, b, c2, st), torch::linear(x, w, b)));
  const auto wb = weight_bound([](const torch::Tensor& xx, const torch::Tensor& ww) { return torch::linear(xx, ww); },
                                x, w, probe);
  check_gradients([&](const aq::QuantConfig& c) { return F::linear(x, w, b, c, st); },
                  [&] { return torch::linear(x, w, b); }, {x, w, b}, probe, 0.0,
                  {torch::zeros_like(x), wb, torch::zeros_like(b)});
  // What the layer kept; uniform bits need no statistics.
  F::linear(x, w, b, c2, st).sum().backward();
  EXPECT_FALSE(st->range_sq.defined());
  EXPECT_FALSE(st->grad_sq.defined());
  EXPECT_EQ(st->sample_elements, 200);
  EXPECT_LT(st->saved_bytes * 10, x.numel() * 4);
  // Adaptive bits: the statistics the allocation reads, per sample, and the
  // gradient norms in float however x is laid out.
  auto ca = c2;
  ca.ibits = 8;
  ca.usegradient = false;
  auto sta = aq::make_layer_state();
  auto ga = torch::randn({16, 5, 24}, opts());
  (F::linear(x, w, b, ca, sta) * ga).sum().backward();
  ASSERT_TRUE(sta->range_sq.defined());
  EXPECT_EQ(sta->range_sq.sizes(), torch::IntArrayRef({16}));
  const auto xr = x.detach().reshape({16, -1}).to(torch::kFloat);
  EXPECT_TRUE(torch::allclose(sta->range_sq.cpu(), (xr.amax(1) - xr.amin(1)).pow(2).cpu(), 1e-4, 1e-5));
  ASSERT_TRUE(sta->grad_sq.defined());
  EXPECT_TRUE(torch::allclose(sta->grad_sq.cpu(), ga.reshape({16, -1}).to(torch::kFloat).pow(2).sum(1).cpu(), 1e-4));
  EXPECT_EQ(sta->last_bits.sum().item<int64_t>(), 2 * 16);
  // A frozen weight: x's gradient needs no copy of x.
  auto frozen = w.detach();
  x.mutable_grad() = torch::Tensor();
  (F::linear(x, frozen, b, c2, st) * probe).sum().backward();
  EXPECT_EQ(st->saved_bytes, 0);
  EXPECT_TRUE(torch::allclose(x.grad(), probe.matmul(frozen), 1e-5, 1e-6));
}

TEST_P(Ops, ConvolutionMatchesLibTorch) {
  auto x = torch::randn({6, 4, 13, 11}, opts()).requires_grad_();
  auto w = (torch::randn({8, 2, 3, 3}, opts()) * 0.3).requires_grad_();
  auto b = torch::randn({8}, opts()).requires_grad_();
  auto exact = [&] { return torch::conv2d(x, w, b, {2, 1}, {1, 2}, {1, 2}, 2); };
  auto q = [&](const aq::QuantConfig& c) {
    return F::convolution(x, w, b, {2, 1}, {1, 2}, {1, 2}, false, {0, 0}, 2, c, nullptr);
  };
  EXPECT_TRUE(torch::equal(q(bits(2)), exact()));
  auto probe = torch::randn_like(exact());
  const auto wb = weight_bound(
      [](const torch::Tensor& xx, const torch::Tensor& ww) { return torch::conv2d(xx, ww, {}, {2, 1}, {1, 2}, {1, 2}, 2); },
      x, w, probe);
  check_gradients(q, exact, {x, w, b}, probe, 0.0, {torch::zeros_like(x), wb, torch::zeros_like(b)});
  // Depthwise 1d and transposed 3d as well.
  auto x1 = torch::randn({5, 6, 30}, opts()).requires_grad_();
  auto w1 = torch::randn({6, 1, 5}, opts()).requires_grad_();
  auto e1 = [&] { return torch::conv1d(x1, w1, {}, 1, 2, 1, 6); };
  auto q1 = [&](const aq::QuantConfig& c) {
    return F::convolution(x1, w1, std::nullopt, {1}, {2}, {1}, false, {0}, 6, c, nullptr);
  };
  auto p1 = torch::randn_like(e1());
  const auto wb1 = weight_bound(
      [](const torch::Tensor& xx, const torch::Tensor& ww) { return torch::conv1d(xx, ww, {}, 1, 2, 1, 6); }, x1, w1, p1);
  check_gradients(q1, e1, {x1, w1}, p1, 0.0, {torch::zeros_like(x1), wb1});
  auto x3 = torch::randn({3, 4, 5, 6, 4}, opts()).requires_grad_();
  auto w3 = torch::randn({4, 3, 2, 3, 2}, opts()).requires_grad_();
  auto b3 = torch::randn({3}, opts()).requires_grad_();
  auto e3 = [&] {
    return torch::conv_transpose3d(x3, w3, b3, {2, 1, 2}, {0, 1, 0}, {1, 0, 1}, 1, {1, 1, 1});
  };
  auto q3 = [&](const aq::QuantConfig& c) {
    return F::convolution(x3, w3, b3, {2, 1, 2}, {0, 1, 0}, {1, 1, 1}, true, {1, 0, 1}, 1, c, nullptr);
  };
  {
    // cuDNN's transposed convolution may use atomics; equality holds with its
    // deterministic algorithms, which both sides then use.
    const bool was = at::globalContext().deterministicCuDNN();
    at::globalContext().setDeterministicCuDNN(true);
    EXPECT_TRUE(torch::equal(q3(bits(2)), e3()));
    at::globalContext().setDeterministicCuDNN(was);
  }
  auto p3 = torch::randn_like(e3());
  const auto wb3 = weight_bound(
      [](const torch::Tensor& xx, const torch::Tensor& ww) {
        return torch::conv_transpose3d(xx, ww, {}, {2, 1, 2}, {0, 1, 0}, {1, 0, 1}, 1, {1, 1, 1});
      },
      x3, w3, p3);
  check_gradients(q3, e3, {x3, w3, b3}, p3, 0.0, {torch::zeros_like(x3), wb3, torch::zeros_like(b3)});
}

TEST_P(Ops, BatchNormMatchesLibTorch) {
  auto x = (torch::randn({8, 5, 7, 7}, opts()) * 2 + 1).requires_grad_();
  auto w = torch::rand({5}, opts()).add_(0.5).requires_grad_();
  auto b = torch::randn({5}, opts()).requires_grad_();
  auto rm = torch::zeros({5}, opts()), rv = torch::ones({5}, opts());
  auto rm2 = rm.clone(), rv2 = rv.clone();
  auto y = F::batch_norm(x, w, b, rm, rv, 0.1, 1e-5, bits(2), nullptr);
  auto ye = torch::batch_norm(x, w, b, rm2, rv2, true, 0.1, 1e-5, false);
  EXPECT_TRUE(torch::allclose(y, ye, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(rm, rm2, 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(rv, rv2, 1e-6, 1e-7));
  auto probe = torch::randn_like(ye);
  auto q = [&](const aq::QuantConfig& c) { return F::batch_norm(x, w, b, rm, rv, 0.1, 1e-5, c, nullptr); };
  auto e_exact = [&] { return torch::batch_norm(x, w, b, rm2, rv2, true, 0.1, 1e-5, false); };
  // Bounds from the step: with the saved mean and invstd exact, the
  // normalised input is off by at most step * invstd per element; dL/dw is
  // linear in it, dL/dx = w invstd / M (M g - sum g - xhat sum(g xhat)) is
  // off by the first-order terms plus a second-order one; dL/db is exact.
  const double step = (x.max() - x.min()).item<double>() / 255 + 2e-6;
  auto xd = x.detach();
  auto shape = std::vector<int64_t>{1, 5, 1, 1};
  const std::vector<int64_t> dims = {0, 2, 3};
  auto mean = xd.mean(dims, true);
  auto invstd = 1 / torch::sqrt(xd.var(dims, /*unbiased=*/false, true) + 1e-5);
  auto xhat = (xd - mean) * invstd;
  const double M = 8 * 7 * 7;
  auto e = step * invstd;  // error bound of xhat
  auto sum_abs_g = probe.abs().sum(dims, true);
  auto bound_w = (sum_abs_g * e).reshape({5});
  auto bound_x = w.detach().abs().view(shape) * invstd / M *
                 (e * (probe * xhat).sum(dims, true).abs() + (xhat.abs() + e) * sum_abs_g * e);
  check_gradients(q, e_exact, {x, w, b}, probe, 0.0, {bound_x * 1.01, bound_w * 1.01, torch::zeros_like(b)});

  // overwrite_input: the output is written over a non-leaf input, with the
  // same values, running statistics and gradients (same random rounding),
  // to the last bit or so;
  // a leaf is never overwritten.
  for (const bool channels_last : {false, true}) {
    auto xl = channels_last ? x.detach().contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_()
                            : x.detach().clone().requires_grad_();
    auto run = [&](bool overwrite, torch::Tensor* out, torch::Tensor* r_mean) {
      auto rm3 = torch::zeros({5}, opts()), rv3 = torch::ones({5}, opts());
      auto c = bits(2);
      c.stochastic = false;
      auto in = xl * 1.0;  // not a leaf
      auto y3 = F::batch_norm(in, w, b, rm3, rv3, 0.1, 1e-5, c, aq::make_layer_state(), overwrite);
      EXPECT_EQ(y3.data_ptr() == in.data_ptr(), overwrite);
      *out = y3.detach().clone();
      *r_mean = rv3;
      return grads([&] { return y3; }, {xl, w, b}, probe);
    };
    torch::Tensor y_new, y_over, rv_new, rv_over;
    const auto g_new = run(false, &y_new, &rv_new);
    const auto g_over = run(true, &y_over, &rv_over);
    // On CUDA the statistics and the output come from other kernels than
    // LibTorch's batch_norm: last-bit differences.
    EXPECT_TRUE(torch::allclose(y_over, y_new, 1e-6, 1e-6));
    EXPECT_TRUE(torch::allclose(rv_over, rv_new, 1e-6, 1e-7));
    for (size_t i = 0; i < g_new.size(); ++i) EXPECT_TRUE(torch::allclose(g_over[i], g_new[i], 1e-5, 1e-6)) << i;
  }
  auto leaf = x.detach().clone().requires_grad_();
  auto kept = leaf.detach().clone();
  F::batch_norm(leaf, w, b, rm, rv, 0.1, 1e-5, bits(2), aq::make_layer_state(), true);
  EXPECT_TRUE(torch::equal(leaf, kept));
}

// BatchNorm written over its input (channels last, as training runs it):
// output and running statistics as LibTorch's to within rounding, also for
// data far from zero, and the group ranges the allocation reads exactly the
// range pass's; for the channel counts and layouts the statistics kernel
// takes and for those it leaves to LibTorch.
TEST_P(Ops, BatchNormStatisticsAndGroupRanges) {
  struct Case {
    int64_t n, c, h;
    torch::Dtype dtype;
    int64_t group;
  };
  const std::vector<Case> cases = {{6, 64, 4, torch::kBFloat16, 256}, {3, 256, 7, torch::kBFloat16, 256},
                                   {2, 2048, 2, torch::kBFloat16, 256}, {5, 64, 3, torch::kBFloat16, 256},
                                   {4, 48, 4, torch::kBFloat16, 256},   {6, 64, 4, torch::kFloat, 128},
                                   {6, 64, 4, torch::kFloat, 256},      {3, 2048, 2, torch::kFloat, 256},
                                   {6, 128, 4, torch::kHalf, 256},      {1000, 64, 1, torch::kBFloat16, 256}};
  for (const auto& k : cases) {
    const std::string what = std::to_string(k.n) + "x" + std::to_string(k.c) + "x" + std::to_string(k.h) + " " +
                             std::string(c10::toString(k.dtype)) + " G " + std::to_string(k.group);
    auto x = (torch::randn({k.n, k.c, k.h, k.h}, opts()) * 0.5 + 30 * torch::rand({1, k.c, 1, 1}, opts()))
                 .to(k.dtype)
                 .contiguous(torch::MemoryFormat::ChannelsLast);
    auto w = torch::rand({k.c}, opts()).add_(0.5), b = torch::randn({k.c}, opts());
    auto rm = torch::randn({k.c}, opts()), rv = torch::rand({k.c}, opts()).add_(0.5);
    auto rm_ref = rm.clone(), rv_ref = rv.clone();
    const auto ref = torch::batch_norm(x, w, b, rm_ref, rv_ref, true, 0.1, 1e-5, false);
    aq::QuantConfig c = bits(2);
    c.ibits = 8;
    c.usegradient = false;
    c.group_size = k.group;
    auto st = aq::make_layer_state();
    auto leaf = x.clone().requires_grad_();
    auto in = leaf * 1.0;  // not a leaf: overwritten
    const auto y = F::batch_norm(in, w, b, rm, rv, 0.1, 1e-5, c, st, true);
    EXPECT_EQ(y.data_ptr(), in.data_ptr()) << what;
    const double tol = k.dtype == torch::kFloat ? 1e-4 : 0.05;
    EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), ref.to(torch::kFloat), tol, tol)) << what;
    EXPECT_TRUE(torch::allclose(rm, rm_ref, 1e-5, 1e-5)) << what << "\n" << (rm - rm_ref).abs().max();
    EXPECT_TRUE(torch::allclose(rv, rv_ref, 1e-4, 1e-5)) << what << "\n" << (rv - rv_ref).abs().max();
    // The range pass's values, from x as it was.
    const auto flat = x.permute({0, 2, 3, 1}).reshape({k.n, -1}).to(torch::kFloat);
    const int64_t d = flat.size(1), full = d / k.group * k.group;
    auto parts = flat.narrow(1, 0, full).view({k.n, -1, k.group});
    auto r2 = (parts.amax(2) - parts.amin(2)).pow(2);
    if (full < d) {
      auto tail = flat.narrow(1, full, d - full);
      r2 = torch::cat({r2, (tail.amax(1, true) - tail.amin(1, true)).pow(2)}, 1);
    }
    ASSERT_TRUE(st->range_sq.defined()) << what;
    // The same per-group values, summed in another order.
    EXPECT_TRUE(torch::allclose(st->range_sq, r2.sum(1), 1e-6, 0)) << what;
  }
  // A NaN makes its sample's ranges NaN, and only its sample's.
  auto x = torch::randn({4, 64, 4, 4}, opts()).to(torch::kBFloat16).contiguous(torch::MemoryFormat::ChannelsLast);
  x.select(0, 2).select(0, 5).select(0, 1).select(0, 3).fill_(NAN);
  aq::QuantConfig c = bits(2);
  c.ibits = 8;
  auto st = aq::make_layer_state();
  auto leaf = x.clone().requires_grad_();
  F::batch_norm(leaf * 1.0, std::nullopt, std::nullopt, torch::Tensor(), torch::Tensor(), 0.1, 1e-5, c, st, true);
  const auto r = st->range_sq.cpu();
  EXPECT_TRUE(std::isnan(r[2].item<float>()));
  EXPECT_TRUE(torch::isfinite(r.index({torch::tensor({0, 1, 3})})).all().item<bool>());
}

// A conv's gradient statistics are its output gradient's per-sample squared
// norms, whether the BatchNorm after it summed them as it wrote that
// gradient (CUDA, channels last) or the conv's backward reads them, and
// also when the gradient the BatchNorm wrote is added to before the conv
// receives it.
TEST_P(Ops, GradientStatisticsThroughBatchNorm) {
  auto ca = bits(2);
  ca.ibits = 8;
  ca.usegradient = false;
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const bool last : {true, false}) {
      for (const bool shared : {false, true}) {
        auto x = torch::randn({6, 16, 10, 10}, opts().dtype(dtype));
        if (last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        auto w = (torch::randn({32, 16, 3, 3}, opts().dtype(dtype)) * 0.1).requires_grad_();
        auto bw = torch::rand({32}, opts()).add_(0.5).requires_grad_();
        auto bb = torch::randn({32}, opts()).requires_grad_();
        auto rm = torch::zeros({32}, opts()), rv = torch::ones({32}, opts());
        auto cst = aq::make_layer_state(), bst = aq::make_layer_state();
        auto y = F::convolution(x, w, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, ca, cst);
        y.retain_grad();
        auto z = F::batch_norm(y, bw, bb, rm, rv, 0.1, 1e-5, ca, bst);
        auto loss = (z * torch::randn_like(z)).sum();
        if (shared) loss = loss + (y * torch::randn_like(y)).sum();  // y's gradient: the BatchNorm's plus another
        loss.backward();
        ASSERT_TRUE(cst->grad_sq.defined());
        const auto want = y.grad().reshape({6, -1}).to(torch::kFloat).pow(2).sum(1);
        EXPECT_TRUE(torch::allclose(cst->grad_sq.cpu(), want.cpu(), 1e-4, 0))
            << dtype << " last " << last << " shared " << shared << "\n" << cst->grad_sq << want;
        EXPECT_NEAR(cst->grad_mean.item<double>(), want.mean().item<double>(), 1e-4 * want.mean().item<double>());
      }
    }
  }
}

// ReLU and its mask in one pass: LibTorch's values bit for bit (NaN, -0.0,
// infinities), either layout, sizes off the kernels' chunks, in place or not.
TEST_P(Ops, ReluAndMaskMatchLibTorch) {
  for (const auto dtype : {torch::kFloat, torch::kHalf, torch::kBFloat16, torch::kDouble}) {
    for (const bool last : {false, true}) {
      for (const auto& shape : std::vector<std::vector<int64_t>>{{4, 3, 9, 9}, {2, 64, 7, 7}, {1, 1, 1, 1}}) {
        auto x = torch::randn(shape, opts().dtype(torch::kFloat)).to(dtype);
        auto flat = x.view({-1});
        if (flat.numel() >= 6) {
          const double special[] = {NAN, -0.0, 0.0, INFINITY, -INFINITY, -1e-30};
          for (int i = 0; i < 6; ++i) flat.narrow(0, i * (flat.numel() / 6), 1).fill_(special[i]);
        }
        if (last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
        const auto ref = torch::relu(x);
        const auto same_bits = [&](const torch::Tensor& a) {
          const auto ity = dtype == torch::kDouble ? torch::kLong : dtype == torch::kFloat ? torch::kInt : torch::kShort;
          return a.strides() == x.strides() && torch::equal(a.contiguous().view(ity), ref.contiguous().view(ity));
        };
        const auto want = aq::pack_positive(ref);
        auto [y, packed] = aq::relu_and_mask(x, false);
        EXPECT_TRUE(same_bits(y)) << dtype << " last " << last;
        EXPECT_TRUE(torch::equal(packed, want)) << dtype << " last " << last;
        auto x2 = x.clone();
        const auto v0 = x2._version();
        auto [y2, packed2] = aq::relu_and_mask(x2, true);
        EXPECT_EQ(y2.data_ptr(), x2.data_ptr());
        EXPECT_GT(x2._version(), v0);
        EXPECT_TRUE(same_bits(y2)) << dtype << " last " << last;
        EXPECT_TRUE(torch::equal(packed2, want)) << dtype << " last " << last;
      }
    }
  }
  EXPECT_THROW(aq::relu_and_mask(torch::ones({3}, opts().dtype(torch::kInt)), false), std::invalid_argument);

  // The next layer's group ranges from the same pass (CUDA, groups of one
  // warp's loads, whole groups per sample), equal to the range pass's;
  // through the functional API a conv reading the output takes them.
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const int64_t g = 32 * 16 / torch::elementSize(dtype);
    auto x = torch::randn({3, 64, 8, 8}, opts()).to(dtype).contiguous(torch::MemoryFormat::ChannelsLast);
    x.select(0, 1).select(0, 7).select(0, 2).select(0, 3).fill_(NAN);
    torch::Tensor r2;
    auto [y, packed] = aq::relu_and_mask(x, false, g, &r2);
    const auto flat = y.permute({0, 2, 3, 1}).reshape({3, -1, g}).to(torch::kFloat);
    const auto want = (flat.amax(2) - flat.amin(2)).pow(2);
    if (x.is_cuda()) {
      ASSERT_TRUE(r2.defined());
      EXPECT_TRUE(torch::allclose(r2, want, 0, 0, /*equal_nan=*/true)) << dtype;
    } else {
      EXPECT_FALSE(r2.defined());
    }
    torch::Tensor none;
    aq::relu_and_mask(x, false, g / 2, &none);  // not a warp's loads: none
    EXPECT_FALSE(none.defined());

    auto leaf = x.nan_to_num(0).requires_grad_();
    auto h = leaf * 1.0;
    auto c = bits(2);
    c.ibits = 8;
    c.group_size = g;
    auto st = aq::make_layer_state();
    auto w = torch::randn({8, 64, 1, 1}, opts().dtype(dtype)).contiguous(torch::MemoryFormat::ChannelsLast);
    auto out = F::convolution(F::relu(h, true, nullptr, g), w, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                              c, st);
    const auto hf = h.detach().permute({0, 2, 3, 1}).reshape({3, -1, g}).to(torch::kFloat);
    const auto sum = (hf.amax(2) - hf.amin(2)).pow(2).sum(1);
    ASSERT_TRUE(st->range_sq.defined());
    EXPECT_TRUE(torch::allclose(st->range_sq, sum, 1e-6, 0)) << dtype;
  }
}

TEST_P(Ops, ReluAndDropoutMasksAreExact) {
  auto x = torch::randn({4, 3, 9, 9}, opts()).requires_grad_();
  auto probe = torch::randn_like(x);
  auto st = aq::make_layer_state();
  const auto ge = grads([&] { return torch::relu(x); }, {x}, probe);
  const auto gq = grads([&] { return F::relu(x, false, st); }, {x}, probe);
  EXPECT_TRUE(torch::equal(gq[0], ge[0]));
  EXPECT_EQ(st->saved_bytes, aq::packed_bits_nbytes(x.numel(), 1));
  // In place: the input's storage is overwritten, gradients unchanged.
  auto y0 = x.detach().clone().requires_grad_();
  auto y1 = y0 * 1.0;
  auto out = F::relu(y1, true, nullptr);
  EXPECT_EQ(out.data_ptr(), y1.data_ptr());
  (out * probe).sum().backward();
  EXPECT_TRUE(torch::equal(y0.grad(), ge[0]));

  const double p = 0.3;
  auto xd = (torch::rand({64, 256}, opts()) + 0.5).requires_grad_();
  auto yd = F::dropout(xd, p, nullptr);
  auto keep = yd != 0;
  EXPECT_TRUE(torch::allclose(yd, xd * keep / (1 - p), 1e-6, 0));
  const double frac = keep.to(torch::kFloat).mean().item<double>();
  EXPECT_NEAR(frac, 1 - p, 6 * std::sqrt(p * (1 - p) / keep.numel()));
  auto pd = torch::randn_like(yd);
  (yd * pd).sum().backward();
  EXPECT_TRUE(torch::allclose(xd.grad(), pd * keep / (1 - p), 1e-6, 0));
  EXPECT_THROW(F::dropout(xd, 1.5, nullptr), std::invalid_argument);
}

// Passes x through and doubles its gradient into a tensor of its own,
// whose address it keeps: where the gradient goes from there.
struct Spy : torch::autograd::Function<Spy> {
  static inline const void* grad_ptr = nullptr;
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x) { return x.clone(); }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    auto g = grads[0] * 2;
    grad_ptr = g.data_ptr();
    return {g};
  }
};

// ReLU's and dropout's backward write over their incoming gradient where
// nothing else holds it (one tensor of the activation's size fewer), and
// leave it alone where something does: an addition's two inputs share
// one, and a gradient the caller passes to backward() is the caller's.
TEST_P(Ops, MaskBackwardWritesOverTheGradientOnlyWhereItIsUnshared) {
  auto x = torch::randn({4, 3, 8, 8}, opts()).requires_grad_();
  auto probe = torch::randn({4, 3, 8, 8}, opts());
  const auto mask = (x.detach() > 0).to(torch::kFloat);
  Spy::apply(F::relu(x, false, nullptr)).mul(probe).sum().backward();
  EXPECT_EQ(x.grad().data_ptr(), Spy::grad_ptr) << "the gradient was copied, not overwritten";
  EXPECT_TRUE(torch::equal(x.grad(), probe * 2 * mask));
  auto xd = torch::randn({64, 100}, opts()).requires_grad_();
  auto yd = F::dropout(xd, 0.5, nullptr);
  const auto keep = (yd.detach() != 0).to(torch::kFloat);
  Spy::apply(yd).sum().backward();
  EXPECT_EQ(xd.grad().data_ptr(), Spy::grad_ptr);
  EXPECT_TRUE(torch::equal(xd.grad(), keep * 4));

  // One gradient for both inputs of an addition.
  auto x1 = torch::randn({5, 40}, opts()).requires_grad_(), x2 = torch::randn({5, 40}, opts()).requires_grad_();
  auto p = torch::randn({5, 40}, opts());
  (F::relu(x1, false, nullptr) + F::relu(x2, false, nullptr)).mul(p).sum().backward();
  EXPECT_TRUE(torch::equal(x1.grad(), p * (x1.detach() > 0)));
  EXPECT_TRUE(torch::equal(x2.grad(), p * (x2.detach() > 0)));
  // The caller's gradient.
  auto x3 = torch::randn({5, 40}, opts()).requires_grad_();
  const auto g = torch::randn({5, 40}, opts()), g0 = g.clone();
  F::relu(x3, false, nullptr).backward(g);
  EXPECT_TRUE(torch::equal(g, g0)) << "the caller's gradient was overwritten";
  EXPECT_TRUE(torch::equal(x3.grad(), g * (x3.detach() > 0)));
}

TEST_P(Ops, MicroBatchedBackwardGivesTheSameGradients) {
  // Nearest rounding: the same codes with and without micro-batches.
  auto c = bits(4);
  c.stochastic = false;
  auto micro = c;
  micro.micro_batch_backward = true;
  micro.micro_batch_bytes = 3 * 6 * 10 * 10 * 4;  // three samples at a time
  auto x = torch::randn({10, 6, 10, 10}, opts()).requires_grad_();
  auto w = torch::randn({4, 6, 3, 3}, opts()).requires_grad_();
  auto b = torch::randn({4}, opts()).requires_grad_();
  auto st = aq::make_layer_state();
  st->bits = torch::randint(1, 9, {10}, torch::kInt);  // per-sample bits too
  auto conv = [&](const aq::QuantConfig& cfg) {
    return F::convolution(x, w, b, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, cfg, st);
  };
  auto probe = torch::randn({10, 4, 10, 10}, opts());
  const auto whole = grads([&] { return conv(c); }, {x, w, b}, probe);
  const auto parts = grads([&] { return conv(micro); }, {x, w, b}, probe);
  // Same codes, sums in another order: equal to float accumulation error.
  for (size_t i = 0; i < whole.size(); ++i)
    EXPECT_LE((parts[i] - whole[i]).abs().max().item<double>(), 1e-5 * whole[i].abs().max().item<double>()) << i;
  auto xl = torch::randn({10, 7, 30}, opts()).requires_grad_();
  auto wl = torch::randn({5, 30}, opts()).requires_grad_();
  micro.micro_batch_bytes = 2 * 7 * 30 * 4;
  auto pl = torch::randn({10, 7, 5}, opts());
  const auto lw = grads([&] { return F::linear(xl, wl, std::nullopt, c, nullptr); }, {xl, wl}, pl);
  const auto lp = grads([&] { return F::linear(xl, wl, std::nullopt, micro, nullptr); }, {xl, wl}, pl);
  EXPECT_LE((lp[1] - lw[1]).abs().max().item<double>(), 1e-5 * lw[1].abs().max().item<double>());
  // BatchNorm restores its input twice (sums, then the input gradient),
  // channels_last kept.
  auto xb = (torch::randn({10, 6, 5, 7}, opts()) * 3 + 1).contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_();
  auto gamma = torch::rand({6}, opts()).add_(0.5).requires_grad_();
  auto beta = torch::randn({6}, opts()).requires_grad_();
  micro.micro_batch_bytes = 3 * 6 * 5 * 7 * 4;
  auto pb = torch::randn({10, 6, 5, 7}, opts());
  auto bn = [&](const aq::QuantConfig& cfg) {
    auto rm = torch::zeros({6}, opts()), rv = torch::ones({6}, opts());
    return F::batch_norm(xb, gamma, beta, rm, rv, 0.1, 1e-5, cfg, aq::make_layer_state());
  };
  const auto bw = grads([&] { return bn(c); }, {xb, gamma, beta}, pb);
  const auto bp = grads([&] { return bn(micro); }, {xb, gamma, beta}, pb);
  for (size_t i = 0; i < bw.size(); ++i)
    EXPECT_LE((bp[i] - bw[i]).abs().max().item<double>(), 1e-5 * bw[i].abs().max().item<double>()) << "bn " << i;
  EXPECT_TRUE(bp[0].is_contiguous(torch::MemoryFormat::ChannelsLast));
}

// On CUDA, a BatchNorm whose input is restored in one piece writes the
// input gradient over the restored input: beyond the output gradient,
// backward holds one tensor of the input's size, not two.  The gradients
// are those of the micro-batched path (LibTorch's elementwise kernel), for
// fp32 and bf16 and an output gradient in another layout than the input.
// BatchNorm written over its input (as the models' blocks run it): LibTorch's
// output and running statistics to the last bit or so (on CUDA, LibTorch's
// statistics kernel and our own output kernel), in both layouts, for fp32
// and bf16, with and without vectorised channels.
TEST_P(Ops, BatchNormOverTheInputMatchesLibTorch) {
  const auto CL = torch::MemoryFormat::ChannelsLast, NCHW = torch::MemoryFormat::Contiguous;
  for (auto fmt : {CL, NCHW})
    for (auto dt : {torch::kFloat, torch::kBFloat16})
      for (int64_t ch : {16, 5}) {
        const auto x = (torch::randn({6, ch, 9, 8}, opts(dt)) * 3 + 1).contiguous(fmt);
        const auto w = torch::rand({ch}, opts()) + 0.5, b = torch::randn({ch}, opts());
        auto rm = torch::randn({ch}, opts()), rv = torch::rand({ch}, opts()) + 1;
        auto rm2 = rm.clone(), rv2 = rv.clone();
        const auto ye = torch::batch_norm(x, w, b, rm, rv, true, 0.1, 1e-5, false);
        const auto leaf = x.clone().requires_grad_();
        auto in = leaf * 1.0;  // not a leaf: written over
        auto c = bits(2);
        const auto y = F::batch_norm(in, w, b, rm2, rv2, 0.1, 1e-5, c, aq::make_layer_state(), /*overwrite=*/true);
        const std::string what = std::to_string(ch) + " " + c10::toString(dt) + (fmt == CL ? " CL" : " NCHW");
        EXPECT_EQ(y.data_ptr(), in.data_ptr()) << what;
        const double tol = dt == torch::kFloat ? 1e-5 : 2e-2;  // bf16: a rounding either way
        EXPECT_TRUE(torch::allclose(y, ye, tol, tol)) << what << " " << (y - ye).abs().max().item<double>();
        EXPECT_TRUE(torch::allclose(rm2, rm, 1e-6, 1e-7)) << what;
        EXPECT_TRUE(torch::allclose(rv2, rv, 1e-6, 1e-7)) << what;
      }
}

TEST_P(Ops, BatchNormInputGradientOverTheRestoredInput) {
  if (!dev().is_cuda()) GTEST_SKIP() << "on the CPU, backward is LibTorch's batch_norm_backward";
  const auto CL = torch::MemoryFormat::ChannelsLast, NCHW = torch::MemoryFormat::Contiguous;
  struct Case {
    int64_t ch, hw;
    torch::MemoryFormat x, dy;  // the vectorised kernel in each layout, any layouts, one element a thread
  };
  for (const Case& k : {Case{32, 28, CL, CL}, Case{32, 28, NCHW, NCHW}, Case{32, 28, CL, NCHW}, Case{5, 7, CL, CL},
                        Case{6, 5, NCHW, NCHW}})
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      const int64_t n = 64, ch = k.ch, hw = k.hw;
      const int64_t unit = n * ch * hw * hw * torch::elementSize(dt);
      auto c = bits(8);
      c.stochastic = false;
      auto micro = c;
      micro.micro_batch_backward = true;
      micro.micro_batch_bytes = unit / 4;
      // Two values only: every group's minimum and maximum, restored exactly
      // (codes 0 and 255, rounded to nearest) whatever the groups, so both
      // paths match LibTorch's gradients.
      auto x = (torch::randint(0, 2, {n, ch, hw, hw}, opts(dt)) * 2 - 0.5).contiguous(k.x);
      x.requires_grad_();
      auto gamma = torch::rand({ch}, opts()).add_(0.5).requires_grad_();
      auto beta = torch::randn({ch}, opts()).requires_grad_();
      auto probe = torch::randn({n, ch, hw, hw}, opts(dt)).contiguous(k.dy);
      auto bn = [&](const aq::QuantConfig& cfg) {
        auto rm = torch::zeros({ch}, opts()), rv = torch::ones({ch}, opts());
        return F::batch_norm(x, gamma, beta, rm, rv, 0.1, 1e-5, cfg, aq::make_layer_state());
      };
      const std::string what = std::to_string(ch) + "x" + std::to_string(hw) + " " + c10::toString(dt);
      const auto exact = grads(
          [&] {
            auto rm = torch::zeros({ch}, opts()), rv = torch::ones({ch}, opts());
            return torch::batch_norm(x, gamma, beta, rm, rv, true, 0.1, 1e-5, false);
          },
          {x, gamma, beta}, probe);
      const auto whole = grads([&] { return bn(c); }, {x, gamma, beta}, probe);
      const auto parts = grads([&] { return bn(micro); }, {x, gamma, beta}, probe);
      const double tol = dt == torch::kFloat ? 1e-4 : 2e-2;  // bf16: the input gradient rounded once
      for (size_t i = 0; i < whole.size(); ++i) {
        const double scale = exact[i].abs().max().item<double>();
        EXPECT_LE((whole[i] - exact[i]).abs().max().item<double>(), tol * scale) << i << " " << what;
        EXPECT_LE((parts[i] - exact[i]).abs().max().item<double>(), tol * scale) << i << " " << what << " micro";
      }
      EXPECT_TRUE(whole[0].is_contiguous(k.x)) << what;
      EXPECT_EQ(whole[0].scalar_type(), dt);
      // The backward's peak: the output gradient and the restored input.
      x.mutable_grad() = torch::Tensor();
      auto loss = (bn(c) * probe).sum();
      const int64_t base = aq::memory(dev()).allocated;
      aq::reset_peak(dev());
      loss.backward();
      const int64_t peak = aq::memory(dev()).peak - base;
      if (unit >= (1 << 20)) {  // small ones are rounded up to the allocator's blocks
        EXPECT_LT(peak, unit * 5 / 2) << "backward held " << double(peak) / unit << " inputs' worth, " << what;
      }
    }
}

TEST_P(Ops, PoolingIsExact) {
  auto x = torch::randn({3, 4, 21, 19}, opts()).requires_grad_();
  struct Case {
    std::vector<int64_t> k, s, p, d;
    bool ceil;
  };
  for (const Case& c : {Case{{3, 3}, {2, 2}, {1, 1}, {2, 2}, true}, Case{{2, 3}, {1, 2}, {0, 1}, {1, 1}, false},
                        Case{{17, 17}, {1, 1}, {0, 0}, {1, 1}, false}}) {
    auto st = aq::make_layer_state();
    auto exact = [&] { return torch::max_pool2d(x, c.k, c.s, c.p, c.d, c.ceil); };
    auto ye = exact();
    auto yq = F::max_pool(x, c.k, c.s, c.p, c.d, c.ceil, st);
    EXPECT_TRUE(torch::equal(yq, ye));
    auto probe = torch::randn_like(ye);
    const auto ge = grads(exact, {x}, probe);
    const auto gq = grads([&] { return F::max_pool(x, c.k, c.s, c.p, c.d, c.ceil, st); }, {x}, probe);
    EXPECT_TRUE(torch::allclose(gq[0], ge[0], 1e-6, 1e-6)) << c.k[0];
    EXPECT_EQ(st->saved_bytes, aq::packed_bits_nbytes(ye.numel(), aq::index_bits(c.k[0] * c.k[1])));
  }
  auto x1 = torch::randn({2, 3, 40}, opts()).requires_grad_();
  auto e1 = [&] { return torch::max_pool1d(x1, {5}, {3}, {2}, {2}, true); };
  const auto g1 = grads(e1, {x1}, torch::ones_like(e1()));
  const auto q1 = grads([&] { return F::max_pool(x1, {5}, {3}, {2}, {2}, true, nullptr); }, {x1}, torch::ones_like(e1()));
  EXPECT_TRUE(torch::equal(q1[0], g1[0]));
  auto x3 = torch::randn({2, 2, 7, 8, 9}, opts()).requires_grad_();
  auto e3 = [&] { return torch::max_pool3d(x3, {2, 3, 2}, {2, 2, 1}, {1, 1, 0}, {1, 2, 1}, false); };
  auto p3 = torch::randn_like(e3());
  const auto g3 = grads(e3, {x3}, p3);
  const auto q3 = grads([&] { return F::max_pool(x3, {2, 3, 2}, {2, 2, 1}, {1, 1, 0}, {1, 2, 1}, false, nullptr); },
                        {x3}, p3);
  EXPECT_TRUE(torch::allclose(q3[0], g3[0], 1e-6, 1e-6));

  auto ea = [&] { return torch::avg_pool2d(x, {3, 2}, {2, 2}, {1, 0}, true, false, 5); };
  auto pa = torch::randn_like(ea());
  EXPECT_TRUE(torch::equal(grads(ea, {x}, pa)[0],
                           grads([&] { return F::avg_pool2d(x, {3, 2}, {2, 2}, {1, 0}, true, false, 5); }, {x}, pa)[0]));
  auto ead = [&] { return torch::adaptive_avg_pool2d(x, {5, 4}); };
  auto pad = torch::randn_like(ead());
  EXPECT_TRUE(torch::allclose(grads(ead, {x}, pad)[0],
                              grads([&] { return F::adaptive_avg_pool2d(x, {5, 4}); }, {x}, pad)[0], 1e-6, 1e-7));
  // A global average (output 1x1): LibTorch's gradient bits, in the input's layout.
  for (auto fmt : {torch::MemoryFormat::Contiguous, torch::MemoryFormat::ChannelsLast}) {
    auto xg = torch::randn({3, 5, 7, 6}, opts()).contiguous(fmt).requires_grad_();
    auto eg = [&] { return torch::adaptive_avg_pool2d(xg, {1, 1}); };
    auto pg = torch::randn_like(eg());
    const auto ours = grads([&] { return F::adaptive_avg_pool2d(xg, {1, 1}); }, {xg}, pg)[0];
    EXPECT_TRUE(torch::equal(ours, grads(eg, {xg}, pg)[0]));
    EXPECT_TRUE(ours.is_contiguous(fmt));
  }
}

// Ties (the first largest in window order wins), NaN (it wins), both layouts
// and the half types: the same output and, where windows overlap, the same
// gradient bits as LibTorch's max pool.
TEST_P(Ops, MaxPoolMatchesLibTorchOnTiesAndNaN) {
  for (auto fmt : {torch::MemoryFormat::Contiguous, torch::MemoryFormat::ChannelsLast})
    for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
      auto x = torch::randint(-3, 3, {4, 5, 23, 18}, opts(dt));
      x[1][2][5][7] = std::numeric_limits<double>::quiet_NaN();
      x = x.contiguous(fmt).requires_grad_();
      for (const auto& [k, str, pad] : {std::tuple<int64_t, int64_t, int64_t>{3, 2, 1}, {3, 1, 1}, {2, 2, 0}}) {
        auto exact = [&] { return torch::max_pool2d(x, {k, k}, {str, str}, {pad, pad}, {1, 1}, true); };
        auto pool = [&] { return F::max_pool(x, {k, k}, {str, str}, {pad, pad}, {1, 1}, true, nullptr); };
        const auto ye = exact(), yq = pool();
        const std::string what = std::to_string(k) + "/" + std::to_string(str) + " " + c10::toString(dt);
        EXPECT_TRUE(torch::allclose(yq, ye, 0, 0, /*equal_nan=*/true)) << what;
        EXPECT_EQ(yq.suggest_memory_format(), ye.suggest_memory_format()) << what;
        const auto probe = torch::randn(ye.sizes(), opts(dt));
        const auto ge = grads(exact, {x}, probe), gq = grads(pool, {x}, probe);
        EXPECT_TRUE(torch::equal(gq[0], ge[0])) << what;
        EXPECT_TRUE(gq[0].is_contiguous(fmt)) << what;
      }
    }
}

// A batch of more than 2^22 output elements has its window indices converted
// a slice of samples at a time (LibTorch's kernels, the CPU; CUDA's own
// kernels take it whole); the gradient keeps the input's layout.  An
// unbatched input pools as one sample.
TEST_P(Ops, MaxPoolSlicesLargeBatchesAndKeepsTheLayout) {
  auto x = torch::randn({5, 2, 1200, 800}, opts()).contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_();
  auto exact = [&] { return torch::max_pool2d(x, {3, 3}, {1, 1}, {1, 1}, {1, 1}, false); };
  auto st = aq::make_layer_state();
  auto pool = [&] { return F::max_pool(x, {3, 3}, {1, 1}, {1, 1}, {1, 1}, false, st); };
  EXPECT_TRUE(torch::equal(pool(), exact()));
  const auto probe = torch::randn_like(exact());
  const auto ge = grads(exact, {x}, probe);
  const auto gq = grads(pool, {x}, probe);
  EXPECT_TRUE(gq[0].is_contiguous(torch::MemoryFormat::ChannelsLast));
  EXPECT_TRUE(torch::allclose(gq[0], ge[0], 1e-6, 1e-6));

  auto u = torch::randn({4, 21, 19}, opts()).requires_grad_();
  auto eu = [&] { return torch::max_pool2d(u, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true); };
  auto pu = torch::randn_like(eu());
  EXPECT_TRUE(torch::allclose(grads([&] { return F::max_pool(u, {3, 3}, {2, 2}, {1, 1}, {1, 1}, true, nullptr); },
                                    {u}, pu)[0],
                              grads(eu, {u}, pu)[0], 1e-6, 1e-6));
}

TEST_P(Ops, UncompressedConfigsAreLibTorch) {
  auto x = torch::randn({4, 12}, opts()).requires_grad_();
  auto w = torch::randn({3, 12}, opts()).requires_grad_();
  auto probe = torch::randn({4, 3}, opts());
  for (const char* level : {"L0"}) {
    auto c = aq::QuantConfig::for_level(aq::parse_level(level));
    const auto ge = grads([&] { return torch::linear(x, w, {}); }, {x, w}, probe);
    const auto gq = grads([&] { return F::linear(x, w, std::nullopt, c, nullptr); }, {x, w}, probe);
    EXPECT_TRUE(torch::equal(ge[1], gq[1]));
  }
  // No gradient needed: nothing is saved, the result is the same.
  torch::NoGradGuard no_grad;
  auto st = aq::make_layer_state();
  EXPECT_TRUE(torch::equal(F::linear(x, w, std::nullopt, bits(2), st), torch::linear(x, w, {})));
  EXPECT_EQ(st->saved_bytes, 0);
}

}  // namespace
