// safetensors files (round trips of every dtype, atomic writes that never
// replace a file unasked, one-line errors for every kind of corrupt file)
// and weights in and out of models (aq/weights.h).  Files written by
// Python's safetensors package are checked in tests/cli/weights.sh.
#include "aq/checkpoint.h"
#include "aq/models.h"
#include "aq/safetensors.h"
#include "aq/weights.h"
#include "temp_dir.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace st = aq::safetensors;

class Weights : public ::testing::Test {
 protected:
  TempDir tmp_{"aq-weights"};
  const std::string dir_ = tmp_.str();
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
};

std::string read(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
void write(const std::string& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
// A file of `header` (JSON) and `data` bytes, as the format lays them out.
std::string file_of(const std::string& header, const std::string& data) {
  const uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

// The exception's message, or "" when `f` does not throw std::runtime_error.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || !a.sizes().equals(b.sizes())) return false;
  auto x = a.contiguous(), y = b.contiguous();
  return x.nbytes() == y.nbytes() && std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

aq::ckpt::Tensors every_dtype() {
  torch::manual_seed(1);
  aq::ckpt::Tensors t;
  t.emplace_back("f64", torch::randn({3, 2}, torch::kDouble));
  t.emplace_back("f32", torch::randn({2, 3, 4}));
  t.emplace_back("f16", torch::randn({5}).to(torch::kHalf));
  t.emplace_back("bf16", torch::randn({7}).to(torch::kBFloat16));
  t.emplace_back("i64 scalar", torch::tensor(int64_t{-42}));
  t.emplace_back("i32", torch::randint(-1000, 1000, {3}, torch::kInt));
  t.emplace_back("i16", torch::randint(-1000, 1000, {3}, torch::kShort));
  t.emplace_back("i8", torch::randint(-100, 100, {3}, torch::kChar));
  t.emplace_back("u8", torch::randint(0, 255, {3}, torch::kByte));
  t.emplace_back("bool", torch::rand({4}) > 0.5);
  t.emplace_back("empty", torch::zeros({0, 3}));
  t.emplace_back("strided", torch::randn({4, 6}).t());  // written as its contiguous copy
  return t;
}

TEST_F(Weights, RoundTripsEveryDtypeBitExactlyWithMetadata) {
  const auto t = every_dtype();
  st::save(path("a.safetensors"), t, {{"arch", "resnet18"}, {"note", "ünïcode \"quoted\""}});
  const auto f = st::load(path("a.safetensors"));
  ASSERT_EQ(f.tensors.size(), t.size());
  for (size_t i = 0; i < t.size(); ++i) {
    EXPECT_EQ(f.tensors[i].first, t[i].first);
    EXPECT_TRUE(same_bits(f.tensors[i].second, t[i].second)) << t[i].first;
  }
  EXPECT_EQ(f.metadata.at("arch"), "resnet18");
  EXPECT_EQ(f.metadata.at("note"), "ünïcode \"quoted\"");
  // The header is padded so that the data starts 8-byte aligned.
  const std::string bytes = read(path("a.safetensors"));
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
}

TEST_F(Weights, NeverReplacesAFileUnlessAskedAndLeavesNoTemporaryFile) {
  const std::string p = path("w.safetensors");
  write(p, "precious");
  const aq::ckpt::Tensors t = {{"x", torch::ones({2})}};
  EXPECT_NE(error_of([&] { st::save(p, t, {}); }).find("exists"), std::string::npos);
  EXPECT_EQ(read(p), "precious");
  st::save(p, t, {}, /*overwrite=*/true);
  EXPECT_TRUE(same_bits(st::load(p).tensors.at(0).second, torch::ones({2})));
  EXPECT_NE(error_of([&] { st::save(path("missing/w.safetensors"), t, {}); }).find("cannot write"), std::string::npos);
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir_.c_str())) {
    while (const dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.emplace_back(e->d_name);
    ::closedir(d);
  }
  EXPECT_EQ(names, std::vector<std::string>{"w.safetensors"});
  EXPECT_THROW(st::save(path("b"), {{"x", torch::ones({1})}, {"x", torch::ones({1})}}, {}), std::invalid_argument);
  EXPECT_THROW(st::save(path("c"), {{"z", torch::ones({1}, torch::kComplexFloat)}}, {}), std::invalid_argument);
}

// Every kind of bad file: one line naming the file, never a crash.
TEST_F(Weights, CorruptFilesAreOneLineErrors) {
  const std::string f32_4 = std::string(16, '\0');
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  write(path("ok"), file_of(ok, f32_4));
  ASSERT_EQ(st::load(path("ok")).tensors.size(), 1u);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"short", "1234"},
      {"implausible header length", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}"},
      {"truncated header", file_of(ok, f32_4).substr(0, 30)},
      {"truncated data", file_of(ok, f32_4.substr(0, 8))},
      {"not JSON", file_of(R"({"a":)", "")},
      {"not an object", file_of("[1,2]", "")},
      {"repeated name", file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy")},
      {"unknown dtype", file_of(R"({"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "x")},
      {"negative dimension", file_of(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", "x")},
      {"fractional offset", file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.5]}})", "x")},
      {"shape overflow", file_of(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                                 std::string(8, '\0'))},
      {"size mismatch", file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", f32_4)},
      {"offsets past the end", file_of(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})", f32_4)},
      {"begin after end", file_of(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}})", "xy")},
      {"gap", file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy")},
      {"overlap", file_of(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                          R"("b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", "xy")},
      {"trailing bytes", file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "xy")},
      {"bool byte 2", file_of(R"({"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}})", "\x02")},
      {"metadata not strings", file_of(R"({"__metadata__":{"a":1}})", "")},
      {"missing dtype", file_of(R"({"a":{"shape":[1],"data_offsets":[0,1]}})", "x")},
      {"extra field", file_of(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}})", "x")},
      {"deep nesting", file_of(R"({"a":{"dtype":"U8","shape":[[[1]]],"data_offsets":[0,1]}})", "x")},
  };
  for (const auto& [what, bytes] : cases) {
    write(path("bad"), bytes);
    const std::string e = error_of([&] { st::load(path("bad")); });
    EXPECT_EQ(e.rfind(path("bad") + ": ", 0), 0u) << what << ": " << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << what << ": " << e;
  }
  EXPECT_NE(error_of([&] { st::load(path("none")); }).find("cannot open"), std::string::npos);
  EXPECT_NE(error_of([&] { st::load(dir_); }).find("cannot read"), std::string::npos);
}

