// The compression engine: statistics of the estimator, the byte layout, edge
// cases; every test runs per device (CUDA cases skip without a GPU).
#include "aq/compress.h"
#include "device_test.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using aq::CompressOptions;
using aq::Packed;

class Engine : public DeviceTest {};
AQ_PER_DEVICE(Engine);

// Stored bounds of every element's group, as double [N, D] tensors.
struct Bounds {
  torch::Tensor mn, mx, levels;
};
Bounds bounds_of(const Packed& p) {
  const int64_t N = p.samples, D = p.sample_elements, G = p.group_size;
  auto mn = p.mn.to(torch::kCPU, torch::kDouble).reshape({-1});
  auto mx = p.mx.to(torch::kCPU, torch::kDouble).reshape({-1});
  torch::Tensor lo, hi;
  if (p.pergroup) {
    const int64_t ng = p.groups_per_sample();
    auto idx = torch::arange(D, torch::kLong).div(G, "floor");
    lo = mn.reshape({N, ng}).index_select(1, idx);
    hi = mx.reshape({N, ng}).index_select(1, idx);
  } else {
    lo = mn.expand({N, D});
    hi = mx.expand({N, D});
  }
  torch::Tensor bits = p.uniform_bits ? torch::full({N, 1}, double(p.uniform_bits), torch::kDouble)
                                      : p.bits.to(torch::kCPU, torch::kDouble).reshape({N, 1});
  return {lo, hi, (torch::pow(2.0, bits) - 1).expand({N, D})};
}

// Memory-order [N, D] double copy of a tensor laid out like p.
torch::Tensor rows(const torch::Tensor& t, const Packed& p) {
  auto c = t.to(torch::kCPU, torch::kDouble);
  // Same strides as the packed source, so the storage order matches.
  auto flat = torch::empty_strided(p.sizes, p.strides, c.options());
  flat.copy_(c);
  return torch::from_blob(flat.data_ptr<double>(), {p.samples, p.sample_elements}, c.options()).clone();
}

constexpr double kEps = 2e-6;

// Unbiasedness and variance of S independent dequantizations of x.
void check_statistics(const torch::Tensor& x, const std::function<Packed(const torch::Tensor&)>& q,
                      int S, double ulp) {
  Packed first = q(x);
  Bounds b = bounds_of(first);
  auto xd = rows(x, first);
  auto delta = (b.mx - b.mn + kEps) / b.levels;
  auto v = (xd - b.mn) / delta;
  auto p = v - torch::floor(v);
  auto var = delta * delta * p * (1 - p);  // Delta^2 p (1 - p)
  auto sum = torch::zeros_like(xd), sq = torch::zeros_like(xd);
  for (int s = 0; s < S; ++s) {
    auto y = rows(aq::dequantize(s ? q(x) : first), first);
    // Every draw lands on one of the two grid points around x.
    ASSERT_LE((y - xd).abs().max().item<double>(), (delta * (1 + 1e-5) + ulp * xd.abs()).max().item<double>());
    sum += y;
    sq += y * y;
  }
  auto mean = sum / S;
  auto svar = (sq - S * mean * mean) / (S - 1);
  // Mean: per element within 6 standard errors (plus output rounding), and
  // the sum of deviations as one z-score.
  auto err = (mean - xd).abs();
  auto tol = 6 * torch::sqrt(var / S) + 3 * delta / S + 1e-5 * delta + ulp * xd.abs();
  EXPECT_TRUE((err <= tol).all().item<bool>()) << "worst excess " << (err - tol).max().item<double>();
  if (ulp == 0) {
    double z = (mean - xd).sum().item<double>() / std::sqrt(var.sum().item<double>() / S);
    EXPECT_LT(std::abs(z), 5.0) << "mean deviation z-score";
    // Variance matches Delta^2 p(1-p): the sum of sample variances against
    // its expectation, with the standard deviation of a sample variance of
    // two-point draws (fourth central moment Delta^4 p(1-p)(1-3p+3p^2)).
    auto mu4 = var * delta * delta * (1 - 3 * p + 3 * p * p);
    auto var_of_svar = mu4 / S - var * var * double(S - 3) / (double(S) * (S - 1));
    double zv = (svar.sum() - var.sum()).item<double>() / std::sqrt(var_of_svar.sum().item<double>());
    EXPECT_LT(std::abs(zv), 5.0) << "variance z-score";
    // Per group, the variance sum stays below G (mx-mn)^2 / (4 B^2).
    if (first.pergroup) {
      const int64_t G = first.group_size, D = first.sample_elements;
      for (int64_t g0 = 0; g0 < D; g0 += G) {
        const int64_t g1 = std::min(D, g0 + G);
        auto sv = svar.slice(1, g0, g1).sum(1);
        auto d0 = delta.slice(1, g0, g0 + 1).squeeze(1);
        auto bound = double(g1 - g0) * d0 * d0 / 4;
        auto slack = 5 * torch::sqrt(var_of_svar.slice(1, g0, g1).sum(1));
        EXPECT_TRUE((sv <= bound + slack).all().item<bool>()) << "group at " << g0;
      }
    }
  }
}

