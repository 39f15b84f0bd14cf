// Transformer layers and models: each compressed op's forward is LibTorch's
// bit for bit; gradients close at 8 bits, unbiased at 2 bits where the
// saved form enters the gradient linearly, within the documented bias bound
// where it does not (docs/design.md §4); the Q modules are their twins; the
// ViT and GPT build, train at every level and hold less memory.
#include "aq/adaptive.h"
#include "aq/functional.h"
#include "aq/memory.h"
#include "aq/models.h"
#include "aq/modules.h"
#include "device_test.h"
#include "grads.h"

#include <ATen/SDPBackend.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>

namespace {

namespace F = aq::functional;
namespace nn = torch::nn;

class Transformer : public DeviceTest {};
AQ_PER_DEVICE(Transformer);

// Per leaf: at 8 bits within `bound8` (elementwise) of the exact gradient;
// at 2 bits the mean over S draws within 6 standard errors plus `bias2`
// (elementwise; undefined: 0, i.e. unbiased) of it.
void check(const std::function<torch::Tensor(const aq::QuantConfig&)>& q, const std::function<torch::Tensor()>& exact,
           const std::vector<torch::Tensor>& leaves, const torch::Tensor& probe,
           const std::vector<torch::Tensor>& bound8, const std::vector<torch::Tensor>& bias2,
           const std::vector<torch::Tensor>& sd_floor = {}, int S = 200) {
  const auto ge = grads(exact, leaves, probe);
  const auto g8 = grads([&] { return q(bits(8)); }, leaves, probe);
  for (size_t i = 0; i < ge.size(); ++i) {
    const double scale = ge[i].abs().max().item<double>() + 1e-12;
    const auto excess = (g8[i] - ge[i]).abs() - bound8[i] - 1e-5 * scale;
    EXPECT_LE(excess.max().item<double>(), 0) << "8-bit gradient " << i;
  }
  const Draws d = draw_grads([&] { return q(bits(2)); }, leaves, probe, S);
  for (size_t i = 0; i < ge.size(); ++i) {
    const auto& mean = d.mean[i];
    const auto& sd = d.sd[i];
    // An element rarely rounded the other way may show no spread in S
    // draws: its spread is then taken from the bound on a rounding's.
    const auto spread = i < sd_floor.size() && sd_floor[i].defined() ? torch::maximum(sd, sd_floor[i].to(torch::kDouble)) : sd;
    auto tol = 6 * spread / std::sqrt(double(S)) + 1e-6 * (ge[i].abs().max().item<double>() + 1e-12);
    if (i < bias2.size() && bias2[i].defined()) tol = tol + bias2[i].to(torch::kDouble);
    const auto err = (mean - ge[i].to(torch::kDouble)).abs();
    EXPECT_TRUE((err <= tol).all().item<bool>()) << "2-bit mean gradient " << i << ": worst excess "
                                                 << (err - tol).max().item<double>();
  }
}

// One step of a b-bit grid over a tensor's whole range (a group's range is
// within it), widened for bf16 range rounding.
double step(const torch::Tensor& t, int b) {
  const double mx = t.max().item<double>(), mn = t.min().item<double>();
  return (mx - mn + (std::abs(mx) + std::abs(mn)) / 128 + 2e-6) / ((1 << b) - 1);
}

TEST_P(Transformer, LayerNormMatchesLibTorch) {
  // Rows of 40 split into no power of two from 32: with groups of 256
  // spanning rows, the normalised input xn is kept.  Rows of 32 are split
  // into groups of 32 whatever the group size, and rows of 96 into groups of
  // 32 where the group size is 64: the input is kept, and its error in xn is
  // rstd times its own.  Each either restored all at once, or (L3.1) three
  // samples at a time.
  struct Case {
    int64_t D, G, groups_of;  // row, configured group size, the groups used (0: xn kept)
  };
  for (const Case k : {Case{40, 256, 0}, Case{32, 256, 32}, Case{32, 32, 32}, Case{96, 64, 32}, Case{128, 64, 64}}) {
    const int64_t D = k.D, G = k.G;
    const bool kept_x = k.groups_of > 0;
    SCOPED_TRACE(::testing::Message() << "row " << D << ", group size " << G);
    auto x = (torch::randn({8, 5, D}, opts()) * 2 + 1).requires_grad_();
    auto w = (torch::randn({D}, opts()) * 0.5 + 1).requires_grad_();
    auto b = torch::randn({D}, opts()).requires_grad_();
    auto probe = torch::randn({8, 5, D}, opts());
    auto st = aq::make_layer_state();
    EXPECT_TRUE(torch::equal(F::layer_norm(x, {D}, w, b, 1e-5, bits(2), st), torch::layer_norm(x, {D}, w, b, 1e-5)));
    auto exact = [&] { return torch::layer_norm(x, {D}, w, b, 1e-5); };
    const auto rstd = 1 / torch::sqrt(x.detach().var(-1, false, true) + 1e-5);
    const auto xn = (x.detach() - x.detach().mean(-1, true)) * rstd;
    for (const bool micro : {false, true}) {
      SCOPED_TRACE(micro ? "micro-batched" : "all at once");
      auto q = [&](aq::QuantConfig c) {
        c.group_size = G;
        c.micro_batch_backward = micro;
        c.micro_batch_bytes = 3 * 5 * D * 4;
        return F::layer_norm(x, {D}, w, b, 1e-5, c, st);
      };
      // Each restored element within a step.  dL/dw = sum g xn (linear in
      // xn_hat: unbiased); dL/dx has the bias rstd / D * w g Var(xn_hat)
      // (docs/design.md §4).
      auto xn_step = [&](int bits) {
        return kept_x ? step(x.detach(), bits) * rstd : step(xn, bits) * torch::ones_like(rstd);
      };
      const auto gw_bound = (probe.abs() * xn_step(8)).sum(std::vector<int64_t>{0, 1});
      const auto gx_bound = 0.05 * torch::ones_like(x) * (probe * w.detach()).abs().max() * rstd.max();
      const auto gx_bias = rstd / D * (w.detach() * probe).abs() * xn_step(2).pow(2) / 4;
      check(q, exact, {x, w, b}, probe, {gx_bound, gw_bound, torch::zeros_like(b)},
            {gx_bias, torch::Tensor(), torch::Tensor()});
      EXPECT_EQ(st->sample_elements, 5 * D);
      EXPECT_LT(st->saved_bytes * 8, x.numel() * 4);  // 2 bits and the bounds: under 4 bits an element
    }
    // Adaptive: the samples are weighed by the ranges of xn, whichever is kept.
    aq::QuantConfig c;
    c.group_size = G;
    auto sa = aq::make_layer_state();
    F::layer_norm(x, {D}, w, b, 1e-5, c, sa);
    ASSERT_TRUE(sa->range_sq.defined());
    const auto v = kept_x ? xn.reshape({8, -1, k.groups_of}) : xn.reshape({8, 1, -1});
    const auto want = (std::get<0>(v.max(2)) - std::get<0>(v.min(2))).pow(2).sum(1).to(torch::kFloat);
    EXPECT_TRUE(torch::allclose(sa->range_sq, want, 1e-3, 1e-4)) << sa->range_sq << want;
    // Sensitivities (what aq-calibrate reports) are read with the layer's
    // configuration (groups of G); a group of g elements adds
    // g range^2 / (4 B^2), so they must count the groups the norm used.
    const int64_t used = kept_x ? k.groups_of : G;
    const auto cn = aq::sensitivities(*sa, c, sa->range_sq, sa->sample_elements, torch::Tensor());
    const auto r2 = sa->range_sq.cpu().to(torch::kDouble);
    for (int64_t n = 0; n < 8; ++n)
      EXPECT_NEAR(cn[n], r2[n].item<double>() * used / 5, 1e-6 * cn[n]) << "sample " << n;
  }
}

TEST_P(Transformer, RMSNormMatchesLibTorch) {
  auto x = (torch::randn({8, 5, 32}, opts()) + 0.5).requires_grad_();
  auto w = (torch::randn({32}, opts()) * 0.5 + 1).requires_grad_();
  auto probe = torch::randn({8, 5, 32}, opts());
  auto st = aq::make_layer_state();
  EXPECT_TRUE(torch::equal(F::rms_norm(x, {32}, w, 1e-6, bits(2), st), torch::rms_norm(x, {32}, w, 1e-6)));
  EXPECT_TRUE(torch::equal(F::rms_norm(x, {32}, w, std::nullopt, bits(2), st), torch::rms_norm(x, {32}, w)));
  auto exact = [&] { return torch::rms_norm(x, {32}, w, 1e-6); };
  auto q = [&](const aq::QuantConfig& c) { return F::rms_norm(x, {32}, w, 1e-6, c, st); };
  const auto rstd = (x.detach().pow(2).mean(-1, true) + 1e-6).rsqrt();
  const auto xn = x.detach() * rstd;
  const auto gw_bound = (probe.abs() * step(xn, 8)).sum(std::vector<int64_t>{0, 1});
  const auto gx_bound = 0.05 * torch::ones_like(x) * (probe * w.detach()).abs().max() * rstd.max();
  const auto gx_bias = rstd / 32 * (w.detach() * probe).abs() * std::pow(step(xn, 2), 2) / 4;
  check(q, exact, {x, w}, probe, {gx_bound, gw_bound}, {gx_bias, torch::Tensor()});
}

TEST_P(Transformer, GeluAndSiluKeepAnUnbiasedDerivative) {
  auto x = (torch::randn({8, 6, 40}, opts()) * 3).requires_grad_();
  auto probe = torch::randn({8, 6, 40}, opts());
  auto st = aq::make_layer_state();
  for (const std::string approximate : {"none", "tanh"}) {
    EXPECT_TRUE(torch::equal(F::gelu(x, approximate, bits(2), st), torch::gelu(x, approximate)));
    const auto d = torch::gelu_backward(torch::ones_like(x), x.detach(), approximate);
    check([&](const aq::QuantConfig& c) { return F::gelu(x, approximate, c, st); },
          [&] { return torch::gelu(x, approximate); }, {x}, probe, {probe.abs() * step(d, 8)}, {},
          {probe.abs() * step(d, 2) / 2});
  }
  EXPECT_TRUE(torch::equal(F::silu(x, bits(2), st), torch::silu(x)));
  const auto d = torch::silu_backward(torch::ones_like(x), x.detach());
  check([&](const aq::QuantConfig& c) { return F::silu(x, c, st); }, [&] { return torch::silu(x); }, {x}, probe,
        {probe.abs() * step(d, 8)}, {}, {probe.abs() * step(d, 2) / 2});
  EXPECT_LT(st->saved_bytes * 8, x.numel() * 4);
}

// Where samples are whole groups, GELU's derivative and output are weighed
// by their own group ranges (on CUDA worked out as the GELU writes them).
TEST_P(Transformer, GeluWeighsItsDerivativeAndItsReaderByTheirRanges) {
  auto range_sq = [](const torch::Tensor& t) {
    const auto v = t.detach().to(torch::kFloat).reshape({4, -1, 256});
    return (std::get<0>(v.max(2)) - std::get<0>(v.min(2))).pow(2).sum(1);
  };
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const std::string approximate : {"none", "tanh"}) {
      SCOPED_TRACE(approximate + (dtype == torch::kFloat ? " float" : " bf16"));
      auto x = (torch::randn({4, 4, 512}, opts()) * 3).to(dtype).requires_grad_();
      auto w = torch::randn({8, 512}, opts()).to(dtype).requires_grad_();  // the linear keeps y for its gradient
      auto sg = aq::make_layer_state(), sl = aq::make_layer_state();
      const aq::QuantConfig c;  // adaptive, groups of 256
      const auto y = F::gelu(x, approximate, c, sg);
      EXPECT_TRUE(torch::equal(y, torch::gelu(x, approximate)));
      F::linear(y, w, std::nullopt, c, sl);
      const auto d = torch::gelu_backward(torch::ones_like(x), x.detach(), approximate);
      ASSERT_TRUE(sg->range_sq.defined() && sl->range_sq.defined());
      EXPECT_TRUE(torch::allclose(sg->range_sq, range_sq(d), 2e-2)) << sg->range_sq << range_sq(d);
      EXPECT_TRUE(torch::allclose(sl->range_sq, range_sq(y))) << sl->range_sq << range_sq(y);
    }
  }
}

