// Datasets and the loader: file formats and their errors, transforms,
// determinism and resumption of the batch order, worker threads.
#include "aq/data.h"
#include "temp_dir.h"

#include <gtest/gtest.h>
#include <jpeglib.h>
#include <png.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using aq::data::Split;

// File-system work through POSIX: libtorch.so exports its own copies of some
// std::filesystem functions, and remove_all(path, error_code&) from there crashes.
void make_dirs(const fs::path& p) {
  std::string sofar;
  for (const auto& part : p) {
    sofar = (fs::path(sofar) / part).string();
    ::mkdir(sofar.c_str(), 0755);
  }
}

bool path_exists(const fs::path& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// A fresh folder under the temporary directory, removed afterwards.
void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
  make_dirs(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

void put_u32(std::vector<uint8_t>& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}

// An IDX file: magic, dims, then `data` (which may be shorter than the dims say).
void write_idx(const fs::path& path, bool gz, uint32_t magic, const std::vector<uint32_t>& dims,
               const std::vector<uint8_t>& data) {
  std::vector<uint8_t> b;
  put_u32(b, magic);
  for (uint32_t d : dims) put_u32(b, d);
  b.insert(b.end(), data.begin(), data.end());
  if (!gz) return write_bytes(path, b);
  make_dirs(path.parent_path());
  gzFile f = gzopen(path.string().c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, b.data(), static_cast<unsigned>(b.size())), static_cast<int>(b.size()));
  gzclose(f);
}

uint8_t idx_pixel(uint32_t image, uint32_t p) {
  return static_cast<uint8_t>((image * 131 + p * 7 + (p * p) % 11) % 256);
}

// IDX images 28x28 with idx_pixel() values and labels image % 10.
void write_mnist_split(const TempDir& dir, const std::string& prefix, uint32_t n, bool gz) {
  std::vector<uint8_t> px(n * 784), lab(n);
  for (uint32_t i = 0; i < n; ++i) {
    lab[i] = static_cast<uint8_t>(i % 10);
    for (uint32_t p = 0; p < 784; ++p) px[i * 784 + p] = idx_pixel(i, p);
  }
  const std::string z = gz ? ".gz" : "";
  write_idx(dir / (prefix + "-images-idx3-ubyte" + z), gz, 2051, {n, 28, 28}, px);
  write_idx(dir / (prefix + "-labels-idx1-ubyte" + z), gz, 2049, {n}, lab);
}

float norm(uint8_t v, double mean, double std) { return static_cast<float>((v / 255.0 - mean) / std); }

std::vector<float> get(const aq::data::Dataset& ds, int64_t index, bool augment, uint64_t seed) {
  const auto& i = ds.info();
  std::vector<float> out(i.channels * i.height * i.width, -1000.0f);
  std::mt19937_64 rng(seed);
  ds.get(index, augment, rng, out.data());
  return out;
}

// Runs `f`, expecting an exception of type E whose message contains every one of `parts`.
template <class E, class F>
void expect_error(F f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    const std::string m = e.what();
    for (const auto& p : parts) EXPECT_NE(m.find(p), std::string::npos) << "'" << m << "' lacks '" << p << "'";
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  }
}

// --- IDX ------------------------------------------------------------------------

TEST(DataIdx, ReadsGzAndPlainFiles) {
  TempDir dir("aq-test-data");
  write_mnist_split(dir, "train", 3, true);
  write_mnist_split(dir, "t10k", 2, false);
  auto train = aq::data::open("fmnist", dir.str(), Split::kTrain);
  auto test = aq::data::open("Fashion_MNIST", dir.str(), Split::kTest);
  EXPECT_EQ(train->size(), 3);
  EXPECT_EQ(test->size(), 2);
  const auto& info = train->info();
  EXPECT_EQ(info.name, "fashion-mnist");
  EXPECT_EQ(info.channels, 1);
  EXPECT_EQ(info.height, 28);
  EXPECT_EQ(info.width, 28);
  EXPECT_EQ(info.num_classes, 10);
  ASSERT_EQ(info.mean.size(), 1u);
  EXPECT_DOUBLE_EQ(info.mean[0], 0.2860);
  EXPECT_DOUBLE_EQ(info.std[0], 0.3530);
  for (int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(train->label(i), i);
    const auto x = get(*train, i, false, 1);
    for (uint32_t p = 0; p < 784; ++p) ASSERT_EQ(x[p], norm(idx_pixel(i, p), 0.2860, 0.3530)) << i << " " << p;
  }
  // A known pixel by hand: image 1, pixel (row 2, col 3) = p 59.
  const uint8_t v = idx_pixel(1, 59);
  EXPECT_NEAR(get(*test, 1, false, 0)[59], (v / 255.0 - 0.2860) / 0.3530, 1e-6);
  EXPECT_EQ(test->label(1), 1);
  EXPECT_THROW(train->label(3), std::invalid_argument);
}

TEST(DataIdx, MnistNormalisation) {
  TempDir dir("aq-test-data");
  write_mnist_split(dir, "t10k", 2, true);
  auto ds = aq::data::open("mnist", dir.str(), Split::kTest);
  EXPECT_EQ(ds->info().name, "mnist");
  EXPECT_DOUBLE_EQ(ds->info().mean[0], 0.1307);
  EXPECT_DOUBLE_EQ(ds->info().std[0], 0.3081);
  EXPECT_EQ(get(*ds, 0, false, 0)[100], norm(idx_pixel(0, 100), 0.1307, 0.3081));
}

TEST(DataIdx, MissingFilesNameThemAndTheDebianPackage) {
  TempDir dir("aq-test-data");
  expect_error<std::runtime_error>(
      [&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
      {"train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", dir.str(), "dataset-fashion-mnist"});
  expect_error<std::runtime_error>([&] { aq::data::open("mnist", dir.str(), Split::kTest); },
                                   {"t10k-images-idx3-ubyte", dir.str()});
  // Images there but no labels.
  write_mnist_split(dir, "train", 2, true);
  ::remove((dir / "train-labels-idx1-ubyte.gz").c_str());
  expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                   {"train-labels-idx1-ubyte", "dataset-fashion-mnist"});
}