TEST_P(Engine, UnbiasedWithVarianceOfFormula) {
  auto x = torch::randn({6, 700}, opts()) * 3 + 1;
  for (int bits : {1, 2, 4, 8}) {
    for (auto rd : {torch::kFloat, torch::kBFloat16}) {
      SCOPED_TRACE("bits " + std::to_string(bits) + (rd == torch::kFloat ? " fp32" : " bf16") + " ranges");
      CompressOptions o;
      o.range_dtype = rd;
      check_statistics(x, [&](const torch::Tensor& t) { return aq::quantize(t, bits, o); }, 300, 0);
    }
  }
}

TEST_P(Engine, UnbiasedPerSampleBitsAndGroupSizes) {
  auto x = torch::rand({8, 333}, opts()) * 10 - 5;
  auto bits = torch::tensor({1, 2, 3, 4, 5, 6, 7, 8}, torch::kInt);
  for (int64_t G : {32, 64, 128, 256, 512, 2048}) {
    SCOPED_TRACE("G " + std::to_string(G));
    CompressOptions o;
    o.group_size = G;
    check_statistics(x, [&](const torch::Tensor& t) { return aq::quantize(t, bits, o); }, 200, 0);
  }
  CompressOptions whole;
  whole.pergroup = false;
  SCOPED_TRACE("one range");
  check_statistics(x, [&](const torch::Tensor& t) { return aq::quantize(t, 2, whole); }, 200, 0);
}

// Per-sample bits that stay on the device (their sum given): the same bytes
// as bits read on the host, the same values back, slices that share the data.
TEST_P(Engine, PerSampleBitsKeptOnTheDevice) {
  auto x = torch::randn({6, 300}, opts());
  auto bits = torch::tensor({3, 1, 8, 2, 2, 5}, opts(torch::kInt));
  CompressOptions o;
  o.seed = 11;
  const auto host = aq::quantize(x, bits, o);
  const auto dev = aq::quantize(x, bits, 21, o);
  EXPECT_TRUE(dev.host_offsets.empty());
  EXPECT_TRUE(torch::equal(dev.data, host.data));
  EXPECT_TRUE(torch::equal(dev.word_offset, host.word_offset));
  EXPECT_TRUE(torch::equal(aq::dequantize(dev), aq::dequantize(host)));
  const auto part = dev.slice(2, 5);
  EXPECT_TRUE(torch::equal(aq::dequantize(part), aq::dequantize(host.slice(2, 5))));
  EXPECT_THROW(aq::quantize(x, bits, 5, o), std::invalid_argument);   // fewer than 1 bit per sample
  EXPECT_THROW(aq::quantize(x, bits, 49, o), std::invalid_argument);  // more than 8
}

TEST_P(Engine, HalfAndBFloat16Inputs) {
  for (auto [dt, ulp] : {std::pair{torch::kHalf, 1.0 / 2048}, std::pair{torch::kBFloat16, 1.0 / 256}}) {
    auto x = (torch::randn({4, 512}, opts()) * 2).to(dt);
    check_statistics(x, [](const torch::Tensor& t) { return aq::quantize(t, 2); }, 200, ulp);
    EXPECT_EQ(aq::dequantize(aq::quantize(x, 4)).scalar_type(), dt);
  }
}