// A residual sum is LibTorch's, bit for bit, with the addition's gradients;
// the LayerNorm reading it weighs its samples by the same ranges (on CUDA
// worked out as the sum is written: rows of 256 and 384, in groups of 256
// and 128; rows of 40, whose groups span rows, by the norm itself).
TEST_P(Transformer, ResidualAddIsTheSumAndTheNormWeighsItAlike) {
  const aq::QuantConfig c;  // adaptive, groups of 256
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const int64_t D : {256, 384, 40}) {
      SCOPED_TRACE(::testing::Message() << "row " << D << (dtype == torch::kFloat ? " float" : " bf16"));
      auto x = torch::randn({4, 6, D}, opts()).requires_grad_();
      auto y = (torch::randn({4, 6, D}, opts()) * 3).to(dtype).requires_grad_();
      const auto z = F::residual_add(x, y, D, c);
      EXPECT_TRUE(torch::equal(z, x + y));
      EXPECT_EQ(z.scalar_type(), torch::kFloat);
      const auto w = torch::ones({D}, opts()).requires_grad_();
      auto st = aq::make_layer_state(), again = aq::make_layer_state();
      F::layer_norm(z, {D}, w, std::nullopt, 1e-5, c, st);
      F::layer_norm(z.detach().clone().requires_grad_(), {D}, w, std::nullopt, 1e-5, c, again);
      ASSERT_TRUE(st->range_sq.defined() && again->range_sq.defined());
      EXPECT_TRUE(torch::allclose(st->range_sq, again->range_sq)) << st->range_sq << again->range_sq;
      const auto g = torch::randn_like(z);
      const auto grads = torch::autograd::grad({z}, {x, y}, {g});
      EXPECT_TRUE(torch::equal(grads[0], g));
      EXPECT_TRUE(torch::equal(grads[1], g.to(dtype)));
    }
  }
  // Not compressing (no gradient wanted): the plain sum.
  const auto a = torch::randn({2, 3, 256}, opts()), b = torch::randn({2, 3, 256}, opts());
  EXPECT_TRUE(torch::equal(F::residual_add(a, b, 256, c), a + b));
}