TEST(DataIdx, MalformedFilesAreNamed) {
  std::vector<uint8_t> px(3 * 784, 7), lab = {1, 2, 3};
  {
    TempDir dir("aq-test-data");  // bad magic
    write_idx(dir / "train-images-idx3-ubyte.gz", true, 2052, {3, 28, 28}, px);
    write_idx(dir / "train-labels-idx1-ubyte.gz", true, 2049, {3}, lab);
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-images-idx3-ubyte.gz", "magic"});
  }
  {
    TempDir dir("aq-test-data");  // labels with an image magic
    write_idx(dir / "train-images-idx3-ubyte", false, 2051, {3, 28, 28}, px);
    write_idx(dir / "train-labels-idx1-ubyte", false, 2051, {3}, lab);
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-labels-idx1-ubyte", "magic"});
  }
  for (bool gz : {true, false}) {
    TempDir dir("aq-test-data");  // truncated pixels
    const std::string z = gz ? ".gz" : "";
    write_idx(dir / ("train-images-idx3-ubyte" + z), gz, 2051, {3, 28, 28},
              std::vector<uint8_t>(px.begin(), px.begin() + 2 * 784 + 100));
    write_idx(dir / ("train-labels-idx1-ubyte" + z), gz, 2049, {3}, lab);
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-images-idx3-ubyte" + z, "truncated"});
  }
  {
    TempDir dir("aq-test-data");  // truncated labels
    write_idx(dir / "t10k-images-idx3-ubyte.gz", true, 2051, {3, 28, 28}, px);
    write_idx(dir / "t10k-labels-idx1-ubyte.gz", true, 2049, {3}, {1, 2});
    expect_error<std::runtime_error>([&] { aq::data::open("mnist", dir.str(), Split::kTest); },
                                     {"t10k-labels-idx1-ubyte.gz", "truncated"});
  }
  {
    TempDir dir("aq-test-data");  // count mismatch
    write_idx(dir / "train-images-idx3-ubyte.gz", true, 2051, {3, 28, 28}, px);
    write_idx(dir / "train-labels-idx1-ubyte.gz", true, 2049, {2}, {1, 2});
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "3", "2"});
  }
  {
    TempDir dir("aq-test-data");  // label out of range
    write_idx(dir / "train-images-idx3-ubyte.gz", true, 2051, {3, 28, 28}, px);
    write_idx(dir / "train-labels-idx1-ubyte.gz", true, 2049, {3}, {1, 10, 3});
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-labels-idx1-ubyte.gz", "10"});
  }
  {
    TempDir dir("aq-test-data");  // not gzip data behind a .gz name, not an IDX header either
    write_bytes(dir / "train-images-idx3-ubyte.gz", {1, 2, 3});
    write_idx(dir / "train-labels-idx1-ubyte.gz", true, 2049, {3}, lab);
    expect_error<std::runtime_error>([&] { aq::data::open("fashion-mnist", dir.str(), Split::kTrain); },
                                     {"train-images-idx3-ubyte.gz"});
  }
}

// The augmented sample must be one of the 81 shifts of the zero-padded source,
// flipped or not; returns {dy, dx, flip} of the (single) match, or throws.
std::array<int, 3> which_crop(const std::vector<float>& x, uint32_t image, double mean, double std) {
  std::vector<std::array<int, 3>> found;
  for (int flip = 0; flip < 2; ++flip)
    for (int dy = -4; dy <= 4; ++dy)
      for (int dx = -4; dx <= 4; ++dx) {
        bool same = true;
        for (int y = 0; y < 28 && same; ++y)
          for (int xx = 0; xx < 28 && same; ++xx) {
            const int sy = y + dy, sx = (flip ? 27 - xx : xx) + dx;
            const uint8_t v = sy >= 0 && sy < 28 && sx >= 0 && sx < 28 ? idx_pixel(image, sy * 28 + sx) : 0;
            same = x[y * 28 + xx] == norm(v, mean, std);
          }
        if (same) found.push_back({dy, dx, flip});
      }
  if (found.size() != 1) throw std::logic_error("augmented sample matches " + std::to_string(found.size()) + " crops");
  return found[0];
}

TEST(DataIdx, TrainAugmentationIsAShiftedOrFlippedCropOfThePaddedImage) {
  TempDir dir("aq-test-data");
  write_mnist_split(dir, "train", 4, true);
  for (const std::string name : {"fashion-mnist", "mnist"}) {
    auto ds = aq::data::open(name, dir.str(), Split::kTrain);
    const double mean = ds->info().mean[0], std = ds->info().std[0];
    std::set<std::pair<int, int>> shifts;
    int flips = 0;
    for (uint64_t seed = 0; seed < 60; ++seed) {
      const uint32_t image = static_cast<uint32_t>(seed % 4);
      std::array<int, 3> c{};
      ASSERT_NO_THROW(c = which_crop(get(*ds, image, true, seed), image, mean, std)) << name << " seed " << seed;
      shifts.insert({c[0], c[1]});
      flips += c[2];
      EXPECT_EQ(get(*ds, image, true, seed), get(*ds, image, true, seed));  // rng alone decides
    }
    EXPECT_GE(shifts.size(), 20u) << name;
    if (name == "mnist") {
      EXPECT_EQ(flips, 0);  // a flipped digit is another digit
    } else {
      EXPECT_GT(flips, 10);
      EXPECT_LT(flips, 50);
    }
  }
}

TEST(DataIdx, EvalTransformIsDeterministic) {
  TempDir dir("aq-test-data");
  write_mnist_split(dir, "t10k", 2, true);
  auto ds = aq::data::open("fashion-mnist", dir.str(), Split::kTest);
  const auto a = get(*ds, 1, false, 1), b = get(*ds, 1, false, 999);
  EXPECT_EQ(a, b);
  EXPECT_EQ(which_crop(a, 1, 0.2860, 0.3530), (std::array<int, 3>{0, 0, 0}));
}

TEST(DataFashionMnist, InstalledDebianPackage) {
  EXPECT_EQ(aq::data::default_root("fashion-mnist"), "/usr/share/datasets/fashion-mnist");
  // Where the package is unpacked elsewhere (the GPU machine), it says so.
  const char* env = std::getenv("AQ_FASHION_MNIST");
  const std::string root = env && *env ? env : aq::data::default_root("fashion-mnist");
  if (!path_exists(fs::path(root) / "train-images-idx3-ubyte.gz") &&
      !path_exists(fs::path(root) / "train-images-idx3-ubyte"))
    GTEST_SKIP() << "no Fashion-MNIST in " << root << " (Debian's dataset-fashion-mnist package)";
  auto train = aq::data::open("fashion-mnist", root, Split::kTrain);
  auto test = aq::data::open("fashion-mnist", root, Split::kTest);
  EXPECT_EQ(train->size(), 60000);
  EXPECT_EQ(test->size(), 10000);
  std::vector<int> count(10, 0);
  for (int64_t i = 0; i < train->size(); ++i) count.at(train->label(i))++;
  for (int c = 0; c < 10; ++c) EXPECT_EQ(count[c], 6000) << "class " << c;
  // Normalised pixels of the whole first sample: within [(0-m)/s, (1-m)/s], not all background.
  const auto x = get(*train, 0, false, 0);
  float lo = x[0], hi = x[0];
  for (float v : x) lo = std::min(lo, v), hi = std::max(hi, v);
  EXPECT_GE(lo, norm(0, 0.2860, 0.3530));
  EXPECT_LE(hi, norm(255, 0.2860, 0.3530));
  EXPECT_GT(hi, 0.0f);
}