TEST_P(Engine, SameSeedSameBytesFreshNumbersEachCall) {
  auto x = torch::randn({16, 1000}, opts());
  torch::manual_seed(7);
  auto a = aq::quantize(x, 2);
  auto b = aq::quantize(x, 2);
  torch::manual_seed(7);
  auto c = aq::quantize(x, 2);
  EXPECT_TRUE(torch::equal(a.data, c.data));
  EXPECT_FALSE(torch::equal(a.data, b.data));
  CompressOptions o;
  o.seed = 99;
  EXPECT_TRUE(torch::equal(aq::quantize(x, 2, o).data, aq::quantize(x, 2, o).data));
  auto same_seed = aq::quantize(x, 4, o);
  o.stream = 1;
  EXPECT_FALSE(torch::equal(aq::quantize(x, 4, o).data, same_seed.data));
}

// Reference layout, written bit by bit: sample n's stream starts at the sum of
// bits * round_up(D, 32) of the samples before it; code d at bit d * bits.
std::vector<uint8_t> reference_stream(const std::vector<std::vector<int>>& codes,
                                      const std::vector<int>& bits, int64_t D) {
  const int64_t Dp = (D + 31) / 32 * 32;
  int64_t total = 0;
  for (int b : bits) total += b * Dp;
  std::vector<uint8_t> out(total / 8, 0);
  int64_t pos = 0;
  for (size_t n = 0; n < codes.size(); ++n) {
    for (int64_t d = 0; d < Dp; ++d) {
      const int c = d < D ? codes[n][d] : 0;
      for (int k = 0; k < bits[n]; ++k, ++pos)
        if ((c >> k) & 1) out[pos / 8] |= uint8_t(1) << (pos % 8);
    }
  }
  return out;
}

TEST_P(Engine, LayoutMatchesReference) {
  // Nearest rounding of values on the grid gives known codes: each group
  // holds 0 and B, so its grid is the integers.
  for (bool mixed : {false, true}) {
    for (int64_t D : {1, 31, 32, 100, 300, 513}) {
      const int64_t N = 5, G = 64;
      std::vector<int> bits(N);
      std::vector<std::vector<int>> codes(N, std::vector<int>(D));
      auto x = torch::empty({N, D});
      for (int64_t n = 0; n < N; ++n) {
        bits[n] = mixed ? 1 + (n * 3 + D) % 8 : 4;
        const int B = (1 << bits[n]) - 1;
        for (int64_t d = 0; d < D; ++d) {
          int c = (d * 7 + n * 5) % (B + 1);
          if (d % G == 0) c = 0;  // a one-element tail group is constant 0: code 0
          if (d % G == 1) c = B;
          codes[n][d] = c;
          x[n][d] = double(c);
        }
      }
      CompressOptions o;
      o.group_size = G;
      o.stochastic = false;
      o.range_dtype = torch::kFloat;
      auto xt = x.to(dev());
      Packed p = mixed ? aq::quantize(xt, torch::tensor(std::vector<int32_t>(bits.begin(), bits.end())), o)
                       : aq::quantize(xt, 4, o);
      auto ref = reference_stream(codes, bits, D);
      auto got = p.data.cpu();
      ASSERT_EQ(got.numel(), int64_t(ref.size())) << "D " << D;
      EXPECT_EQ(0, std::memcmp(got.data_ptr<uint8_t>(), ref.data(), ref.size())) << "D " << D << " mixed " << mixed;
      EXPECT_TRUE(torch::allclose(aq::dequantize(p).cpu(), x, 1e-5, 0)) << "D " << D;
    }
  }
}

TEST_P(Engine, PackBitsEveryCodeEveryWidth) {
  for (int bits = 1; bits <= 16; ++bits) {
    const int64_t n = bits <= 8 ? (int64_t(1) << bits) * 3 + 5 : 4099;
    auto codes = bits <= 8 ? torch::arange(n, torch::kLong).remainder(int64_t(1) << bits)
                           : torch::randint(0, int64_t(1) << bits, {n}, torch::kLong);
    auto small = codes.to(bits <= 8 ? torch::kByte : torch::kInt);
    auto packed = aq::pack_bits(small.to(dev()), bits);
    ASSERT_EQ(packed.numel(), aq::packed_bits_nbytes(n, bits));
    std::vector<std::vector<int>> one(1);
    for (int64_t i = 0; i < n; ++i) one[0].push_back(codes[i].item<int>());
    // The same stream as one sample of the quantized layout, padded to 32 codes.
    auto ref = reference_stream(one, {bits}, n);
    EXPECT_EQ(0, std::memcmp(packed.cpu().data_ptr<uint8_t>(), ref.data(), ref.size())) << bits;
    auto back = aq::unpack_bits(packed, bits, {n}, bits <= 8 ? torch::kByte : torch::kInt);
    EXPECT_TRUE(torch::equal(back.cpu(), small)) << bits;
  }
  EXPECT_THROW(aq::pack_bits(torch::zeros({4}, opts()), 2), std::invalid_argument);
  EXPECT_THROW(aq::pack_bits(torch::zeros({4}, opts(torch::kByte)), 17), std::invalid_argument);
  EXPECT_THROW(aq::unpack_bits(torch::zeros({3}, opts(torch::kByte)), 2, {40}), std::invalid_argument);
}

