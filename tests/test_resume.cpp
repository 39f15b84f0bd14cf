// Exact resume as a property: a small run stopped after every step in turn
// (--max-steps N, then --resume to the end) ends with the same weights,
// buffers, momentum, adaptive state and generator state, bit for bit, as
// the run that was never stopped; for adaptive L3, L3.1 and the exact model,
// over a few seeds.
#include "aq/checkpoint.h"
#include "aq/log.h"
#include "aq/train.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

constexpr int64_t kTrain = 64, kTest = 16, kBatch = 16, kEpochs = 3;  // 4 steps an epoch, 12 in all
constexpr int64_t kSteps = kTrain / kBatch * kEpochs;

// Big-endian 32-bit, as IDX headers are.
void put32(std::ofstream& f, uint32_t v) {
  const unsigned char b[4] = {static_cast<unsigned char>(v >> 24), static_cast<unsigned char>(v >> 16),
                              static_cast<unsigned char>(v >> 8), static_cast<unsigned char>(v)};
  f.write(reinterpret_cast<const char*>(b), 4);
}

// A Fashion-MNIST-shaped dataset of n images: each class a bright band at
// its own rows, plus noise, so that the samples' gradients (and with them
// the adaptive statistics) differ from sample to sample.
void write_idx(const std::string& dir, const std::string& prefix, int64_t n, uint32_t seed) {
  std::ofstream img(dir + "/" + prefix + "-images-idx3-ubyte", std::ios::binary);
  std::ofstream lab(dir + "/" + prefix + "-labels-idx1-ubyte", std::ios::binary);
  put32(img, 0x803);
  put32(img, static_cast<uint32_t>(n));
  put32(img, 28);
  put32(img, 28);
  put32(lab, 0x801);
  put32(lab, static_cast<uint32_t>(n));
  uint32_t r = seed;
  for (int64_t i = 0; i < n; ++i) {
    r = r * 1664525u + 1013904223u;
    const int label = static_cast<int>((r >> 24) % 10);
    lab.put(static_cast<char>(label));
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        r = r * 1664525u + 1013904223u;
        const int band = (y / 3 == label) ? 160 : 0;
        img.put(static_cast<char>(std::min(255, band + static_cast<int>((r >> 24) % 96))));
      }
  }
}

class Resume : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/aq-resume-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    ::mkdir((dir_ + "/data").c_str(), 0777);
    write_idx(dir_ + "/data", "train", kTrain, 1);
    write_idx(dir_ + "/data", "t10k", kTest, 2);
    torch::set_num_threads(1);
    aq::log().set_level(spdlog::level::err);
  }
  static void TearDownTestSuite() {
    ::nftw(
        dir_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }

  static aq::train::Options options(aq::Level level, bool exact, uint64_t seed, const std::string& workspace) {
    aq::train::Options o;
    o.data.data_dir = dir_ + "/data";
    o.data.batch_size = kBatch;
    o.epochs = kEpochs;
    o.quant = aq::QuantConfig::for_level(level);
    if (exact) o.quant.scope = aq::Scope::kNone;
    o.seed = seed;
    o.seed_given = true;
    o.progress = false;
    o.workspace = dir_ + "/" + workspace;
    return o;
  }

  static aq::ckpt::Checkpoint train(aq::train::Options o, int64_t max_steps, const std::string& resume) {
    o.max_steps = max_steps;
    o.resume = resume;
    EXPECT_EQ(aq::train::run(o, {}), 0);
    return aq::ckpt::load(o.workspace + "/checkpoint.h5");
  }

  static std::string dir_;
};
std::string Resume::dir_;

// The first difference between two lists of named tensors ("" if none).
std::string first_difference(const aq::ckpt::Tensors& got, const aq::ckpt::Tensors& want, const std::string& kind) {
  if (got.size() != want.size())
    return kind + ": " + std::to_string(got.size()) + " tensors instead of " + std::to_string(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const auto& [name, w] = want[i];
    const auto& g = got[i].second;
    if (got[i].first != name) return kind + ": " + got[i].first + " where " + name + " was";
    if (g.scalar_type() != w.scalar_type() || !g.sizes().equals(w.sizes()))
      return kind + " " + name + ": dtype or shape differs";
    const auto gc = g.contiguous(), wc = w.contiguous();
    if (std::memcmp(gc.data_ptr(), wc.data_ptr(), wc.numel() * wc.element_size()) != 0) {
      const double d = g.is_floating_point() ? (g.to(torch::kDouble) - w.to(torch::kDouble)).abs().max().item<double>()
                                             : std::nan("");
      return kind + " " + name + " differs (max |d| " + std::to_string(d) + ")";
    }
  }
  return "";
}