// Streams are read as far as the header says: /dev/zero is refused at once,
// and a valid file followed by endless bytes through a FIFO is one error.
TEST_F(Weights, StreamsAreReadBoundedly) {
  EXPECT_NE(error_of([&] { st::load("/dev/zero"); }).find("not a safetensors file"), std::string::npos);
  st::save(path("good"), every_dtype(), {});
  const std::string good = read(path("good"));
  ASSERT_EQ(::mkfifo(path("fifo").c_str(), 0600), 0);
  std::signal(SIGPIPE, SIG_IGN);
  std::thread writer([&] {
    const int fd = ::open(path("fifo").c_str(), O_WRONLY);
    if (fd < 0) return;
    const std::string zeros(1 << 16, '\0');
    bool ok = ::write(fd, good.data(), good.size()) == static_cast<ssize_t>(good.size());
    for (int i = 0; ok && i < 100000; ++i) ok = ::write(fd, zeros.data(), zeros.size()) > 0;  // 6.4 GB unless stopped
    ::close(fd);
  });
  const std::string e = error_of([&] { st::load(path("fifo")); });
  writer.join();
  EXPECT_NE(e.find("belong to no tensor"), std::string::npos) << e;
}

// Random damage to a valid file: it loads or throws std::runtime_error.
TEST_F(Weights, DamagedFilesLoadOrThrowNeverCrash) {
  st::save(path("good"), every_dtype(), {{"k", "v"}});
  const std::string good = read(path("good"));
  std::mt19937_64 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    const size_t span = i % 2 ? 8 + 200 : bytes.size();  // half the damage in the length and header
    for (int k = 0; k < flips; ++k) bytes[rng() % std::min(span, bytes.size())] = static_cast<char>(rng());
    if (i % 5 == 0) bytes.resize(rng() % bytes.size());
    write(path("d"), bytes);
    try {
      st::load(path("d"));
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
  }
}

aq::ckpt::Checkpoint checkpoint_of(aq::models::Model& m, const std::string& arch, int64_t classes) {
  aq::ckpt::Checkpoint c;
  for (const auto& p : m.named_parameters()) c.parameters.emplace_back(p.key(), p.value().detach());
  for (const auto& b : m.named_buffers()) c.buffers.emplace_back(b.key(), b.value());
  c.meta = {{"arch", arch}, {"dataset", "synthetic"}, {"mean", "0,0,0"}, {"std", "1,1,1"}};
  c.counters = {{"num_classes", classes}, {"in_channels", 3}, {"image_size", 32}};
  return c;
}

// Randomised buffers too, so that a copy that misses one shows.
void scramble(aq::models::Model& m) {
  torch::NoGradGuard g;
  for (auto& p : m.parameters()) p.normal_();
  for (auto& b : m.buffers())
    if (b.is_floating_point()) b.uniform_(0.5, 2);
    else b.fill_(17);
}