TEST_P(Engine, MasksAndWindowIndices) {
  auto x = torch::randn({3, 5, 7, 9}, opts());
  auto mask = x > 0;
  auto packed = aq::pack_mask(mask);
  EXPECT_EQ(packed.numel(), aq::packed_bits_nbytes(mask.numel(), 1));
  EXPECT_TRUE(torch::equal(aq::unpack_mask(packed, mask.sizes()), mask));
  for (int64_t window : {1, 2, 3, 4, 9, 16, 17, 49, 256, 300, 65536}) {
    const int64_t b = aq::index_bits(window);
    EXPECT_GE(int64_t(1) << b, window);
    EXPECT_TRUE(b == 1 || (int64_t(1) << (b - 1)) < window);
    auto idx = torch::randint(0, window, {2, 3, 11, 13}, opts(torch::kLong));
    auto back = aq::unpack_bits(aq::pack_bits(idx, b), b, idx.sizes(), torch::kLong);
    EXPECT_TRUE(torch::equal(back, idx)) << window;
  }
}

// Masks packed straight from an activation in its memory order, applied to
// a gradient of any layout: the same bits and products as through a bool
// tensor, for every float dtype, channels_last, odd sizes and a scale.
TEST_P(Engine, MasksFromActivationsInMemoryOrder) {
  for (auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf, torch::kDouble}) {
    for (bool cl : {false, true}) {
      auto x = torch::randn({3, 5, 7, 9}, opts(dt));
      x.view(-1).narrow(0, 0, 4).zero_();  // zeros are not positive
      if (cl) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
      const auto packed = aq::pack_positive(x);
      const auto strides = aq::memory_strides(x);
      EXPECT_EQ(strides, x.strides().vec());
      // Bit i is element i in memory order.
      const auto flat = x.as_strided({x.numel()}, {1});
      EXPECT_TRUE(torch::equal(packed, aq::pack_mask(flat > 0))) << dt << " " << cl;
      for (double scale : {1.0, 1.25}) {
        auto g = torch::randn({3, 5, 7, 9}, opts(dt));  // contiguous: another layout when cl
        const auto got = aq::apply_packed_mask(g, packed, strides, scale);
        const auto want = scale == 1.0 ? g * (x > 0) : g * (x > 0) * scale;
        EXPECT_TRUE(torch::equal(got, want)) << dt << " " << cl << " " << scale;
        EXPECT_EQ(got.strides(), x.strides());
      }
    }
  }
  // Bool sources (dropout's kept elements), non-dense ones, and bad masks.
  auto keep = torch::rand({4, 33}, opts()) > 0.5;
  EXPECT_TRUE(torch::equal(aq::pack_positive(keep), aq::pack_mask(keep)));
  auto many = torch::rand({9, 128}, opts()) > 0.5;  // whole 16-byte chunks and a tail
  EXPECT_TRUE(torch::equal(aq::pack_positive(many), aq::pack_mask(many)));
  auto line = torch::randn({4097}, opts(torch::kBFloat16)).narrow(0, 1, 4096);  // not 16-byte aligned
  EXPECT_TRUE(torch::equal(aq::pack_positive(line), aq::pack_mask(line > 0)));
  auto wide = torch::randn({6, 40}, opts());
  auto strided = wide.narrow(1, 3, 30);
  EXPECT_TRUE(torch::equal(aq::pack_positive(strided), aq::pack_mask(strided.contiguous() > 0)));
  EXPECT_EQ(aq::memory_strides(strided), (std::vector<int64_t>{30, 1}));
  EXPECT_THROW(aq::apply_packed_mask(torch::randn({6, 30}, opts()), aq::pack_positive(torch::randn({6, 40}, opts())),
                                     {30, 1}),
               std::invalid_argument);
}