// The linear layer before a GELU gets its gradient statistics (on CUDA from
// the GELU's backward pass, which wrote that gradient): each sample's
// squared norm of g_y times GELU's derivative, up to the 7-8-bit rounding.
TEST_P(Transformer, GeluHandsItsGradientNormsToTheLayerBefore) {
  const auto x = torch::randn({4, 8, 256}, opts());
  const auto w1 = (torch::randn({256, 256}, opts()) / 16).requires_grad_();
  const auto w2 = (torch::randn({16, 256}, opts()) / 16).requires_grad_();
  const auto probe = torch::randn({4, 8, 16}, opts());
  aq::QuantConfig c;
  c.cabits = 7;  // adaptive, 7 to 8 bits
  auto s1 = aq::make_layer_state(), sg = aq::make_layer_state(), s2 = aq::make_layer_state();
  const auto h = F::linear(x, w1, std::nullopt, c, s1);
  const auto out = F::linear(F::gelu(h, "none", c, sg), w2, std::nullopt, c, s2);
  (out * probe).sum().backward();
  ASSERT_TRUE(s1->grad_sq.defined());
  const auto d = torch::gelu_backward(torch::ones_like(h), h.detach(), "none");
  const auto want = (probe.matmul(w2.detach()) * d).pow(2).sum({1, 2});
  EXPECT_TRUE(torch::allclose(s1->grad_sq, want, 2e-2)) << s1->grad_sq << want;
}