// --- CIFAR ----------------------------------------------------------------------

uint8_t cifar_pixel(int record, int c, int p) { return static_cast<uint8_t>((record * 37 + c * 80 + p * 3) % 256); }

// `n` records starting at record number `first`; label first % 10, or for
// CIFAR-100 coarse = 99 - fine and fine = (first * 7) % 100.
std::vector<uint8_t> cifar_records(int first, int n, bool c100) {
  std::vector<uint8_t> b;
  for (int r = first; r < first + n; ++r) {
    if (c100) {
      b.push_back(static_cast<uint8_t>(99 - (r * 7) % 100));
      b.push_back(static_cast<uint8_t>((r * 7) % 100));
    } else {
      b.push_back(static_cast<uint8_t>(r % 10));
    }
    for (int c = 0; c < 3; ++c)
      for (int p = 0; p < 1024; ++p) b.push_back(cifar_pixel(r, c, p));
  }
  return b;
}

void check_cifar_sample(const aq::data::Dataset& ds, int64_t index, int record) {
  const auto& i = ds.info();
  const auto x = get(ds, index, false, 0);
  for (int c = 0; c < 3; ++c)
    for (int p : {0, 1, 33, 500, 1023})
      ASSERT_EQ(x[c * 1024 + p], norm(cifar_pixel(record, c, p), i.mean[c], i.std[c]))
          << "index " << index << " channel " << c << " pixel " << p;
}

TEST(DataCifar, Cifar10BothLayouts) {
  TempDir flat("aq-test-data"), parent("aq-test-data");
  for (int b = 1; b <= 5; ++b)
    write_bytes(flat / ("data_batch_" + std::to_string(b) + ".bin"), cifar_records(2 * (b - 1), 2, false));
  write_bytes(flat / "test_batch.bin", cifar_records(100, 3, false));
  for (int b = 1; b <= 5; ++b)
    write_bytes(parent / ("cifar-10-batches-bin/data_batch_" + std::to_string(b) + ".bin"),
                cifar_records(2 * (b - 1), 2, false));
  write_bytes(parent / "cifar-10-batches-bin/test_batch.bin", cifar_records(100, 3, false));
  for (const TempDir* root : {&flat, &parent}) {
    auto train = aq::data::open("cifar10", root->str(), Split::kTrain);
    auto test = aq::data::open("cifar10", root->str(), Split::kTest);
    const auto& info = train->info();
    EXPECT_EQ(info.name, "cifar10");
    EXPECT_EQ(info.channels, 3);
    EXPECT_EQ(info.height, 32);
    EXPECT_EQ(info.num_classes, 10);
    EXPECT_DOUBLE_EQ(info.mean[1], 0.4822);
    EXPECT_DOUBLE_EQ(info.std[2], 0.2616);
    ASSERT_EQ(train->size(), 10);
    ASSERT_EQ(test->size(), 3);
    for (int r = 0; r < 10; ++r) {
      EXPECT_EQ(train->label(r), r % 10);
      check_cifar_sample(*train, r, r);
    }
    EXPECT_EQ(test->label(2), 2);
    check_cifar_sample(*test, 2, 102);
    EXPECT_EQ(get(*train, 3, true, 5).size(), 3072u);
  }
}

TEST(DataCifar, Cifar100UsesTheFineLabel) {
  TempDir flat("aq-test-data"), parent("aq-test-data");
  write_bytes(flat / "train.bin", cifar_records(0, 4, true));
  write_bytes(flat / "test.bin", cifar_records(10, 2, true));
  write_bytes(parent / "cifar-100-binary/train.bin", cifar_records(0, 4, true));
  write_bytes(parent / "cifar-100-binary/test.bin", cifar_records(10, 2, true));
  for (const TempDir* root : {&flat, &parent}) {
    auto train = aq::data::open("cifar100", root->str(), Split::kTrain);
    auto test = aq::data::open("cifar100", root->str(), Split::kTest);
    EXPECT_EQ(train->info().num_classes, 100);
    EXPECT_DOUBLE_EQ(train->info().mean[0], 0.5071);
    EXPECT_DOUBLE_EQ(train->info().std[1], 0.2564);
    ASSERT_EQ(train->size(), 4);
    ASSERT_EQ(test->size(), 2);
    for (int r = 0; r < 4; ++r) {
      EXPECT_EQ(train->label(r), (r * 7) % 100);
      check_cifar_sample(*train, r, r);
    }
    EXPECT_EQ(test->label(1), 77);
    check_cifar_sample(*test, 1, 11);
  }
}

TEST(DataCifar, BadOrMissingFilesAreNamed) {
  TempDir dir("aq-test-data");
  auto bytes = cifar_records(0, 2, false);
  bytes.resize(bytes.size() - 5);
  write_bytes(dir / "test_batch.bin", bytes);
  expect_error<std::runtime_error>([&] { aq::data::open("cifar10", dir.str(), Split::kTest); },
                                   {"test_batch.bin", "3073"});
  expect_error<std::runtime_error>([&] { aq::data::open("cifar10", dir.str(), Split::kTrain); },
                                   {"data_batch_1.bin", "cifar-10-batches-bin"});
  write_bytes(dir / "data_batch_1.bin", cifar_records(0, 1, false));
  expect_error<std::runtime_error>([&] { aq::data::open("cifar10", dir.str(), Split::kTrain); }, {"data_batch_2.bin"});
  write_bytes(dir / "train.bin", cifar_records(0, 1, false));  // CIFAR-10 records: not a multiple of 3074
  expect_error<std::runtime_error>([&] { aq::data::open("cifar100", dir.str(), Split::kTrain); },
                                   {"train.bin", "3074"});
  expect_error<std::runtime_error>([&] { aq::data::open("cifar100", dir.str(), Split::kTest); },
                                   {"test.bin", "cifar-100-binary"});
}