TEST_P(Engine, EmptyAndSingleElement) {
  for (auto shape : std::vector<std::vector<int64_t>>{{0}, {0, 5}, {5, 0}, {2, 0, 3}}) {
    auto x = torch::empty(shape, opts());
    Packed p = aq::quantize(x, 2);
    EXPECT_EQ(p.data.numel(), 0);
    auto y = aq::dequantize(p);
    EXPECT_EQ(y.sizes(), x.sizes());
  }
  for (auto x : {torch::tensor(3.5f, opts()), torch::full({1}, -2.25f, opts()), torch::full({1, 1, 1}, 7.f, opts())}) {
    auto y = aq::dequantize(aq::quantize(x, 2));
    EXPECT_EQ(y.sizes(), x.sizes());
    EXPECT_TRUE(torch::equal(y, x)) << x;  // a one-element group is constant
  }
}

TEST_P(Engine, ConstantGroupsAreExact) {
  auto x = torch::arange(4 * 3, opts()).reshape({4, 3, 1}).expand({4, 3, 256}).reshape({4, 768}).contiguous();
  for (int bits : {1, 2, 8}) {
    CompressOptions o;
    o.range_dtype = torch::kFloat;
    EXPECT_TRUE(torch::equal(aq::dequantize(aq::quantize(x, bits, o)), x)) << bits;
  }
  // bf16 storage keeps integers below 256 exactly too.
  EXPECT_TRUE(torch::equal(aq::dequantize(aq::quantize(x, 2)), x));
}

TEST_P(Engine, TailGroupIgnoresPadding) {
  // D = 300: the tail group holds 44 elements, all in [5, 6]; padding must
  // not pull its minimum to 0.
  auto x = torch::rand({3, 300}, opts()) + 5;
  CompressOptions o;
  o.range_dtype = torch::kFloat;
  Packed p = aq::quantize(x, 2, o);
  ASSERT_EQ(p.mn.size(1), 2);
  auto tail = x.slice(1, 256, 300);
  EXPECT_TRUE(torch::equal(p.mn.select(1, 1), std::get<0>(tail.min(1))));
  EXPECT_TRUE(torch::equal(p.mx.select(1, 1), std::get<0>(tail.max(1))));
  auto y = aq::dequantize(p);
  EXPECT_GE(y.min().item<float>(), 5.f);
}

TEST_P(Engine, HugeMagnitudesStayFinite) {
  auto x = (torch::rand({4, 512}, opts()) * 2 - 1) * 3.3e38;
  x.index_put_({0, 0}, 3.4028e38);
  x.index_put_({0, 1}, -3.4028e38);
  for (auto rd : {torch::kFloat, torch::kBFloat16}) {
    CompressOptions o;
    o.range_dtype = rd;
    for (int bits : {1, 2, 8}) {
      auto y = aq::dequantize(aq::quantize(x, bits, o));
      EXPECT_TRUE(torch::isfinite(y).all().item<bool>()) << bits;
      // Within one grid step of the input (the step is range/B).
      auto step = 6.9e38 / ((1 << bits) - 1);
      EXPECT_LE((y.to(torch::kDouble) - x.to(torch::kDouble)).abs().max().item<double>(), step * 1.01);
    }
  }
  CompressOptions o;
  o.range_dtype = torch::kFloat;
  check_statistics(x.slice(0, 1, 4), [&](const torch::Tensor& t) { return aq::quantize(t, 2, o); }, 200, 0);
}