void expect_same_run(const aq::ckpt::Checkpoint& got, const aq::ckpt::Checkpoint& want, int64_t stop) {
  SCOPED_TRACE("stopped after step " + std::to_string(stop));
  EXPECT_EQ(got.counters, want.counters);
  EXPECT_EQ(first_difference(got.parameters, want.parameters, "parameter"), "");
  EXPECT_EQ(first_difference(got.buffers, want.buffers, "buffer"), "");
  EXPECT_EQ(first_difference(got.optimizer, want.optimizer, "optimizer"), "");
  EXPECT_EQ(first_difference(got.adaptive, want.adaptive, "adaptive"), "");
  EXPECT_EQ(first_difference(got.rng, want.rng, "generator"), "");
  // The metrics rows of whole epochs (a run stopped mid-epoch also recorded
  // the line it printed then); the figures that do not depend on timing or
  // allocator history equal (the partial sums of an interrupted epoch are
  // added in another order: equal to rounding).
  const auto whole_epochs = [](const aq::ckpt::Checkpoint& c) {
    std::vector<std::vector<double>> rows;
    for (const auto& r : c.metric_rows)
      if (static_cast<int64_t>(r.at(1)) % (kTrain / kBatch) == 0) rows.push_back(r);
    return rows;
  };
  const auto g = whole_epochs(got), w = whole_epochs(want);
  ASSERT_EQ(g.size(), w.size());
  for (size_t r = 0; r < w.size(); ++r)
    for (size_t k = 0; k < want.metric_columns.size(); ++k) {
      const std::string& col = want.metric_columns[k];
      if (col == "img_per_s" || col == "act_mb" || col == "peak_mb") continue;
      EXPECT_NEAR(g[r][k], w[r][k], 1e-9 * (1 + std::abs(w[r][k]))) << "metrics row " << r << ", " << col;
    }
}


class ResumeAt : public Resume {
 public:
  // AdamW with warm-up, cosine and clipping in place of SGD.
  static aq::train::Options adamw(aq::train::Options o) {
    o.optimizer = aq::train::OptimizerKind::kAdamW;
    o.lr = 2e-3;
    o.weight_decay = 0.05;
    o.beta1 = 0.85;
    o.schedule = aq::train::Schedule::kCosine;
    o.warmup_steps = 3;
    o.clip_grad_norm = 0.5;
    return o;
  }
  static void every_step(aq::Level level, bool exact, uint64_t seed, const std::string& name, bool with_adamw = false) {
    auto make = [&](const std::string& ws) {
      auto o = options(level, exact, seed, ws);
      return with_adamw ? adamw(o) : o;
    };
    const auto whole = train(make(name), 0, "");
    ASSERT_EQ(whole.counters.at("step"), kSteps);
    if (with_adamw) {
      EXPECT_EQ(whole.meta.at("optimizer"), "adamw");
      EXPECT_EQ(whole.counters.at("warmup_steps"), 3);
      EXPECT_EQ(whole.scalars.at("clip_grad_norm"), 0.5);
      EXPECT_EQ(whole.scalars.at("beta1"), 0.85);
      bool has_moments = false;
      for (const auto& [key, t] : whole.optimizer) has_moments |= key.find(".exp_avg_sq") != std::string::npos;
      EXPECT_TRUE(has_moments);
    }
    for (int64_t n = 1; n < kSteps; ++n) {
      const auto o = make(name + "-" + std::to_string(n));
      train(o, n, "");
      const auto resumed = train(o, 0, o.workspace + "/checkpoint.h5");
      expect_same_run(resumed, whole, n);
    }
  }
};

TEST_F(ResumeAt, EveryStepAdaptiveL3) {
  for (uint64_t seed : {11, 12}) ResumeAt::every_step(aq::Level::L3, false, seed, "l3-" + std::to_string(seed));
}
TEST_F(ResumeAt, EveryStepAdaptiveL3_1) { ResumeAt::every_step(aq::Level::L3_1, false, 11, "l31"); }
TEST_F(ResumeAt, EveryStepExact) { ResumeAt::every_step(aq::Level::L3, true, 11, "exact"); }
TEST_F(ResumeAt, EveryStepAdamWAdaptiveL3) { ResumeAt::every_step(aq::Level::L3, false, 13, "adamw", true); }

}  // namespace

