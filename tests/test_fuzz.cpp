// Readers of untrusted files under mutation: a checkpoint, a calibration
// file and Fashion-MNIST's IDX files, each mutated a few hundred to a few
// thousand times from a seed (bit flips, bytes set to 0x00/0xff, 8-byte
// fields set to extreme values, truncations, appended garbage).  Each read
// must load or throw one std::runtime_error / std::invalid_argument with a
// one-line message: no crash, no other exception.  The mutations are seeded
// (AQ_FUZZ_SEED, default fixed), so a failure replays.
#include "aq/checkpoint.h"
#include "aq/data.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <algorithm>
#include <functional>
#include <iterator>
#include <map>
#include <random>
#include <stdexcept>
#include <string>

namespace {

std::string read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::string& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

uint64_t fuzz_seed() {
  const char* s = std::getenv("AQ_FUZZ_SEED");
  return s && *s ? std::strtoull(s, nullptr, 10) : 20261205;
}

// One mutation of `seed_bytes`; `fields` are offsets worth hitting (headers).
std::string mutate(const std::string& seed_bytes, std::mt19937_64& rng, const std::vector<size_t>& fields) {
  std::string b = seed_bytes;
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % std::max<size_t>(1, n)); };
  switch (rng() % 6) {
    case 0:  // a few bit flips anywhere
      for (int k = 0, n = 1 + static_cast<int>(rng() % 8); k < n && !b.empty(); ++k) {
        const size_t at = pick(b.size());
        b[at] = static_cast<char>(b[at] ^ (1 << (rng() % 8)));
      }
      break;
    case 1: {  // a byte set to 0x00 or 0xff in the first 4 KiB (metadata)
      const size_t at = pick(std::min<size_t>(b.size(), 4096));
      if (at < b.size()) b[at] = (rng() & 1) ? '\xff' : '\0';
      break;
    }
    case 2: {  // a header field: an extreme 1-, 4- or 8-byte value
      if (fields.empty()) break;
      const size_t at = fields[pick(fields.size())];
      const size_t width = size_t{1} << (rng() % 4);
      for (size_t i = 0; i < width && at + i < b.size(); ++i) b[at + i] = (rng() & 1) ? '\xff' : static_cast<char>(rng());
      break;
    }
    case 3:  // truncated
      b.resize(pick(b.size()));
      break;
    case 4:  // garbage appended
      b += std::string(1 + pick(4096), static_cast<char>(rng()));
      break;
    default: {  // a run of random bytes
      const size_t at = pick(b.size()), n = std::min<size_t>(b.size() - at, 1 + pick(64));
      for (size_t i = 0; i < n; ++i) b[at + i] = static_cast<char>(rng());
      break;
    }
  }
  return b;
}

// Runs f; it must return or throw a one-line runtime_error/invalid_argument.
// Counts loads and errors.
void expect_clean(const std::function<void()>& f, int& loaded, int& refused, const std::string& what) {
  try {
    f();
    ++loaded;
  } catch (const std::runtime_error& e) {
    ++refused;
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << what << ": " << e.what();
  } catch (const std::invalid_argument& e) {
    ++refused;
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << what << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": unexpected exception: " << e.what();
  }
}

class Fuzz : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/aq-fuzz-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    ::nftw(
        dir_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  std::string dir_;
};

aq::ckpt::Checkpoint seed_checkpoint(bool calibration) {
  aq::ckpt::Checkpoint c;
  c.meta = {{"arch", "preact_resnet20"}, {"dataset", "fashion-mnist"}, {"config", "-c quantize --cabits=2"}};
  if (calibration) c.meta["kind"] = "aq-calibration";
  c.counters = {{"epoch", 1}, {"step", 16}, {"batch", 0}, {"batch_size", 32}};
  c.scalars = {{"lr", 0.05}, {"momentum", 0.9}};
  c.parameters.emplace_back("conv1.weight", torch::randn({16, 1, 3, 3}));
  c.parameters.emplace_back("fc.weight", torch::randn({10, 64}));
  c.buffers.emplace_back("bn.running_mean", torch::zeros({16}));
  c.buffers.emplace_back("bn.num_batches_tracked", torch::tensor(16, torch::kInt64));
  c.adaptive.emplace_back("layer1.0.conv1.aq_budget", torch::full({}, 2.0, torch::kDouble));
  c.adaptive.emplace_back("layer1.0.conv1.aq_sample_stat", torch::rand({512}));
  c.rng.emplace_back("cpu", torch::randint(0, 255, {5056}, torch::kUInt8));
  c.metric_columns = {"epoch", "step", "val_top1"};
  c.metric_rows = {{1, 16, 55.5}};
  return c;
}