TEST_P(Engine, NonFiniteGroupsStayNonFinite) {
  auto x = torch::randn({3, 512}, opts());
  x.index_put_({0, 10}, std::numeric_limits<float>::quiet_NaN());
  x.index_put_({1, 300}, std::numeric_limits<float>::infinity());
  x.index_put_({2, 0}, -std::numeric_limits<float>::infinity());
  for (auto rd : {torch::kFloat, torch::kBFloat16}) {
    CompressOptions o;
    o.range_dtype = rd;
    auto y = aq::dequantize(aq::quantize(x, 2, o));
    EXPECT_FALSE(torch::isfinite(y[0].slice(0, 0, 256)).any().item<bool>());
    EXPECT_FALSE(torch::isfinite(y[1].slice(0, 256, 512)).any().item<bool>());
    EXPECT_FALSE(torch::isfinite(y[2].slice(0, 0, 256)).any().item<bool>());
    // Other groups are untouched.
    EXPECT_TRUE(torch::isfinite(y[0].slice(0, 256, 512)).all().item<bool>());
    EXPECT_TRUE(torch::isfinite(y[1].slice(0, 0, 256)).all().item<bool>());
    o.pergroup = false;  // one range: one NaN poisons the whole tensor
    EXPECT_FALSE(torch::isfinite(aq::dequantize(aq::quantize(x, 2, o))).any().item<bool>());
  }
  auto h = torch::randn({2, 64}, opts(torch::kHalf));
  h.index_put_({1, 3}, std::numeric_limits<float>::quiet_NaN());
  auto yh = aq::dequantize(aq::quantize(h, 4));
  EXPECT_TRUE(torch::isfinite(yh[0]).all().item<bool>());
  EXPECT_FALSE(torch::isfinite(yh[1]).any().item<bool>());
}

TEST_P(Engine, ManySamples) {
  // More than 65535 samples (the original's launch bug), tiny samples.
  auto x = torch::randn({70001, 3}, opts());
  auto bits = torch::randint(1, 9, {70001}, torch::kInt);
  for (auto p : {aq::quantize(x, 2), aq::quantize(x, bits)}) {
    auto y = aq::dequantize(p);
    auto step = (p.mx.to(torch::kFloat) - p.mn.to(torch::kFloat) + 2e-6);
    auto B = p.uniform_bits ? torch::full({70001, 1}, 3.f, opts()) : (torch::pow(2.0, bits.to(dev())) - 1).unsqueeze(1).to(torch::kFloat);
    EXPECT_TRUE(((y - x).abs() <= step / B * 1.0001).all().item<bool>());
  }
}

TEST_P(Engine, NonContiguousInputsKeepTheirLayout) {
  auto base = torch::randn({8, 16, 10, 12}, opts());
  CompressOptions o;
  o.seed = 5;
  std::vector<torch::Tensor> views = {base.transpose(2, 3), base.slice(3, 0, 12, 3), base.permute({1, 0, 2, 3}),
                                      base.contiguous(torch::MemoryFormat::ChannelsLast), base.select(1, 4)};
  for (size_t i = 0; i < views.size(); ++i) {
    const auto& v = views[i];
    auto y = aq::dequantize(aq::quantize(v, 8, o));
    EXPECT_EQ(y.sizes(), v.sizes()) << i;
    EXPECT_LE((y - v).abs().max().item<float>(), 0.05f) << i;
    // Dense tensors with samples outermost keep their strides (no copy made).
    if (v.is_non_overlapping_and_dense() && v.stride(0) * v.size(0) == v.numel()) {
      EXPECT_EQ(y.strides(), v.strides()) << i;
    }
  }
  // channels_last: compressed in memory order, no copy, layout kept.
  auto cl = views[3];
  auto y = aq::dequantize(aq::quantize(cl, 2));
  EXPECT_TRUE(y.is_contiguous(torch::MemoryFormat::ChannelsLast));
}

TEST_P(Engine, RejectsBadArguments) {
  auto x = torch::randn({4, 64}, opts());
  EXPECT_THROW(aq::quantize(x, 0), std::invalid_argument);
  EXPECT_THROW(aq::quantize(x, 9), std::invalid_argument);
  CompressOptions o;
  o.group_size = 100;
  EXPECT_THROW(aq::quantize(x, 2, o), std::invalid_argument);
  o.group_size = 16;
  EXPECT_THROW(aq::quantize(x, 2, o), std::invalid_argument);
  o.group_size = int64_t(1) << 21;
  EXPECT_THROW(aq::quantize(x, 2, o), std::invalid_argument);
  EXPECT_THROW(aq::quantize(torch::ones({4, 4}, opts(torch::kInt)), 2), std::invalid_argument);
  EXPECT_THROW(aq::quantize(x, torch::tensor({2, 2, 2})), std::invalid_argument);
  EXPECT_THROW(aq::quantize(x, torch::tensor({2, 0, 2, 2})), std::invalid_argument);
  EXPECT_THROW(aq::quantize(x, torch::tensor({2, 9, 2, 2})), std::invalid_argument);
  EXPECT_THROW(aq::quantize(x, torch::tensor({2., 2., 2., 2.})), std::invalid_argument);
  CompressOptions r;
  r.range_dtype = torch::kHalf;
  EXPECT_THROW(aq::quantize(x, 2, r), std::invalid_argument);
}