TEST_F(Weights, ExportThenInitFromGivesTheSameModelBitForBit) {
  torch::manual_seed(3);
  auto a = aq::models::build("resnet18", 3, 10);
  scramble(*a);
  const auto w = aq::train::export_weights(checkpoint_of(*a, "resnet18", 10), "ckpt");
  EXPECT_EQ(w.metadata.at("arch"), "resnet18");
  EXPECT_EQ(w.metadata.at("num_classes"), "10");
  EXPECT_EQ(w.metadata.at("mean"), "[0,0,0]");
  // torchvision's resnet18 state_dict(): 122 tensors, from conv1.weight to fc.bias.
  EXPECT_EQ(w.tensors.size(), 122u);
  st::save(path("r18.safetensors"), w.tensors, w.metadata);
  auto b = aq::models::build("resnet18", 3, 10);
  aq::train::init_from(*b, path("r18.safetensors"), false);
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& p : pa) EXPECT_TRUE(same_bits(p.value(), pb[p.key()])) << p.key();
  auto ba = a->named_buffers(), bb = b->named_buffers();
  for (const auto& x : ba) EXPECT_TRUE(same_bits(x.value(), bb[x.key()])) << x.key();
  // An aq checkpoint works as well.
  aq::ckpt::save(path("a.h5"), checkpoint_of(*a, "resnet18", 10));
  auto c = aq::models::build("resnet18", 3, 10);
  aq::train::init_from(*c, path("a.h5"), false);
  EXPECT_TRUE(same_bits(c->named_parameters()["layer4.1.bn2.weight"], pa["layer4.1.bn2.weight"]));
}

TEST_F(Weights, InitFromChecksNamesAndShapesAndResetsTheHead) {
  torch::manual_seed(4);
  auto a = aq::models::build("resnet18", 3, 1000);
  scramble(*a);
  auto w = aq::train::export_weights(checkpoint_of(*a, "resnet18", 1000), "ckpt");
  st::save(path("r18.safetensors"), w.tensors, w.metadata);
  auto b = aq::models::build("resnet18", 3, 10);
  const std::string e = error_of([&] { aq::train::init_from(*b, path("r18.safetensors"), false); });
  EXPECT_NE(e.find("'fc.weight' has shape [1000,512], the model's [10,512]"), std::string::npos) << e;
  EXPECT_NE(e.find("--reset-head"), std::string::npos) << e;
  const auto fresh = b->named_parameters()["fc.weight"].clone();
  aq::train::init_from(*b, path("r18.safetensors"), true);
  EXPECT_TRUE(same_bits(b->named_parameters()["fc.weight"], fresh));
  EXPECT_TRUE(same_bits(b->named_parameters()["conv1.weight"], a->named_parameters()["conv1.weight"]));
  EXPECT_TRUE(same_bits(b->named_buffers()["layer2.0.bn1.running_var"], a->named_buffers()["layer2.0.bn1.running_var"]));

  // Another architecture: the first tensor that does not fit.
  auto p = aq::models::build("preact_resnet20", 3, 10);
  EXPECT_NE(error_of([&] { aq::train::init_from(*p, path("r18.safetensors"), true); })
                .find("'conv1.weight' has shape [64,3,7,7], the model's [16,3,3,3] (another architecture"),
            std::string::npos);
  auto r34 = aq::models::build("resnet34", 3, 10);
  EXPECT_NE(error_of([&] { aq::train::init_from(*r34, path("r18.safetensors"), true); }).find("lacks the model's 'layer1.2."),
            std::string::npos);
  // A missing tensor is named; a missing num_batches_tracked is not an error.
  aq::ckpt::Tensors fewer, no_count;
  for (const auto& t : w.tensors) {
    if (t.first != "layer3.1.conv2.weight") fewer.push_back(t);
    if (t.first.find("num_batches_tracked") == std::string::npos) no_count.push_back(t);
  }
  st::save(path("fewer"), fewer, {});
  EXPECT_NE(error_of([&] { aq::train::init_from(*b, path("fewer"), true); }).find("lacks the model's 'layer3.1.conv2.weight'"),
            std::string::npos);
  st::save(path("no_count"), no_count, {});
  EXPECT_EQ(error_of([&] { aq::train::init_from(*b, path("no_count"), true); }), "");
  // Half precision converts; an integer where a float belongs does not.
  aq::ckpt::Tensors half = w.tensors;
  for (auto& t : half)
    if (t.second.is_floating_point()) t.second = t.second.to(torch::kHalf);
  st::save(path("half"), half, {});
  aq::train::init_from(*b, path("half"), true);
  EXPECT_TRUE(same_bits(b->named_parameters()["conv1.weight"],
                        a->named_parameters()["conv1.weight"].to(torch::kHalf).to(torch::kFloat)));
  for (auto& t : half)
    if (t.first == "conv1.weight") t.second = t.second.to(torch::kInt);
  st::save(path("int"), half, {});
  EXPECT_NE(error_of([&] { aq::train::init_from(*b, path("int"), true); }).find("'conv1.weight' has dtype Int"),
            std::string::npos);
  // A file that is neither: the safetensors reader's message.
  write(path("junk"), "junk junk junk");
  EXPECT_NE(error_of([&] { aq::train::init_from(*b, path("junk"), true); }).find("not a safetensors file"),
            std::string::npos);
}

}  // namespace