TEST(DataCifar, TrainAugmentationShiftsAndFlips) {
  TempDir dir("aq-test-data");
  write_bytes(dir / "test_batch.bin", cifar_records(0, 1, false));
  auto ds = aq::data::open("cifar10", dir.str(), Split::kTest);
  const auto& info = ds->info();
  int flips = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    const auto x = get(*ds, 0, true, seed);
    int matches = 0;
    for (int flip = 0; flip < 2; ++flip)
      for (int dy = -4; dy <= 4; ++dy)
        for (int dx = -4; dx <= 4; ++dx) {
          bool same = true;
          for (int c = 0; c < 3 && same; ++c)
            for (int y = 0; y < 32 && same; ++y)
              for (int xx = 0; xx < 32 && same; ++xx) {
                const int sy = y + dy, sx = (flip ? 31 - xx : xx) + dx;
                const uint8_t v = sy >= 0 && sy < 32 && sx >= 0 && sx < 32 ? cifar_pixel(0, c, sy * 32 + sx) : 0;
                same = x[(c * 32 + y) * 32 + xx] == norm(v, info.mean[c], info.std[c]);
              }
          if (same) matches++, flips += flip;
        }
    EXPECT_EQ(matches, 1) << "seed " << seed;
  }
  EXPECT_GT(flips, 5);
  EXPECT_LT(flips, 35);
}

// --- JPEG folders ---------------------------------------------------------------

// A JPEG of `w` x `h`, RGB (or grayscale when components == 1) given by
// colour(x, y) -> {r, g, b}.
template <class Colour>
void write_jpeg(const fs::path& path, int w, int h, int components, Colour colour) {
  make_dirs(path.parent_path());
  FILE* f = std::fopen(path.string().c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = w;
  c.image_height = h;
  c.input_components = components;
  c.in_color_space = components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 95, TRUE);
  jpeg_start_compress(&c, TRUE);
  std::vector<uint8_t> row(size_t(w) * components);
  while (c.next_scanline < c.image_height) {
    for (int x = 0; x < w; ++x) {
      const std::array<int, 3> rgb = colour(x, static_cast<int>(c.next_scanline));
      for (int k = 0; k < components; ++k) row[x * components + k] = static_cast<uint8_t>(rgb[k]);
    }
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
}

void write_solid(const fs::path& path, int w, int h, std::array<int, 3> rgb, int components = 3) {
  write_jpeg(path, w, h, components, [&](int, int) { return rgb; });
}

const std::array<int, 3> kRed = {200, 30, 40}, kBlue = {20, 40, 220}, kGrey = {128, 128, 128};

// Every pixel of channel-major `x` (3 x n) is about `rgb` after normalisation.
void expect_colour(const std::vector<float>& x, const aq::data::Info& info, std::array<int, 3> rgb, const char* what) {
  const size_t n = x.size() / 3;
  for (int c = 0; c < 3; ++c) {
    const double want = (rgb[c] / 255.0 - info.mean[c]) / info.std[c], tol = 5.0 / 255.0 / info.std[c];
    for (size_t i = 0; i < n; ++i) ASSERT_NEAR(x[c * n + i], want, tol) << what << " channel " << c << " pixel " << i;
  }
}

TEST(DataFolder, ClassesLabelsShapesAndColours) {
  TempDir dir("aq-test-data");
  write_solid(dir / "train/cat/a.jpg", 40, 30, kRed);
  write_solid(dir / "train/cat/b.JPEG", 24, 50, kGrey, 1);  // grayscale
  write_solid(dir / "train/dog/c.jpeg", 300, 200, kBlue);   // decoded at a reduced scale
  write_bytes(dir / "train/dog/notes.txt", {'h', 'i'});
  write_solid(dir / "val/cat/v1.jpg", 32, 32, kRed);
  write_solid(dir / "val/dog/v2.jpg", 33, 20, kBlue);
  aq::data::OpenOptions o;
  o.image_size = 16;
  auto train = aq::data::open("imagenet", dir.str(), Split::kTrain, o);
  auto val = aq::data::open("imagenet", dir.str(), Split::kTest, o);
  const auto& info = train->info();
  EXPECT_EQ(info.name, "imagenet");
  EXPECT_EQ(info.channels, 3);
  EXPECT_EQ(info.height, 16);
  EXPECT_EQ(info.width, 16);
  EXPECT_EQ(info.num_classes, 2);
  EXPECT_DOUBLE_EQ(info.mean[0], 0.485);
  EXPECT_DOUBLE_EQ(info.std[2], 0.225);
  ASSERT_EQ(train->size(), 3);
  ASSERT_EQ(val->size(), 2);
  EXPECT_EQ(val->info().num_classes, 2);
  EXPECT_EQ(train->label(0), 0);
  EXPECT_EQ(train->label(1), 0);
  EXPECT_EQ(train->label(2), 1);
  EXPECT_EQ(val->label(0), 0);
  EXPECT_EQ(val->label(1), 1);
  const std::array<int, 3> colours[] = {kRed, kGrey, kBlue};
  for (int i = 0; i < 3; ++i) {
    auto x = get(*train, i, false, 0);
    ASSERT_EQ(x.size(), 3u * 16 * 16);
    expect_colour(x, info, colours[i], "eval");
    for (uint64_t seed = 0; seed < 5; ++seed) {
      x = get(*train, i, true, seed);  // RandomResizedCrop of a solid image: same colour, 16 x 16
      expect_colour(x, info, colours[i], "train");
      EXPECT_EQ(x, get(*train, i, true, seed));
    }
  }
  expect_colour(get(*val, 0, false, 0), info, kRed, "val");
  expect_colour(get(*val, 1, false, 0), info, kBlue, "val");
}

TEST(DataFolder, EvalResizesAndCropsTheCentre) {
  TempDir dir("aq-test-data");
  // Left half red, right half blue: the centre crop keeps both halves in place.
  write_jpeg(dir / "train/a/halves.jpg", 64, 32, 3, [](int x, int) { return x < 32 ? kRed : kBlue; });
  // A horizontal ramp, decoded at a quarter of its size.
  write_jpeg(dir / "train/b/ramp.jpg", 256, 128, 3, [](int x, int) { return std::array<int, 3>{x, 0, 0}; });
  make_dirs(dir / "val");
  aq::data::OpenOptions o;
  o.image_size = 16;
  auto ds = aq::data::open("imagenet", dir.str(), Split::kTrain, o);
  const auto& info = ds->info();
  const auto x = get(*ds, 0, false, 0);
  auto red = [&](const std::vector<float>& v, int y, int xx) { return v[y * 16 + xx] * info.std[0] + info.mean[0]; };
  for (int y : {0, 8, 15}) {
    EXPECT_NEAR(red(x, y, 2), kRed[0] / 255.0, 0.03);
    EXPECT_NEAR(red(x, y, 13), kBlue[0] / 255.0, 0.03);
  }
  // Shorter side 128 -> round(16 * 256 / 224) = 18, so 256 x 128 -> 36 x 18; the
  // crop starts at column 10 of 36, and output column i is centred on source
  // coordinate u = (10 + i + 0.5) * 256 / 36, where the ramp is u - 0.5.
  const auto r = get(*ds, 1, false, 0);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(red(r, 8, i), ((10 + i + 0.5) * 256.0 / 36.0 - 0.5) / 255.0, 4.0 / 255) << i;
  // Training crops flip the halves about half of the time.
  int flipped = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    const auto t = get(*ds, 1, true, seed);
    flipped += red(t, 8, 0) > red(t, 8, 15);
  }
  EXPECT_GT(flipped, 5);
  EXPECT_LT(flipped, 35);
}