TEST_P(Engine, SlicesRestoreTheirSamples) {
  auto x = torch::randn({9, 3, 50}, opts());
  auto bits = torch::randint(1, 9, {9}, torch::kInt);
  for (auto p : {aq::quantize(x, 3), aq::quantize(x, bits)}) {
    auto whole = aq::dequantize(p);
    for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{{0, 9}, {0, 1}, {2, 5}, {8, 9}, {4, 4}}) {
      auto part = aq::dequantize(p.slice(b, e));
      EXPECT_TRUE(torch::equal(part, whole.slice(0, b, e))) << b << ".." << e;
    }
    EXPECT_THROW(p.slice(3, 10), std::invalid_argument);
  }
}

// g times the restored tensor: the product of the two tensors, bit for bit,
// and (where one pass gives them, CUDA) each sample's sum of squares of it.
// Every dtype, uniform and per-sample bits, whole groups, a tail group, a
// sample of fewer elements than a group, an odd sample length, NaN.
TEST_P(Engine, DequantizeTimesAGradient) {
  for (const auto dt : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (const std::vector<int64_t>& shape :
         std::vector<std::vector<int64_t>>{{4, 2, 512}, {3, 1000}, {5, 40}, {2, 3, 7}}) {
      for (const bool per_sample : {false, true}) {
        SCOPED_TRACE(::testing::Message() << c10::toString(dt) << " " << c10::IntArrayRef(shape) << " " << per_sample);
        auto x = torch::randn(shape, opts()).mul(3).to(dt);
        if (shape[0] == 5) x.view(-1)[17] = std::numeric_limits<float>::quiet_NaN();
        const auto g = torch::randn(shape, opts()).to(dt);
        const Packed p = per_sample ? aq::quantize(x, torch::randint(1, 9, {shape[0]}, opts(torch::kInt)), CompressOptions{})
                                    : aq::quantize(x, 3, {});
        torch::Tensor sq;
        const auto out = aq::dequantize_mul(p, g, &sq);
        const auto want = g * aq::dequantize(p);
        EXPECT_EQ(out.scalar_type(), dt);
        EXPECT_TRUE(torch::allclose(out, want, 0, 0, /*equal_nan=*/true));
        if (dev().is_cuda()) {
          ASSERT_TRUE(sq.defined());
          const auto ref = want.to(torch::kFloat).pow(2).reshape({shape[0], -1}).sum(1);
          EXPECT_TRUE(torch::allclose(sq, ref, 1e-4, 1e-5, /*equal_nan=*/true)) << sq << ref;
        }
      }
    }
  }
  // A gradient laid out otherwise, or of another dtype: the product all the same.
  const auto x = torch::randn({4, 64}, opts());
  const Packed p = aq::quantize(x, 4, {});
  const auto gt = torch::randn({64, 4}, opts()).t();
  torch::Tensor sq;
  EXPECT_TRUE(torch::equal(aq::dequantize_mul(p, gt, &sq), gt * aq::dequantize(p)));
  EXPECT_FALSE(sq.defined());
  const auto gd = torch::randn({4, 64}, opts(torch::kDouble));
  EXPECT_TRUE(torch::equal(aq::dequantize_mul(p, gd), gd * aq::dequantize(p).to(torch::kDouble)));
}

TEST_P(Engine, BF16RangeStorageRoundsOutward) {
  auto x = torch::randn({16, 256}, opts()) * 1000;
  Packed p = aq::quantize(x, 2);  // bf16 storage by default
  ASSERT_EQ(p.mn.scalar_type(), torch::kBFloat16);
  auto mn = std::get<0>(x.min(1)), mx = std::get<0>(x.max(1));
  EXPECT_TRUE((p.mn.squeeze(1).to(torch::kFloat) <= mn).all().item<bool>());
  EXPECT_TRUE((p.mx.squeeze(1).to(torch::kFloat) >= mx).all().item<bool>());
  // Half the bytes of fp32 storage for the bounds.
  CompressOptions f;
  f.range_dtype = torch::kFloat;
  EXPECT_EQ(aq::quantize(x, 2, f).nbytes() - p.nbytes(), p.mn.nbytes() * 2);
}