// Offsets of the HDF5 structures' size fields worth hitting: the superblock,
// and around every object header and global heap signature.
std::vector<size_t> hdf5_fields(const std::string& b) {
  std::vector<size_t> out;
  for (size_t i = 8; i < 64; ++i) out.push_back(i);
  for (const char* sig : {"OHDR", "GCOL", "OCHK", "FRHP", "FHDB", "BTHD", "BTLF", "TREE", "HEAP", "SNOD"})
    for (size_t at = b.find(sig); at != std::string::npos; at = b.find(sig, at + 1))
      for (size_t k = 4; k < 40; ++k) out.push_back(at + k);
  return out;
}

TEST_F(Fuzz, CheckpointAndCalibrationReaders) {
  std::mt19937_64 rng(fuzz_seed());
  for (bool calibration : {false, true}) {
    const std::string good = dir_ + (calibration ? "/cal.h5" : "/ck.h5");
    aq::ckpt::save(good, seed_checkpoint(calibration));
    const std::string seed_bytes = read_bytes(good);
    const auto fields = hdf5_fields(seed_bytes);
    int loaded = 0, refused = 0;
    const int n = calibration ? 500 : 2000;
    for (int i = 0; i < n; ++i) {
      const std::string p = dir_ + "/m.h5";
      write_bytes(p, mutate(seed_bytes, rng, fields));
      expect_clean([&] { aq::ckpt::load(p); }, loaded, refused, "mutation " + std::to_string(i));
    }
    EXPECT_EQ(loaded + refused, n);
    EXPECT_GT(refused, n / 4);  // most mutations are caught
  }
}

// Fashion-MNIST's four IDX files, 64/16 images; one file mutated at a time.
TEST_F(Fuzz, IdxReader) {
  std::mt19937_64 rng(fuzz_seed() + 1);
  const std::string data = dir_ + "/fm";
  ::mkdir(data.c_str(), 0777);
  auto be32 = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
  };
  std::map<std::string, std::string> files;
  for (auto [prefix, n] : {std::pair<std::string, uint32_t>{"train", 64}, {"t10k", 16}}) {
    std::string img = be32(0x803) + be32(n) + be32(28) + be32(28), lab = be32(0x801) + be32(n);
    for (uint32_t i = 0; i < n * 784; ++i) img += static_cast<char>(rng());
    for (uint32_t i = 0; i < n; ++i) lab += static_cast<char>(rng() % 10);
    files[prefix + "-images-idx3-ubyte"] = img;
    files[prefix + "-labels-idx1-ubyte"] = lab;
  }
  for (const auto& [name, bytes] : files) write_bytes(data + "/" + name, bytes);
  const std::vector<size_t> fields = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int loaded = 0, refused = 0;
  for (int i = 0; i < 1000; ++i) {
    auto it = files.begin();
    std::advance(it, static_cast<long>(rng() % files.size()));
    write_bytes(data + "/" + it->first, mutate(it->second, rng, fields));
    expect_clean(
        [&] {
          for (auto split : {aq::data::Split::kTrain, aq::data::Split::kTest}) {
            const auto ds = aq::data::open("fashion-mnist", data, split);
            std::vector<float> out(static_cast<size_t>(ds->info().channels * ds->info().height * ds->info().width));
            std::mt19937_64 r(1);
            for (int64_t k = 0; k < ds->size(); k += 7) {
              ds->get(k, true, r, out.data());
              ds->label(k);
            }
          }
        },
        loaded, refused, "mutation " + std::to_string(i) + " of " + it->first);
    write_bytes(data + "/" + it->first, it->second);
  }
  EXPECT_GT(refused, 100);
}

}  // namespace