TEST(DataFolder, CorruptAndTruncatedJpegsAreNamed) {
  TempDir dir("aq-test-data");
  write_solid(dir / "train/a/good.jpg", 40, 40, kRed);
  write_bytes(dir / "train/a/garbage.jpg", {'n', 'o', 't', ' ', 'a', ' ', 'j', 'p', 'e', 'g', 0, 1, 2});
  write_jpeg(dir / "train/b/full.jpg", 64, 64, 3, [](int x, int y) { return std::array<int, 3>{x * 4, y * 4, 99}; });
  std::ifstream in(dir / "train/b/full.jpg", std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  bytes.resize(bytes.size() / 2);
  write_bytes(dir / "train/b/half.jpg", bytes);
  write_bytes(dir / "train/b/empty.jpg", {});
  make_dirs(dir / "val");
  aq::data::OpenOptions o;
  o.image_size = 8;
  auto ds = aq::data::open("imagenet", dir.str(), Split::kTrain, o);
  ASSERT_EQ(ds->size(), 5);  // sorted: a/garbage, a/good, b/empty, b/full, b/half
  for (bool augment : {false, true}) {
    expect_error<std::runtime_error>([&] { get(*ds, 0, augment, 0); }, {"garbage.jpg"});
    EXPECT_NO_THROW(get(*ds, 1, augment, 0));
    expect_error<std::runtime_error>([&] { get(*ds, 2, augment, 0); }, {"empty.jpg"});
    EXPECT_NO_THROW(get(*ds, 3, augment, 0));
    expect_error<std::runtime_error>([&] { get(*ds, 4, augment, 0); }, {"half.jpg"});
  }
}

TEST(DataFolder, FolderErrors) {
  {
    TempDir dir("aq-test-data");  // no train folder
    expect_error<std::runtime_error>([&] { aq::data::open("imagenet", dir.str(), Split::kTrain); }, {"train"});
  }
  {
    TempDir dir("aq-test-data");  // no class folders
    make_dirs(dir / "train");
    make_dirs(dir / "val");
    expect_error<std::runtime_error>([&] { aq::data::open("imagenet", dir.str(), Split::kTrain); },
                                     {(dir / "train").string()});
  }
  {
    TempDir dir("aq-test-data");  // class folders without images
    make_dirs(dir / "train/a");
    make_dirs(dir / "val/a");
    expect_error<std::runtime_error>([&] { aq::data::open("imagenet", dir.str(), Split::kTest); },
                                     {(dir / "val").string()});
  }
  {
    TempDir dir("aq-test-data");  // a validation class that training does not have
    write_solid(dir / "train/cat/a.jpg", 8, 8, kRed);
    write_solid(dir / "val/bird/b.jpg", 8, 8, kRed);
    EXPECT_NO_THROW(aq::data::open("imagenet", dir.str(), Split::kTrain));
    expect_error<std::runtime_error>([&] { aq::data::open("imagenet", dir.str(), Split::kTest); }, {"bird", "b.jpg"});
  }
  EXPECT_THROW(aq::data::open("imagenet", "", Split::kTrain), std::runtime_error);
}

// A JPEG of 4-channel ink (CMYK, or YCCK when `ycck`) as libjpeg writes it:
// with an Adobe marker, the bytes given stored as they are (Adobe's
// convention, which PIL assumes: 255 - ink).
void write_cmyk_jpeg(const fs::path& path, int w, int h, std::array<int, 4> stored, bool ycck) {
  make_dirs(path.parent_path());
  FILE* f = std::fopen(path.string().c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = w;
  c.image_height = h;
  c.input_components = 4;
  c.in_color_space = JCS_CMYK;
  jpeg_set_defaults(&c);
  jpeg_set_colorspace(&c, ycck ? JCS_YCCK : JCS_CMYK);
  jpeg_set_quality(&c, 100, TRUE);
  jpeg_start_compress(&c, TRUE);
  std::vector<uint8_t> row(size_t(w) * 4);
  for (int x = 0; x < w; ++x)
    for (int k = 0; k < 4; ++k) row[x * 4 + k] = static_cast<uint8_t>(stored[k]);
  while (c.next_scanline < c.image_height) {
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
}

// A PNG through libpng: `colour_type` PNG_COLOR_TYPE_*, `depth` 8 or 16,
// every pixel the samples `px` (in the file's channel order, at its depth).
void write_png(const fs::path& path, int w, int h, int colour_type, int depth, const std::vector<int>& px,
               const std::vector<png_color>& palette = {}) {
  make_dirs(path.parent_path());
  FILE* f = std::fopen(path.string().c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_init_io(png, f);
  png_set_IHDR(png, info, w, h, depth, colour_type, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (!palette.empty()) png_set_PLTE(png, info, palette.data(), static_cast<int>(palette.size()));
  png_write_info(png, info);
  const size_t bytes = depth / 8, n = px.size();
  std::vector<uint8_t> row(size_t(w) * n * bytes);
  for (int x = 0; x < w; ++x)
    for (size_t k = 0; k < n; ++k) {
      uint8_t* p = row.data() + (x * n + k) * bytes;
      if (bytes == 2) {
        p[0] = static_cast<uint8_t>(px[k] >> 8);
        p[1] = static_cast<uint8_t>(px[k] & 255);
      } else {
        p[0] = static_cast<uint8_t>(px[k]);
      }
    }
  for (int y = 0; y < h; ++y) png_write_row(png, row.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(f);
}

// PIL's CMYK to RGB of Adobe-stored samples (Pillow's cmyk2rgb, MULDIV255).
std::array<int, 3> pil_cmyk(std::array<int, 4> stored) {
  const int nk = stored[3];  // 255 - k
  std::array<int, 3> rgb{};
  for (int c = 0; c < 3; ++c) {
    const int ink = 255 - stored[c], t = ink * nk + 128;
    rgb[c] = nk - (((t >> 8) + t) >> 8);
  }
  return rgb;
}

TEST(DataFolder, DecodesByContentEveryColourSpace) {
  TempDir dir("aq-test-data");
  const std::array<int, 4> stored = {255, 127, 0, 191};  // ink 0, 128, 255, k 64
  write_cmyk_jpeg(dir / "train/a/cmyk.JPEG", 24, 24, stored, false);
  write_cmyk_jpeg(dir / "train/a/ycck.jpg", 24, 24, stored, true);
  write_png(dir / "train/a/png_named.JPEG", 20, 30, PNG_COLOR_TYPE_RGB, 8, {10, 200, 90});
  write_png(dir / "train/b/gray.png", 17, 17, PNG_COLOR_TYPE_GRAY, 8, {77});
  write_png(dir / "train/b/rgba16.png", 16, 16, PNG_COLOR_TYPE_RGB_ALPHA, 16, {0xc8ff, 0x1e00, 0x2801, 0x0000});
  write_png(dir / "train/b/palette.png", 16, 16, PNG_COLOR_TYPE_PALETTE, 8, {1}, {{0, 0, 0}, {20, 40, 220}});
  write_solid(dir / "train/c/gray.jpg", 20, 20, kGrey, 1);
  write_solid(dir / "train/c/rgb.png", 20, 20, kRed);  // a JPEG named .png
  make_dirs(dir / "val");
  aq::data::OpenOptions o;
  o.image_size = 8;
  auto ds = aq::data::open("imagenet", dir.str(), Split::kTrain, o);
  ASSERT_EQ(ds->size(), 8);  // sorted: a/cmyk, a/png_named, a/ycck, b/gray, b/palette, b/rgba16, c/gray, c/rgb
  const auto ink = pil_cmyk(stored);
  EXPECT_EQ(ink, (std::array<int, 3>{191, 95, 0}));
  const std::array<int, 3> want[] = {ink, {10, 200, 90}, ink, {77, 77, 77}, kBlue, {200, 30, 40}, kGrey, kRed};
  for (int i = 0; i < 8; ++i)
    for (bool augment : {false, true}) expect_colour(get(*ds, i, augment, 3), ds->info(), want[i], "decoded");
}

TEST(DataFolder, UnreadableImagesThrowBadImage) {
  TempDir dir("aq-test-data");
  write_bytes(dir / "train/a/gif.jpg", {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0});
  write_png(dir / "train/a/good.png", 8, 8, PNG_COLOR_TYPE_RGB, 8, {1, 2, 3});
  std::ifstream in(dir / "train/a/good.png", std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_bytes(dir / "train/a/short.png", std::vector<uint8_t>(bytes.begin(), bytes.begin() + bytes.size() - 20));
  bytes[40] ^= 0xff;  // in the image data: a CRC error
  write_bytes(dir / "train/a/crc.png", bytes);
  make_dirs(dir / "val");
  auto ds = aq::data::open("imagenet", dir.str(), Split::kTrain);
  ASSERT_EQ(ds->size(), 4);  // crc, gif, good, short
  expect_error<aq::data::BadImage>([&] { get(*ds, 0, false, 0); }, {"crc.png", "PNG"});
  expect_error<aq::data::BadImage>([&] { get(*ds, 1, false, 0); }, {"gif.jpg", "not a JPEG or PNG"});
  EXPECT_NO_THROW(get(*ds, 2, false, 0));
  expect_error<aq::data::BadImage>([&] { get(*ds, 3, true, 0); }, {"short.png"});
  const auto r = aq::data::check(*ds, 2);
  EXPECT_EQ(r.images, 4);
  ASSERT_EQ(r.bad.size(), 3u);
  EXPECT_EQ(r.bad[0].first, 0);
  EXPECT_EQ(r.bad[1].first, 1);
  EXPECT_EQ(r.bad[2].first, 3);
  EXPECT_NE(r.bad[2].second.find("short.png"), std::string::npos);
  EXPECT_EQ(aq::data::check(*ds, 0).bad, r.bad);
}

// --- Synthetic and open() ---------------------------------------------------------

TEST(DataSynthetic, DeterministicAndNormalised) {
  aq::data::OpenOptions o;
  o.synthetic_size = 50;
  o.synthetic_classes = 7;
  o.image_size = 32;
  auto a = aq::data::open("synthetic", "", Split::kTrain, o);
  auto b = aq::data::open("synthetic", "/nonexistent", Split::kTrain, o);
  auto t = aq::data::open("synthetic", "", Split::kTest, o);
  EXPECT_EQ(a->size(), 50);
  EXPECT_EQ(t->size(), 5);
  o.synthetic_size = 3;
  EXPECT_EQ(aq::data::open("synthetic", "", Split::kTest, o)->size(), 1);
  EXPECT_EQ(a->info().channels, 3);
  EXPECT_EQ(a->info().height, 32);
  EXPECT_EQ(a->info().num_classes, 7);
  std::set<int64_t> labels;
  for (int64_t i = 0; i < 50; ++i) {
    EXPECT_EQ(a->label(i), b->label(i));
    labels.insert(a->label(i));
  }
  EXPECT_GE(labels.size(), 5u);
  EXPECT_LT(*labels.rbegin(), 7);
  const auto x = get(*a, 3, true, 1);
  EXPECT_EQ(x, get(*b, 3, false, 2));
  EXPECT_NE(x, get(*a, 4, true, 1));
  EXPECT_NE(x, get(*t, 3, true, 1));
  double sum = 0, sq = 0;
  for (float v : x) sum += v, sq += double(v) * v;
  const double mean = sum / x.size(), sd = std::sqrt(sq / x.size() - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.1);
  EXPECT_NEAR(sd, 1.0, 0.1);
  o.synthetic_classes = 0;
  EXPECT_THROW(aq::data::open("synthetic", "", Split::kTrain, o), std::invalid_argument);
}

TEST(DataOpen, NamesAliasesAndUnknown) {
  const std::vector<std::string> want = {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "synthetic", "text"};
  EXPECT_EQ(aq::data::names(), want);
  EXPECT_EQ(aq::data::default_root("fmnist"), "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(aq::data::default_root("cifar10"), "");
  expect_error<std::invalid_argument>([] { aq::data::open("svhn", "/tmp", Split::kTrain); }, {"svhn"});
  EXPECT_THROW(aq::data::default_root("svhn"), std::invalid_argument);
}

// --- Loader ---------------------------------------------------------------------

// 1 x 2 x 2 samples: [index, a draw of the sample's rng, augment, 0]; label
// index % 3.  Throws for index `bad`; sleeps `delay` per sample.
class Toy : public aq::data::Dataset {
 public:
  explicit Toy(int64_t n, int64_t bad = -1, std::chrono::microseconds delay = {}) : n_(n), bad_(bad), delay_(delay) {
    info_.name = "toy";
    info_.channels = 1;
    info_.height = info_.width = 2;
    info_.num_classes = 3;
    info_.mean = {0};
    info_.std = {1};
  }
  const aq::data::Info& info() const override { return info_; }
  int64_t size() const override { return n_; }
  int64_t label(int64_t i) const override { return i % 3; }
  void get(int64_t i, bool augment, std::mt19937_64& rng, float* out) const override {
    if (i == bad_) throw std::runtime_error("toy: boom at " + std::to_string(i));
    if (delay_.count()) std::this_thread::sleep_for(delay_);
    out[0] = static_cast<float>(i);
    out[1] = static_cast<float>(rng() % 100000);
    out[2] = augment ? 1.0f : 0.0f;
    out[3] = 0;
  }

 private:
  int64_t n_, bad_;
  std::chrono::microseconds delay_;
  aq::data::Info info_;
};

std::vector<aq::data::Batch> epoch(aq::data::Loader& loader, int64_t e, int64_t first = 0) {
  loader.start(e, first);
  std::vector<aq::data::Batch> out;
  while (auto b = loader.next()) out.push_back(std::move(*b));
  return out;
}

bool same(const std::vector<aq::data::Batch>& a, const std::vector<aq::data::Batch>& b, size_t offset = 0) {
  if (a.size() != b.size() + offset) return false;
  for (size_t i = 0; i < b.size(); ++i)
    if (!torch::equal(a[i + offset].images, b[i].images) || !torch::equal(a[i + offset].labels, b[i].labels) ||
        !torch::equal(a[i + offset].indices, b[i].indices))
      return false;
  return true;
}

std::vector<int64_t> order(const std::vector<aq::data::Batch>& batches) {
  std::vector<int64_t> o;
  for (const auto& b : batches)
    for (int64_t i = 0; i < b.indices.size(0); ++i) o.push_back(b.indices[i].item<int64_t>());
  return o;
}

TEST(DataLoader, EveryIndexOncePerEpochWithMatchingLabels) {
  auto ds = std::make_shared<Toy>(103);
  aq::data::LoaderOptions o;
  o.batch_size = 10;
  o.seed = 7;
  aq::data::Loader loader(ds, o);
  EXPECT_EQ(loader.batches_per_epoch(), 11);
  EXPECT_EQ(loader.dataset().size(), 103);
  const auto batches = epoch(loader, 0);
  ASSERT_EQ(batches.size(), 11u);
  std::vector<int> seen(103, 0);
  for (size_t k = 0; k < batches.size(); ++k) {
    const auto& b = batches[k];
    const int64_t B = k < 10 ? 10 : 3;
    EXPECT_EQ(b.images.sizes().vec(), (std::vector<int64_t>{B, 1, 2, 2}));
    EXPECT_EQ(b.images.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(b.images.is_contiguous());
    EXPECT_EQ(b.labels.scalar_type(), torch::kInt64);
    EXPECT_EQ(b.indices.scalar_type(), torch::kInt64);
    ASSERT_EQ(b.labels.size(0), B);
    for (int64_t i = 0; i < B; ++i) {
      const int64_t idx = b.indices[i].item<int64_t>();
      seen.at(idx)++;
      EXPECT_EQ(b.labels[i].item<int64_t>(), idx % 3);
      EXPECT_EQ(b.images[i][0][0][0].item<float>(), static_cast<float>(idx));
      EXPECT_EQ(b.images[i][0][1][0].item<float>(), 1.0f);  // augment on by default
    }
  }
  for (int c : seen) EXPECT_EQ(c, 1);
  EXPECT_FALSE(loader.next().has_value());  // stays at the end
}

TEST(DataLoader, OrderDependsOnSeedAndEpochOnly) {
  auto ds = std::make_shared<Toy>(64);
  aq::data::LoaderOptions o;
  o.batch_size = 16;
  o.seed = 3;
  aq::data::Loader a(ds, o), b(ds, o);
  const auto a0 = epoch(a, 0), a1 = epoch(a, 1);
  epoch(b, 5);
  EXPECT_TRUE(same(epoch(b, 1), a1));  // whatever came before
  EXPECT_TRUE(same(epoch(b, 0), a0));
  EXPECT_NE(order(a0), order(a1));
  std::vector<int64_t> sorted = order(a0), identity(64);
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 64; ++i) identity[i] = i;
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(order(a0), identity);
  o.seed = 4;
  aq::data::Loader c(ds, o);
  EXPECT_NE(order(epoch(c, 0)), order(a0));
  // Without shuffling: identity, but the augmentation still changes per epoch.
  o.shuffle = false;
  aq::data::Loader d(ds, o);
  const auto d0 = epoch(d, 0), d1 = epoch(d, 1);
  EXPECT_EQ(order(d0), identity);
  EXPECT_EQ(order(d1), identity);
  EXPECT_FALSE(torch::equal(d0[0].images, d1[0].images));
  // Augmentation off reaches the dataset.
  o.augment = false;
  aq::data::Loader e(ds, o);
  EXPECT_EQ(epoch(e, 0)[0].images[0][0][1][0].item<float>(), 0.0f);
}

TEST(DataLoader, WorkersGiveTheSameBytes) {
  TempDir dir("aq-test-data");
  write_mnist_split(dir, "train", 50, true);
  auto ds = aq::data::open("fashion-mnist", dir.str(), Split::kTrain);
  aq::data::LoaderOptions o;
  o.batch_size = 8;
  o.seed = 11;
  aq::data::Loader inline_loader(ds, o);
  o.workers = 3;
  aq::data::Loader threaded(ds, o);
  for (int64_t e : {0, 1, 2}) {
    const auto a = epoch(inline_loader, e), b = epoch(threaded, e);
    ASSERT_EQ(a.size(), 7u);
    EXPECT_TRUE(same(a, b)) << "epoch " << e;
    EXPECT_EQ(a[6].images.size(0), 2);
  }
}

TEST(DataLoader, StartAtABatchGivesTheTailOfTheEpoch) {
  auto ds = std::make_shared<Toy>(95);
  for (int workers : {0, 2}) {
    aq::data::LoaderOptions o;
    o.batch_size = 10;
    o.seed = 21;
    o.workers = workers;
    aq::data::Loader loader(ds, o);
    const auto full = epoch(loader, 4);
    ASSERT_EQ(full.size(), 10u);
    for (int64_t k : {0, 1, 7, 9, 10}) EXPECT_TRUE(same(full, epoch(loader, 4, k), k)) << workers << " " << k;
    EXPECT_THROW(loader.start(4, 11), std::invalid_argument);
    EXPECT_THROW(loader.start(-1, 0), std::invalid_argument);
    // Restart mid-epoch, with batches in flight.
    loader.start(2);
    ASSERT_TRUE(loader.next().has_value());
    ASSERT_TRUE(loader.next().has_value());
    loader.start(4, 3);
    std::vector<aq::data::Batch> tail;
    while (auto b = loader.next()) tail.push_back(std::move(*b));
    EXPECT_TRUE(same(full, tail, 3)) << workers;
  }
}

TEST(DataLoader, NextWithoutStartBeginsEpochZero) {
  auto ds = std::make_shared<Toy>(20);
  aq::data::LoaderOptions o;
  o.batch_size = 6;
  o.workers = 1;
  aq::data::Loader a(ds, o), b(ds, o);
  std::vector<aq::data::Batch> got;
  while (auto x = a.next()) got.push_back(std::move(*x));
  EXPECT_TRUE(same(got, epoch(b, 0)));
}

TEST(DataLoader, DropLastAndBatchSize) {
  auto ds = std::make_shared<Toy>(103);
  aq::data::LoaderOptions o;
  o.batch_size = 10;
  o.drop_last = true;
  aq::data::Loader loader(ds, o);
  EXPECT_EQ(loader.batches_per_epoch(), 10);
  const auto batches = epoch(loader, 0);
  ASSERT_EQ(batches.size(), 10u);
  for (const auto& b : batches) EXPECT_EQ(b.images.size(0), 10);
  o.batch_size = 200;
  aq::data::Loader none(ds, o);
  EXPECT_EQ(none.batches_per_epoch(), 0);
  EXPECT_TRUE(epoch(none, 0).empty());
  o.drop_last = false;
  aq::data::Loader one(ds, o);
  EXPECT_EQ(one.batches_per_epoch(), 1);
  EXPECT_EQ(epoch(one, 0).at(0).images.size(0), 103);
  o.batch_size = 0;
  EXPECT_THROW(aq::data::Loader(ds, o), std::invalid_argument);
  o.batch_size = -3;
  EXPECT_THROW(aq::data::Loader(ds, o), std::invalid_argument);
}

TEST(DataLoader, WorkerExceptionSurfacesFromNext) {
  auto ds = std::make_shared<Toy>(60, 37);
  for (int workers : {0, 1, 3}) {
    aq::data::LoaderOptions o;
    o.batch_size = 10;
    o.shuffle = false;
    o.workers = workers;
    aq::data::Loader loader(ds, o);
    loader.start(0);
    for (int k = 0; k < 3; ++k) ASSERT_TRUE(loader.next().has_value()) << workers;
    expect_error<std::runtime_error>([&] { loader.next(); }, {"boom at 37"});
    auto after = loader.next();  // the epoch goes on
    ASSERT_TRUE(after.has_value());
    EXPECT_EQ(after->indices[0].item<int64_t>(), 40);
  }
}

// Toy whose samples in `bad` throw BadImage.
class BadToy : public Toy {
 public:
  BadToy(int64_t n, std::set<int64_t> bad) : Toy(n), bad_(std::move(bad)) {}
  void get(int64_t i, bool augment, std::mt19937_64& rng, float* out) const override {
    if (bad_.count(i)) throw aq::data::BadImage("toy" + std::to_string(i) + ".jpg: cannot decode");
    Toy::get(i, augment, rng, out);
  }

 private:
  std::set<int64_t> bad_;
};

TEST(DataLoader, BadImagesAreSkippedAndCountedOrFail) {
  // Batch 1 (10..19) loses two samples, batch 2 (20..29) all of them.
  std::set<int64_t> bad = {12, 17};
  for (int64_t i = 20; i < 30; ++i) bad.insert(i);
  auto ds = std::make_shared<BadToy>(40, bad);
  for (int workers : {0, 2}) {
    aq::data::LoaderOptions o;
    o.batch_size = 10;
    o.shuffle = false;
    o.workers = workers;
    o.bad_images = aq::data::BadImages::kSkip;
    aq::data::Loader loader(ds, o);
    loader.start(0);
    std::vector<int64_t> sizes, seen;
    while (auto b = loader.next()) {
      sizes.push_back(b->labels.size(0));
      ASSERT_EQ(b->images.size(0), b->labels.size(0));
      for (int64_t k = 0; k < b->indices.size(0); ++k) {
        const int64_t i = b->indices[k].item<int64_t>();
        seen.push_back(i);
        EXPECT_EQ(b->labels[k].item<int64_t>(), i % 3);
        EXPECT_EQ(b->images[k][0][0][0].item<float>(), static_cast<float>(i));
      }
    }
    EXPECT_EQ(sizes, (std::vector<int64_t>{10, 8, 10})) << workers;  // the empty batch passed over
    EXPECT_EQ(seen.size(), 28u);
    EXPECT_EQ(loader.skipped(), 12);
    const auto messages = loader.take_skipped();
    ASSERT_EQ(messages.size(), 12u);
    EXPECT_EQ(messages[0], "toy12.jpg: cannot decode");
    EXPECT_TRUE(loader.take_skipped().empty());
    loader.start(1);
    EXPECT_EQ(loader.skipped(), 0);

    o.bad_images = aq::data::BadImages::kFail;
    aq::data::Loader strict(ds, o);
    strict.start(0);
    ASSERT_TRUE(strict.next().has_value());
    expect_error<aq::data::BadImage>([&] { strict.next(); }, {"toy12.jpg"});
  }
  EXPECT_EQ(aq::data::parse_bad_images("skip"), aq::data::BadImages::kSkip);
  EXPECT_THROW(aq::data::parse_bad_images("ignore"), std::invalid_argument);
}

TEST(DataLoader, DestroyOrRestartWhileWorkersAreBusy) {
  auto ds = std::make_shared<Toy>(400, -1, std::chrono::microseconds(200));
  aq::data::LoaderOptions o;
  o.batch_size = 8;
  o.workers = 3;
  const auto t0 = std::chrono::steady_clock::now();
  {
    aq::data::Loader loader(ds, o);
    loader.start(0);
    ASSERT_TRUE(loader.next().has_value());
    for (int e = 1; e < 20; ++e) loader.start(e, e % 5);  // cancels what is in flight each time
    auto b = loader.next();
    ASSERT_TRUE(b.has_value());
    aq::data::Loader check(ds, o);
    check.start(19, 4);
    EXPECT_TRUE(torch::equal(b->indices, check.next()->indices));
  }  // destroyed with batches in flight
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

TEST(DataLoader, PinMemoryWithoutCudaGivesPlainTensors) {
  auto ds = std::make_shared<Toy>(10);
  aq::data::LoaderOptions o;
  o.batch_size = 4;
  o.pin_memory = true;
  aq::data::Loader loader(ds, o);
  const auto b = epoch(loader, 0);
  ASSERT_EQ(b.size(), 3u);
  EXPECT_TRUE(b[0].images.device().is_cpu());
}

}  // namespace