TEST_P(Transformer, SoftmaxBiasIsWithinItsBound) {
  auto x = (torch::randn({6, 4, 12}, opts()) * 2).requires_grad_();
  auto probe = torch::randn({6, 4, 12}, opts());
  auto st = aq::make_layer_state();
  for (int64_t dim : {-1, 1}) {
    EXPECT_TRUE(torch::equal(F::softmax(x, dim, bits(2), st), torch::softmax(x, dim)));
    const auto y = torch::softmax(x.detach(), dim);
    // At 8 bits each restored y_i is within a step: dL/dx_i = y_i (g_i -
    // sum g y) moves by at most step (|g_i| + sum |g|) + y_i sum |g| step.
    const auto sg = probe.abs().sum(dim, true);
    const double s8 = step(y, 8);
    const auto b8 = s8 * (probe.abs() + sg) + y * sg * s8;
    // 2 bits: E[y_hat_i sum g y_hat] = y_i sum g y + g_i Var(y_hat_i).
    const auto bias = probe.abs() * std::pow(step(y, 2), 2) / 4;
    // A draw's spread is at most half a step in each y_hat it reads (a y
    // near a grid point may round the other way in none of the S draws).
    const auto sd = step(y, 2) / 2 * (probe.abs() + sg + y * sg);
    check([&](const aq::QuantConfig& c) { return F::softmax(x, dim, c, st); }, [&] { return torch::softmax(x, dim); },
          {x}, probe, {b8}, {bias}, {sd});
  }
}

// The reference: the same attention written out with LibTorch's ops.
torch::Tensor attention_reference(const torch::Tensor& qkv, int64_t heads, bool causal) {
  const int64_t B = qkv.size(0), T = qkv.size(1), C = qkv.size(2) / 3;
  auto p = qkv.view({B, T, 3, heads, C / heads}).permute({2, 0, 3, 1, 4}).unbind(0);
  return at::scaled_dot_product_attention(p[0], p[1], p[2], std::nullopt, 0.0, causal).transpose(1, 2).reshape({B, T, C});
}