namespace {

// What a resumed run refuses in a checkpoint: one runtime error (exit 1, not
// a usage error) that names the file.
std::string resume_error(aq::train::Options o) {
  try {
    aq::train::run(o, {});
  } catch (const std::invalid_argument& e) {
    return std::string("usage error: ") + e.what();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

class ResumeRefuses : public Resume {};

TEST_F(ResumeRefuses, CountersAndBudgetsOutOfRange) {
  auto o = options(aq::Level::L3, false, 3, "bad");
  const auto good = train(o, 1, "");
  const std::string bad = o.workspace + "/bad.h5";
  {
    auto c = good;
    c.counters["batch"] = 99;  // past the epoch's 4 batches
    aq::ckpt::save(bad, c);
    o.resume = bad;
    const std::string e = resume_error(o);
    EXPECT_EQ(e.rfind(bad + ": counters epoch 0, step 1, batch 99 do not fit", 0), 0u) << e;
  }
  {
    auto c = good;
    for (auto& [name, t] : c.adaptive)
      if (name.find(".aq_budget") != std::string::npos) t = torch::full({}, 1e30, torch::kDouble);
    aq::ckpt::save(bad, c);
    const std::string e = resume_error(o);
    EXPECT_EQ(e.rfind(bad + ": adaptive state '", 0), 0u) << e;
    EXPECT_NE(e.find("not a budget in 0..8"), std::string::npos) << e;
  }
  {
    auto c = good;
    c.parameters[0].second = c.parameters[0].second.clone();
    c.parameters[0].second.view(-1)[0] = std::nan("");
    aq::ckpt::save(bad, c);
    const std::string e = resume_error(o);
    EXPECT_EQ(e.rfind(bad + ": '" + c.parameters[0].first + "' holds inf or NaN", 0), 0u) << e;
  }
  {
    auto c = good;
    c.counters["epoch"] = int64_t{1} << 40;  // past the run's 3 epochs: not "nothing to do"
    aq::ckpt::save(bad, c);
    const std::string e = resume_error(o);
    EXPECT_EQ(e.rfind(bad + ": counters epoch 1099511627776, step 1, batch 1 do not fit a run of 4 batches an epoch "
                            "and 3 epochs", 0), 0u) << e;
  }
  {
    auto c = good;
    for (auto& [name, t] : c.buffers)
      if (name.find("running_var") != std::string::npos) t = torch::full_like(t, -1.0);
    aq::ckpt::save(bad, c);
    const std::string e = resume_error(o);
    EXPECT_EQ(e.rfind(bad + ": '", 0), 0u) << e;
    EXPECT_NE(e.find("running_var' holds negative values, which a variance cannot"), std::string::npos) << e;
  }
  {
    auto c = good;
    c.scalars["momentum"] = std::nan("");
    aq::ckpt::save(bad, c);
    const std::string e = resume_error(o);
    EXPECT_EQ(e, bad + ": scalar momentum is nan") << e;
  }
}

// A calibration file is matched to the run by more than the architecture.
TEST_F(ResumeRefuses, CalibrationOfAnotherDatasetOrConfiguration) {
  auto o = options(aq::Level::L3, false, 3, "cal");
  aq::ckpt::Checkpoint c;
  c.meta = {{"kind", "aq-calibration"}, {"arch", "preact_resnet20"}, {"dataset", "fashion-mnist"},
            {"config", aq::QuantConfig::for_level(aq::Level::L3).to_flags()}};
  c.counters = {{"dataset_size", kTrain}};
  ::mkdir(o.workspace.c_str(), 0777);
  o.calibration = o.workspace + "/cal.h5";
  const auto error_for = [&](const aq::ckpt::Checkpoint& file) {
    aq::ckpt::save(o.calibration, file);
    return resume_error(o);
  };
  {
    auto d = c;
    d.meta["dataset"] = "mnist";
    EXPECT_EQ(error_for(d), o.calibration + ": calibration on mnist, the run trains on fashion-mnist");
  }
  {
    auto d = c;
    d.counters["dataset_size"] = 60000;
    EXPECT_EQ(error_for(d), o.calibration + ": calibration on 60000 training samples, the run has 64");
  }
  {
    auto d = c;
    d.meta["config"] = "-c quantize --cabits=3 --level L3";
    EXPECT_EQ(error_for(d).rfind(o.calibration + ": calibration for -c quantize --cabits=3", 0), 0u);
  }
  {
    auto d = c;
    d.meta["config"] = "-c quantize --level L3 --attention-bits 0";
    EXPECT_EQ(error_for(d).rfind(o.calibration + ": calibration for -c quantize --level L3 --attention-bits 0", 0), 0u);
  }
  {
    auto d = c;
    d.adaptive.emplace_back("layer9.conv1.aq_budget", torch::full({}, 2.0, torch::kDouble));
    EXPECT_EQ(error_for(d), o.calibration + ": state 'layer9.conv1.aq_budget' is for a layer the preact_resnet20 "
                                            "does not have");
  }
}

}  // namespace
