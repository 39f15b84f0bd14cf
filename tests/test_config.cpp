// The quantization configuration: ActNN's command lines, levels, errors;
// the tools' error handler.
#include "aq/cli.h"
#include "aq/config.h"
#include "aq/memory.h"

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

namespace {

aq::QuantConfig parse(const std::string& line) {
  CLI::App app{"test"};
  aq::cli::QuantOptions q(app);
  std::vector<std::string> args;
  std::istringstream in(line);
  for (std::string w; in >> w;) args.push_back(w);
  std::reverse(args.begin(), args.end());  // CLI11 takes them reversed
  app.parse(args);
  return q.resolve();
}

TEST(Config, SeedCommandLines) {
  auto c = parse("-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True --usegradient=False");
  EXPECT_EQ(c.scope, aq::Scope::kAll);
  EXPECT_TRUE(c.ca);
  EXPECT_EQ(c.cabits, 2);
  EXPECT_EQ(c.ibits, 8);
  EXPECT_TRUE(c.pergroup);
  EXPECT_TRUE(c.perlayer);
  EXPECT_FALSE(c.usegradient);
  EXPECT_TRUE(c.compresses());

  c = parse("-c quantize --ca=True --cabits=4 --ibits=4 --pergroup=False --perlayer=False");
  EXPECT_EQ(c.cabits, 4);
  EXPECT_EQ(c.ibits, 4);
  EXPECT_FALSE(c.pergroup);
  EXPECT_FALSE(c.perlayer);
  EXPECT_TRUE(c.usegradient);

  c = parse("-c fanin");
  EXPECT_EQ(c.scope, aq::Scope::kNone);
  EXPECT_FALSE(c.compresses());

  c = parse("-c qlinear --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True");
  EXPECT_EQ(c.scope, aq::Scope::kLinear);
  // Space-separated values work too.
  c = parse("-c quantize --ca False --cabits 3");
  EXPECT_FALSE(c.ca);
  EXPECT_FALSE(c.compresses());
  EXPECT_EQ(c.cabits, 3);
}

TEST(Config, LevelsSetDefaultsFlagsOverride) {
  auto l0 = parse("--level L0");
  EXPECT_FALSE(l0.compresses());
  auto l1 = parse("--level L1");
  EXPECT_EQ(l1.cabits, 4);
  EXPECT_EQ(l1.ibits, 4);
  EXPECT_FALSE(l1.compress_bn);
  auto l2 = parse("--level 2");
  EXPECT_EQ(l2.cabits, 4);
  EXPECT_TRUE(l2.compress_bn);
  auto l3 = parse("");
  EXPECT_EQ(l3.level, aq::Level::L3);
  EXPECT_EQ(l3.cabits, 2);
  EXPECT_EQ(l3.ibits, 8);
  EXPECT_TRUE(l3.perlayer);
  EXPECT_FALSE(l3.micro_batch_backward);
  auto l31 = parse("--level L3.1");
  EXPECT_TRUE(l31.micro_batch_backward);
  EXPECT_FALSE(l31.swap);
  auto l4 = parse("--level l4");
  EXPECT_TRUE(l4.swap);
  EXPECT_TRUE(l4.micro_batch_backward);  // L3.1 + swap
  EXPECT_FALSE(l4.defrag);
  auto l5 = parse("--level L5");
  EXPECT_TRUE(l5.swap);
  EXPECT_TRUE(l5.micro_batch_backward);
  EXPECT_TRUE(l5.defrag);
  // An explicit flag beats the level's default, wherever it stands.
  auto mixed = parse("--cabits=3 --level L1 --ibits=8");
  EXPECT_EQ(mixed.cabits, 3);
  EXPECT_EQ(mixed.ibits, 8);
  EXPECT_FALSE(mixed.compress_bn);
}

TEST(Config, TransformersBudgetThreeBitsUnlessGiven) {
  const int t = aq::QuantConfig::kTransformerCabits;
  // The adaptive levels' default budget, on a transformer and not.
  for (const char* level : {"L3", "L3.1", "L4", "L5"}) {
    auto c = parse(std::string("--level ") + level);
    EXPECT_EQ(c.for_model(true).cabits, t) << level;
    EXPECT_EQ(c.for_model(false).cabits, 2) << level;
    EXPECT_EQ(c.for_model(true).ibits, 8) << level;
  }
  // Uniform levels keep theirs.
  EXPECT_EQ(parse("--level L2").for_model(true).cabits, 4);
  EXPECT_EQ(parse("--level L1").for_model(true).cabits, 4);
  // A budget given stays, whatever it is (the seed's command lines, a
  // checkpoint's stored configuration).
  EXPECT_EQ(parse("--cabits 2").for_model(true).cabits, 2);
  EXPECT_EQ(parse("-c quantize --ca=True --cabits=2 --ibits=8").for_model(true).cabits, 2);
  EXPECT_EQ(parse("--cabits 4").for_model(true).cabits, 4);
  EXPECT_EQ(aq::QuantConfig::from_flags(parse("").to_flags()).for_model(true).cabits, 2);
  const auto stored = aq::QuantConfig::from_flags(parse("").for_model(true).to_flags());
  EXPECT_EQ(stored.cabits, t);
  EXPECT_EQ(stored.for_model(true).cabits, t);
  // Initial bits below the budget make the allocation uniform at them.
  auto low = parse("--ibits 2").for_model(true);
  EXPECT_EQ(low.cabits, 2);
  EXPECT_NO_THROW(low.validate());
  EXPECT_EQ(parse("--ibits 3").for_model(true).cabits, 3);
  // Nothing compressed, nothing to budget: the flags stay as they were.
  EXPECT_EQ(parse("--ca False").for_model(true).cabits, 2);
  EXPECT_EQ(parse("-c fanin").for_model(true).cabits, 2);
  // Applying it twice changes nothing.
  EXPECT_EQ(parse("").for_model(true).for_model(true).cabits, t);
}

TEST(Config, RoundTripThroughSeedSpelling) {
  for (const char* line : {"-c quantize --cabits=2 --ibits=8 --usegradient=False",
                           "-c qlinear --level L4 --group-size 128 --range-dtype fp32",
                           "-c quantize --ca=False --rounding nearest --level L1",
                           "--level L3 --attention-bits 0", "--level L2 --attention-bits 8",
                           "--level L4 --attention-bits 4"}) {
    auto c = parse(line);
    auto again = parse(c.to_flags());
    EXPECT_EQ(again.to_flags(), c.to_flags()) << line;
    EXPECT_EQ(again.swap, c.swap);
    EXPECT_EQ(again.compress_bn, c.compress_bn);
    EXPECT_EQ(again.attention_bits, c.attention_bits);
  }
  EXPECT_EQ(parse("--attention-bits 6").attention_bits, 6);
  // The level's default: 8 from L3 up, none below.
  EXPECT_EQ(parse("--level L3.1").attention_bits, 8);
  EXPECT_EQ(parse("--level L2").attention_bits, 0);
  EXPECT_EQ(aq::QuantConfig().attention_bits, aq::QuantConfig::for_level(aq::Level::L3).attention_bits);
}

void expect_error(const std::string& line, const std::string& needle) {
  try {
    parse(line);
    ADD_FAILURE() << "no error for: " << line;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << line << ": " << e.what();
  }
}

TEST(Config, BadValuesAreClearErrors) {
  expect_error("--cabits=0", "--cabits must be in 1..8");
  expect_error("--cabits=9 --ibits=9", "--cabits must be in 1..8");
  expect_error("--cabits=two", "not an integer");
  expect_error("--cabits=4 --ibits=2", "--ibits (2) must be at least --cabits (4)");
  expect_error("--group-size=100", "power of two");
  expect_error("--group-size=16", "power of two");
  expect_error("--attention-bits 9", "--attention-bits must be in 0..8, not 9");
  expect_error("--attention-bits -1", "--attention-bits must be in 0..8");
  expect_error("--level L6", "unknown optimisation level 'L6'");
  expect_error("--level 3.2", "unknown optimisation level");
  expect_error("-c resnet", "unknown configuration '-c resnet'");
  expect_error("--ca=maybe", "'maybe' is not a boolean");
  expect_error("--range-dtype fp16", "--range-dtype must be bf16 or fp32");
  expect_error("--rounding up", "--rounding must be stochastic or nearest");
}

}  // namespace