TEST_P(Transformer, SelfAttentionMatchesSdpa) {
  auto qkv = torch::randn({4, 9, 3 * 16}, opts()).requires_grad_();
  auto probe = torch::randn({4, 9, 16}, opts());
  auto st = aq::make_layer_state();
  for (bool causal : {false, true}) {
    EXPECT_TRUE(torch::equal(F::self_attention(qkv, 2, causal, bits(2), st), attention_reference(qkv, 2, causal)));
    const auto ge = grads([&] { return attention_reference(qkv, 2, causal); }, {qkv}, probe)[0];
    const auto g8 = grads([&] { return F::self_attention(qkv, 2, causal, bits(8), st); }, {qkv}, probe)[0];
    EXPECT_LE((g8 - ge).abs().max().item<double>(), 0.03 * ge.abs().max().item<double>());
    // At 2 bits: noisy, but the errors of the draws mostly cancel in their
    // mean (the bias is second order in the rounding error): its error is
    // far below a single draw's.
    torch::Tensor sum;
    double single = 0;
    for (int s = 0; s < 100; ++s) {
      const auto g = grads([&] { return F::self_attention(qkv, 2, causal, bits(2), st); }, {qkv}, probe)[0];
      single += (g - ge).norm().item<double>() / 100;
      sum = s ? sum + g : g;
    }
    EXPECT_LE((sum / 100 - ge).norm().item<double>(), 0.4 * single);
  }
  EXPECT_LT(st->saved_bytes * 8, qkv.numel() * 4);
  // Micro-batched backward (L3.1) gives the same gradient for the same draw.
  auto l31 = aq::QuantConfig::for_level(aq::Level::L3_1);
  l31.micro_batch_bytes = 9 * 48 * 4;  // one sample at a time
  auto c2 = bits(2);
  auto bits_st = aq::make_layer_state();
  bits_st->bits = torch::full({4}, 3, torch::kInt32).to(dev());
  torch::manual_seed(5);
  const auto a = grads([&] { return F::self_attention(qkv, 2, true, c2, bits_st); }, {qkv}, probe)[0];
  torch::manual_seed(5);
  l31.cabits = l31.ibits = 2;
  l31.attention_bits = 0;
  const auto b = grads([&] { return F::self_attention(qkv, 2, true, l31, bits_st); }, {qkv}, probe)[0];
  EXPECT_TRUE(torch::allclose(a, b, 1e-5, 1e-6));
  EXPECT_THROW(F::self_attention(qkv, 5, false, c2, st), std::invalid_argument);
  // --attention-bits: q, k and v at those bits, uniform, whatever the level
  // gives the other layers (here L3's adaptive 2 bits).
  auto l3 = aq::QuantConfig::for_level(aq::Level::L3);
  l3.attention_bits = 8;
  auto st_a = aq::make_layer_state(), st_8 = aq::make_layer_state();
  torch::manual_seed(9);
  const auto ga = grads([&] { return F::self_attention(qkv, 2, true, l3, st_a); }, {qkv}, probe)[0];
  torch::manual_seed(9);
  const auto g8 = grads([&] { return F::self_attention(qkv, 2, true, bits(8), st_8); }, {qkv}, probe)[0];
  EXPECT_TRUE(torch::equal(ga, g8));
  EXPECT_EQ(st_a->saved_bytes, st_8->saved_bytes);
}

// Self-attention with its output projection.  Where the flash, cuDNN or
// memory-efficient kernel runs (on the CPU, flash), one op keeping the
// attention's output once, for both backwards: its forward is the two ops',
// bit for bit; its gradients close to exact at 8 bits; at 2 bits the mean of
// the draws much nearer the exact gradient than one draw (the attention's
// backward reads the forward's log-sum-exp beside the restored q, k and v:
// the bias is second order, as the recomputation's).  The op keeps the
// output at --attention-bits, so the configurations here set them (to the
// level's bits); without them, and elsewhere, the two ops in turn.
TEST_P(Transformer, AttentionAndProjectionInOneOp) {
  const bool cuda = GetParam() == "cuda";
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    if (dtype == torch::kBFloat16 && !cuda) continue;  // the CPU's 16-bit attention: slow, and the float case shows it
    const double tol8 = dtype == torch::kFloat ? 0.03 : 0.06;
    SCOPED_TRACE(dtype == torch::kFloat ? "float" : "bf16");
    auto qkv = torch::randn({4, 16, 3 * 32}, opts()).to(dtype).requires_grad_();
    // Every kernel LibTorch may pick here but the math one keeps what the op needs.
    const auto p = qkv.view({4, 16, 3, 4, 8}).permute({2, 0, 3, 1, 4}).unbind(0);
    auto fused = [&](bool causal) {
      return static_cast<at::SDPBackend>(at::_fused_sdp_choice(p[0], p[1], p[2], std::nullopt, 0.0, causal)) !=
             at::SDPBackend::math;
    };
    EXPECT_TRUE(cuda || fused(false)) << "the CPU's flash kernel";
    auto w = (torch::randn({32, 32}, opts()) * 0.2).to(dtype).requires_grad_();
    auto b = torch::randn({32}, opts()).to(dtype).requires_grad_();
    auto probe = torch::randn({4, 16, 32}, opts()).to(dtype);
    auto st = aq::make_layer_state(), pst = aq::make_layer_state();
    for (bool causal : {false, true}) {
      SCOPED_TRACE(causal ? "causal" : "not causal");
      auto exact = [&] { return torch::linear(attention_reference(qkv, 4, causal), w, b); };
      auto q = [&](aq::QuantConfig c) {
        c.attention_bits = c.cabits;
        return F::self_attention_projected(qkv, 4, causal, c, st, w, b, c, pst);
      };
      const auto y = q(bits(2));
      EXPECT_TRUE(torch::equal(y, exact()));
      ASSERT_TRUE(y.grad_fn());
      EXPECT_EQ(y.grad_fn()->name().find("AttentionProjection") != std::string::npos, fused(causal))
          << y.grad_fn()->name();
      const auto ge = grads(exact, {qkv, w, b}, probe);
      const auto g8 = grads([&] { return q(bits(8)); }, {qkv, w, b}, probe);
      std::vector<torch::Tensor> sum(3);
      std::vector<double> single(3, 0.0);
      for (int s = 0; s < 60; ++s) {
        const auto g = grads([&] { return q(bits(2)); }, {qkv, w, b}, probe);
        for (size_t i = 0; i < 3; ++i) {
          single[i] += (g[i] - ge[i]).to(torch::kFloat).norm().item<double>() / 60;
          sum[i] = s ? sum[i] + g[i].to(torch::kFloat) : g[i].to(torch::kFloat);
        }
      }
      for (size_t i = 0; i < 3; ++i) {
        SCOPED_TRACE(::testing::Message() << "leaf " << i);
        const double scale = ge[i].abs().max().item<double>();
        EXPECT_LE((g8[i] - ge[i]).abs().max().item<double>(), tol8 * scale);
        if (i < 2) {  // the bias's gradient reads no activation
          EXPECT_LE((sum[i] / 60 - ge[i].to(torch::kFloat)).norm().item<double>(), 0.4 * single[i]);
        }
      }
    }
    // The projection's state keeps the output (the attention's keeps q, k, v).
    EXPECT_GT(pst->saved_bytes, 0);
    EXPECT_GT(st->saved_bytes, 0);
    // The output at the attention's bits, not the projection's: 8 bits an
    // element where the layers get 2 (bounds aside).
    aq::QuantConfig two = bits(2);
    two.attention_bits = 8;
    if (fused(false)) {
      F::self_attention_projected(qkv, 4, false, two, st, w, b, two, pst);
      EXPECT_GE(pst->saved_bytes, 4 * 16 * 32);
      EXPECT_LT(pst->saved_bytes, 4 * 16 * 32 * 5 / 4);
    }
    // Attention at the layer's adaptive bits (--attention-bits 0): the two ops.
    const auto y0 = F::self_attention_projected(qkv, 4, false, bits(2), st, w, b, bits(2), pst);
    EXPECT_EQ(y0.grad_fn()->name().find("AttentionProjection"), std::string::npos) << y0.grad_fn()->name();
  }
  // Micro-batched backward (L3.1): the two ops in turn.
  auto l31 = aq::QuantConfig::for_level(aq::Level::L3_1);
  auto qkv = torch::randn({2, 8, 3 * 16}, opts()).requires_grad_();
  auto w = torch::randn({16, 16}, opts()).requires_grad_();
  const auto y = F::self_attention_projected(qkv, 2, true, l31, aq::make_layer_state(), w, std::nullopt, l31,
                                             aq::make_layer_state());
  EXPECT_EQ(y.grad_fn()->name().find("AttentionProjection"), std::string::npos);
  EXPECT_TRUE(torch::equal(y, torch::linear(attention_reference(qkv, 2, true), w)));
}