TEST(Crossdevice, SameBytesAndCrossUnpack) {
  if (!torch::cuda::is_available() || !aq::built_with_cuda()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(3);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1}, {3, 31}, {7, 300}, {64, 4096}, {2, 10000}, {70000, 5}};
  for (auto dt : {torch::kFloat, torch::kHalf, torch::kBFloat16}) {
    for (auto [N, D] : shapes) {
      auto x = torch::randn({N, D}).to(dt);
      auto bits = torch::randint(1, 9, {N}, torch::kInt);
      for (int64_t G : {32, 64, 128, 256, 1024, 4096}) {
        for (int variant = 0; variant < 4; ++variant) {
          CompressOptions o;
          o.seed = 1000 + G;
          o.stream = variant;
          o.group_size = G;
          o.pergroup = variant != 2;
          o.range_dtype = variant == 3 ? torch::kFloat : torch::kBFloat16;
          auto q = [&](const torch::Tensor& t) {
            return variant == 1 ? aq::quantize(t, bits, o) : aq::quantize(t, variant == 3 ? 4 : 2, o);
          };
          Packed c = q(x);
          Packed g = q(x.cuda());
          std::string what = std::string(c10::toString(dt)) + " " + std::to_string(N) + "x" + std::to_string(D) +
                             " G" + std::to_string(G) + " v" + std::to_string(variant);
          ASSERT_TRUE(torch::equal(c.data, g.data.cpu())) << what;
          ASSERT_TRUE(torch::equal(c.mn, g.mn.cpu())) << what;
          ASSERT_TRUE(torch::equal(c.mx, g.mx.cpu())) << what;
          auto yc = aq::dequantize(c);
          auto yg = aq::dequantize(g);
          ASSERT_TRUE(torch::equal(yc, yg.cpu())) << what;
          ASSERT_TRUE(torch::equal(aq::dequantize(g.to(torch::kCPU)), yc)) << what;
          ASSERT_TRUE(torch::equal(aq::dequantize(c.to(torch::kCUDA)).cpu(), yc)) << what;
        }
      }
    }
  }
  // Default generators: different streams per device, still cross-unpackable.
  auto x = torch::randn({32, 777});
  Packed g = aq::quantize(x.cuda(), 2);
  EXPECT_TRUE(torch::equal(aq::dequantize(g.to(torch::kCPU)), aq::dequantize(g).cpu()));
}

TEST(Build, CudaTensorWithoutCudaKernelsIsAClearError) {
  if (!torch::cuda::is_available() || aq::built_with_cuda()) GTEST_SKIP() << "needs a GPU and a CPU-only build";
  auto x = torch::randn({4, 64}, torch::kCUDA);
  try {
    aq::quantize(x, 2);
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("built without CUDA"), std::string::npos) << e.what();
  }
}

// More than 2^31 elements.  Needs ~9 GiB of memory on the device.
TEST_P(Engine, MoreThan2To31Elements) {
  const int64_t n = (int64_t(1) << 31) + 96;
  torch::Tensor x;
  try {
    x = torch::empty({2, n / 2}, opts(torch::kBFloat16));
  } catch (const c10::Error&) {
    GTEST_SKIP() << "not enough memory for a 4 GiB tensor";
  }
  x.select(0, 0).fill_(1.5);
  x.select(0, 1).fill_(-2.0);
  x.index_put_({1, n / 2 - 1}, 6.0);  // the very last element sets sample 1's last group
  Packed p = aq::quantize(x, 1);
  EXPECT_EQ(p.data.numel(), 2 * ((n / 2 + 31) / 32) * 4);
  auto y = aq::dequantize(p);
  x.reset();
  EXPECT_EQ(y[0][0].item<float>(), 1.5f);
  EXPECT_EQ(y[0][n / 2 - 1].item<float>(), 1.5f);
  EXPECT_EQ(y[1][0].item<float>(), -2.0f);
  auto last = y[1][n / 2 - 1].item<float>();
  EXPECT_TRUE(last == 6.0f || last == -2.0f);
  EXPECT_TRUE(torch::equal(y[1].slice(0, 0, n / 2 - 256), torch::full({n / 2 - 256}, -2.0, opts(torch::kBFloat16))));
}

}  // namespace