// Checkpoints keep to_flags(); a resumed run reads its configuration back.
TEST(QuantConfigFlags, FromFlagsInvertsToFlags) {
  for (auto level : {aq::Level::L0, aq::Level::L1, aq::Level::L2, aq::Level::L3, aq::Level::L3_1, aq::Level::L4,
                     aq::Level::L5}) {
    aq::QuantConfig c = aq::QuantConfig::for_level(level);
    const aq::QuantConfig back = aq::QuantConfig::from_flags(c.to_flags());
    EXPECT_EQ(back.to_flags(), c.to_flags());
    EXPECT_EQ(back.micro_batch_backward, c.micro_batch_backward);
    EXPECT_EQ(back.swap, c.swap);
    EXPECT_EQ(back.compress_bn, c.compress_bn);
  }
  aq::QuantConfig c;
  c.scope = aq::Scope::kLinear;
  c.cabits = 3;
  c.usegradient = false;
  c.group_size = 64;
  c.range_dtype = c10::kFloat;
  c.stochastic = false;
  EXPECT_EQ(aq::QuantConfig::from_flags(c.to_flags()).to_flags(), c.to_flags());
  EXPECT_THROW(aq::QuantConfig::from_flags("-c quantize --cabits"), std::invalid_argument);
  EXPECT_THROW(aq::QuantConfig::from_flags("--frobnicate=1"), std::invalid_argument);
  EXPECT_THROW(aq::QuantConfig::from_flags("--cabits=9"), std::invalid_argument);
}

// A failed CPU allocation is a plain c10::Error with an "[enforce fail at
// ...]" prefix and a stack trace; the tools say "out of memory" in one line.
TEST(ErrorHandler, FailedAllocationIsOneOutOfMemoryLine) {
  auto fail = [] { torch::empty({int64_t{1} << 50}, torch::kFloat); };
  try {
    fail();
    FAIL() << "a 4 PiB tensor was allocated";
  } catch (const c10::Error& e) {
    EXPECT_TRUE(aq::is_out_of_memory(e));
    EXPECT_EQ(aq::error_line(e).rfind("DefaultCPUAllocator: can't allocate memory", 0), 0u) << aq::error_line(e);
  }
  try {
    torch::ones({2}).view({3});
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_FALSE(aq::is_out_of_memory(e));
    EXPECT_EQ(aq::error_line(e).find('\n'), std::string::npos);
  }

  CLI::App app{"test"};
  char name[] = "aq-test";
  char* argv[] = {name};
  testing::internal::CaptureStderr();
  const int status = aq::cli::run(app, 1, argv, [&] {
    fail();
    return 0;
  });
  // Without a sanitizer's own warning lines ("==pid==WARNING: ...").
  std::string err;
  std::istringstream captured(testing::internal::GetCapturedStderr());
  for (std::string line; std::getline(captured, line);)
    if (line.rfind("==", 0) != 0) err += line + "\n";
  EXPECT_EQ(status, aq::cli::kRuntime);
  EXPECT_EQ(err.rfind("aq-test: out of memory: DefaultCPUAllocator: can't allocate memory", 0), 0u) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
}