TEST_P(Transformer, LinearAndDropoutTakeTokens) {
  // Per-sample groups are the leading (batch) dimension, whatever the rank.
  auto x = torch::randn({6, 7, 3, 16}, opts()).requires_grad_();
  aq::QLinear lin(nn::LinearOptions(16, 8));
  lin->to(dev());
  auto cfg = std::make_shared<aq::QuantConfig>(aq::QuantConfig::for_level(aq::Level::L3));
  lin->set_config(cfg);
  auto y = lin(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({6, 7, 3, 8}));
  y.sum().backward();
  EXPECT_EQ(lin->state()->last_bits.numel(), 6);
  EXPECT_EQ(lin->state()->sample_elements, 7 * 3 * 16);
  aq::QDropout drop(nn::DropoutOptions(0.3));
  x.mutable_grad() = torch::Tensor();
  auto d = drop(x);
  auto g = torch::randn_like(d);
  (d * g).sum().backward();
  const auto kept = d != 0;
  EXPECT_TRUE(torch::allclose(x.grad(), g * kept / 0.7, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(d, x.detach() * kept / 0.7, 1e-5, 1e-6));
  EXPECT_LT(drop->state()->saved_bytes * 8, x.numel() * 4);
}

TEST_P(Transformer, ModulesAreTheirTwins) {
  torch::manual_seed(7);
  nn::Sequential plain(nn::Embedding(nn::EmbeddingOptions(50, 16)), nn::LayerNorm(nn::LayerNormOptions({16})),
                       nn::Linear(16, 32), nn::GELU(nn::GELUOptions().approximate("tanh")), nn::Linear(32, 16),
                       nn::SiLU(), nn::Softmax(-1));
  plain->to(dev());
  auto q = aq::quantized(plain, aq::QuantConfig::for_level(aq::Level::L3));
  // Every layer became its Q twin, holding the same tensors under the same names.
  for (const auto& m : *q) EXPECT_NE(dynamic_cast<aq::QLayer*>(m.ptr().get()), nullptr) << m.ptr()->name();
  auto pp = plain->named_parameters(), qp = q->named_parameters();
  ASSERT_EQ(pp.size(), qp.size());
  for (const auto& p : pp) EXPECT_TRUE(qp[p.key()].is_same(p.value())) << p.key();
  auto tokens = torch::randint(50, {4, 9}, torch::TensorOptions().dtype(torch::kLong).device(dev()));
  // Layer by layer, each twin on the plain one's input.  QLinear computes
  // at::linear, what PyTorch's nn.Linear computes; LibTorch's C++ Linear
  // adds its bias after the product for inputs other than 2-D, which on
  // CUDA rounds differently (by an ulp), so the linear layers are held to
  // at::linear exactly and to the C++ module within that rounding.
  auto max_diff = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  };
  torch::Tensor in = tokens;
  auto pi = plain->begin();
  auto qi = q->begin();
  for (; pi != plain->end(); ++pi, ++qi) {
    torch::Tensor ye = pi->forward(in);
    const torch::Tensor yq = qi->forward(in);
    EXPECT_TRUE(torch::equal(ye, pi->forward(in))) << pi->ptr()->name() << " is not deterministic here";
    if (const auto* lin = dynamic_cast<nn::LinearImpl*>(pi->ptr().get())) {
      EXPECT_LE(max_diff(ye, yq), 1e-6 * std::max(1.0, ye.abs().max().item<double>())) << "Linear";
      ye = at::linear(in, lin->weight, lin->bias);
    }
    EXPECT_TRUE(torch::equal(ye, yq)) << pi->ptr()->name() << ": max diff " << max_diff(ye, yq);
    in = ye;
  }
  // The whole model: what the layers gave one after another.
  const torch::Tensor ye = in, yq = q->forward(tokens);
  EXPECT_TRUE(torch::equal(ye, yq)) << "max diff " << max_diff(ye, yq);
  auto probe = torch::randn_like(ye);
  (yq * probe).sum().backward();
  for (const auto& p : qp) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
  // RMSNorm and self-attention (no LibTorch module): exact in eval mode.
  aq::QRMSNorm rms(aq::RMSNormOptions({16}).eps(1e-6));
  aq::QSelfAttention attn(aq::SelfAttentionOptions(16, 4).causal(true));
  rms->to(dev());
  attn->to(dev());
  EXPECT_TRUE(rms->named_parameters().contains("weight"));
  for (const char* n : {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"})
    EXPECT_TRUE(attn->named_parameters().contains(n)) << n;
  auto h = torch::randn({3, 5, 16}, opts());
  auto train_y = attn(rms(h));
  attn->eval();
  rms->eval();
  auto eval_y = attn(rms(h));
  EXPECT_TRUE(torch::equal(train_y, eval_y));
  EXPECT_THROW(aq::QSelfAttention(aq::SelfAttentionOptions(16, 3)), std::invalid_argument);
}

aq::models::ModelOptions tiny() {
  aq::models::ModelOptions o;
  o.layers = 2;
  o.width = 32;
  o.heads = 4;
  o.context = 16;
  o.image_height = o.image_width = 28;
  return o;
}

TEST(TransformerLayout, ShapesNamesAndErrors) {
  EXPECT_EQ(aq::models::architectures().size(), 15u);
  auto gpt = aq::models::build("gpt_small", 1, 256);
  int64_t n = 0;
  for (const auto& p : gpt->parameters()) n += p.numel();
  // 12 blocks of 12 C^2 + 13 C (C = 768), embeddings (256 + 1024) x C, two
  // norms' 2 C per block plus the final one, and the 256 x C head.
  const int64_t C = 768;
  EXPECT_EQ(n, 12 * (12 * C * C + 13 * C) + (256 + 1024) * C + 2 * C + 256 * C);
  auto params = gpt->named_parameters();
  for (const char* name : {"tok_embed.weight", "pos_embed.weight", "blocks.0.ln1.weight", "blocks.11.attn.qkv.weight",
                           "blocks.3.attn.proj.bias", "blocks.5.fc1.weight", "blocks.5.fc2.bias", "norm.weight",
                           "head.weight"})
    EXPECT_TRUE(params.contains(name)) << name;
  EXPECT_FALSE(params.contains("head.bias"));
  auto vit = aq::models::build("vit_small", 3, 1000);  // 224x224, patch 16
  auto vp = vit->named_parameters();
  EXPECT_EQ(vp["pos_embed"].sizes(), torch::IntArrayRef({1, 197, 384}));
  EXPECT_EQ(vp["patch_embed.weight"].sizes(), torch::IntArrayRef({384, 3, 16, 16}));
  auto o = tiny();
  auto small = aq::models::build("vit_tiny", 1, 10, o);  // 28x28: patch 4, 49 patches + class token
  EXPECT_EQ(small->named_parameters()["pos_embed"].size(1), 50);
  o.class_token = false;
  EXPECT_EQ(aq::models::build("vit_tiny", 1, 10, o)->named_parameters()["pos_embed"].size(1), 49);
  o.patch_size = 5;
  EXPECT_THROW(aq::models::build("vit_tiny", 1, 10, o), std::invalid_argument);
  o = tiny();
  o.heads = 5;
  EXPECT_THROW(aq::models::build("gpt_small", 1, 256, o), std::invalid_argument);
  auto g = aq::models::build("gpt_small", 1, 256, tiny());
  EXPECT_THROW(g->forward(torch::zeros({2, 17}, torch::kLong)), std::invalid_argument);  // past the context
  EXPECT_THROW(g->forward(torch::zeros({2, 8})), std::invalid_argument);                 // not tokens
  EXPECT_THROW(small->forward(torch::zeros({2, 1, 32, 32})), std::invalid_argument);     // not 28x28
  EXPECT_TRUE(aq::models::is_vit("vit_tiny") && aq::models::is_gpt("gpt_small") && !aq::models::is_vit("resnet18"));
}

// Forward equal to the exact model at every level; backward runs; the
// per-layer reallocation sees the adaptive layers; at 2 bits the step holds
// far less than the exact one.
TEST_P(Transformer, ModelsTrainAtEveryLevel) {
  aq::install_cpu_memory_counter();
  for (const std::string arch : {"gpt_small", "vit_tiny"}) {
    const bool gpt = arch == "gpt_small";
    torch::manual_seed(11);
    auto model = aq::models::build(arch, 1, gpt ? 256 : 10, tiny());
    model->to(dev());
    model->train();
    const auto x = gpt ? torch::randint(256, {4, 16}, torch::TensorOptions().dtype(torch::kLong).device(dev()))
                       : torch::randn({4, 1, 28, 28}, dev());
    aq::QuantConfig exact;
    exact.scope = aq::Scope::kNone;
    aq::QModule(*model, exact);
    const auto ye = model->forward(x);
    EXPECT_EQ(ye.sizes(), gpt ? torch::IntArrayRef({4, 16, 256}) : torch::IntArrayRef({4, 10}));
    ye.pow(2).mean().backward();
    std::map<std::string, torch::Tensor> ge;
    for (const auto& p : model->named_parameters()) ge[p.key()] = p.value().grad().clone();
    for (auto level : {aq::Level::L0, aq::Level::L1, aq::Level::L2, aq::Level::L3, aq::Level::L3_1, aq::Level::L4,
                       aq::Level::L5}) {
      auto cfg = aq::QuantConfig::for_level(level);
      if (level == aq::Level::L3_1) cfg.micro_batch_bytes = 4096;  // several micro-batches
      aq::QModule(*model, cfg);
      model->zero_grad();
      const auto y = model->forward(x);
      EXPECT_TRUE(torch::equal(y, ye)) << arch << " " << aq::to_string(level);
      y.pow(2).mean().backward();
      for (const auto& p : model->named_parameters()) {
        const auto g = p.value().grad();
        ASSERT_TRUE(g.defined()) << arch << " " << p.key();
        const double err = (g - ge[p.key()]).norm().item<double>(), ref = ge[p.key()].norm().item<double>();
        // L0 keeps everything exact; at 4 bits (L1, L2) the noise stays
        // below the gradient; at 2 bits it is finite (a step's noise in a
        // tiny model is larger than its gradient; docs/variance.md).
        EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << arch << " " << p.key();
        if (level == aq::Level::L0) {
          EXPECT_LE(err, 1e-4 * ref + 1e-7) << arch << " L0 " << p.key();
        } else if (level == aq::Level::L1 || level == aq::Level::L2) {
          EXPECT_LE(err, 0.9 * ref + 1e-6) << arch << " " << aq::to_string(level) << " " << p.key();
        }
      }
      if (aq::adaptive(cfg)) {
        EXPECT_GT(aq::adapt_layers(*model), 0) << arch;
      }
    }
  }
}

TEST_P(Transformer, GptHoldsFarLessAtTwoBits) {
  aq::install_cpu_memory_counter();
  torch::manual_seed(2);
  auto o = tiny();
  o.width = 64;
  auto model = aq::models::build("gpt_small", 1, 256, o);
  model->to(dev());
  model->train();
  const auto x = torch::randint(256, {8, 16}, torch::TensorOptions().dtype(torch::kLong).device(dev()));
  auto held = [&](const aq::QuantConfig& cfg) {
    aq::QModule(*model, cfg);
    model->zero_grad();
    const int64_t before = aq::memory(dev()).allocated;
    auto y = model->forward(x);
    const int64_t bytes = aq::memory(dev()).allocated - before - y.nbytes();
    y.pow(2).mean().backward();
    return bytes;
  };
  aq::QuantConfig exact;
  exact.scope = aq::Scope::kNone;
  const int64_t e = held(exact), t = held(aq::QuantConfig::for_level(aq::Level::L3));
  ASSERT_GT(t, 0);
  EXPECT_GE(double(e) / t, 4.0) << "exact " << e << " bytes, L3 " << t;
}

}  // namespace
