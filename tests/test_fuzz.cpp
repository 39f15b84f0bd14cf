// Readers of untrusted files under mutation: a checkpoint, a calibration
// file, Fashion-MNIST's IDX files, CIFAR binary batches and JPEG/PNG images
// (through an ImageNet-style folder), each mutated a few hundred to a few
// thousand times from a seed (bit flips, bytes set to 0x00/0xff, header
// fields set to extreme values, truncations, appended garbage).  Each read
// must load or throw one std::runtime_error / std::invalid_argument with a
// one-line message: no crash, no other exception, no huge allocation.  The
// mutations are seeded (AQ_FUZZ_SEED, default fixed), so a failure replays.
// scripts/test.sh also runs this file under AddressSanitizer and UBSan.
#include "aq/checkpoint.h"
#include "aq/data.h"
#include "temp_dir.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>  // before jpeglib.h, which uses FILE
#include <jpeglib.h>
#include <png.h>
#include <zlib.h>

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <fstream>
#include <algorithm>
#include <functional>
#include <iterator>
#include <map>
#include <random>
#include <stdexcept>
#include <string>

// The largest single allocation through operator new since it was last
// reset (the decoders' pixel buffers are vectors): a header's size field must
// not buy gigabytes.  Every non-aligned form is replaced, so that each delete
// matches its new (AddressSanitizer checks that).
std::atomic<size_t> g_largest{0};

// GCC warns of free() on memory from operator new, which these definitions
// make malloc's.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(size_t n) {
  size_t seen = g_largest.load(std::memory_order_relaxed);
  while (n > seen && !g_largest.compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  try {
    return operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

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
  TempDir tmp_{"aq-fuzz"};
  const std::string dir_ = tmp_.str();
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

// Both IDX headers claim 2^31 - 1 images of 4096 x 4096 in files of a few
// bytes: a truncation error, not 32 PiB (or 3 GB for 28 x 28) allocated first.
TEST_F(Fuzz, IdxCountsBuyNoMemory) {
  const std::string data = dir_ + "/big";
  ::mkdir(data.c_str(), 0777);
  auto be32 = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
  };
  for (uint32_t side : {28u, 4096u}) {
    write_bytes(data + "/t10k-images-idx3-ubyte", be32(0x803) + be32(0x7fffffff) + be32(side) + be32(side) + "pixels");
    write_bytes(data + "/t10k-labels-idx1-ubyte", be32(0x801) + be32(0x7fffffff) + std::string(100000, '\1'));
    g_largest = 0;
    try {
      aq::data::open("fashion-mnist", data, aq::data::Split::kTest);
      ADD_FAILURE() << "opened";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
    }
    EXPECT_LT(g_largest.load(), size_t{128} << 20) << side;
  }
}

// --- CIFAR binary batches ------------------------------------------------------

// CIFAR-10's test batch (24 records) and CIFAR-100's (16 records); the
// mutations hit labels, record boundaries and the length (truncation,
// appended bytes).
TEST_F(Fuzz, CifarReader) {
  std::mt19937_64 rng(fuzz_seed() + 2);
  int loaded = 0, refused = 0;
  for (bool c100 : {false, true}) {
    const std::string data = dir_ + (c100 ? "/c100" : "/c10"), file = data + (c100 ? "/test.bin" : "/test_batch.bin");
    ::mkdir(data.c_str(), 0777);
    const size_t label_bytes = c100 ? 2 : 1, record = label_bytes + 3072, n = c100 ? 16 : 24;
    std::string seed_bytes;
    std::vector<size_t> fields;
    for (size_t i = 0; i < n; ++i) {
      fields.push_back(seed_bytes.size());
      for (size_t k = 0; k < label_bytes; ++k) seed_bytes += static_cast<char>(rng() % (c100 ? 100 : 10));
      for (size_t k = 0; k < 3072; ++k) seed_bytes += static_cast<char>(rng());
    }
    ASSERT_EQ(seed_bytes.size(), n * record);
    for (int i = 0; i < 500; ++i) {
      write_bytes(file, mutate(seed_bytes, rng, fields));
      expect_clean(
          [&] {
            const auto ds = aq::data::open(c100 ? "cifar100" : "cifar10", data, aq::data::Split::kTest);
            std::vector<float> out(3 * 32 * 32);
            std::mt19937_64 r(1);
            for (int64_t k = 0; k < ds->size(); ++k) {
              ds->get(k, k % 2 == 0, r, out.data());
              const int64_t l = ds->label(k);
              if (l < 0 || l >= ds->info().num_classes) ADD_FAILURE() << "label " << l << " of record " << k;
            }
          },
          loaded, refused, std::string(c100 ? "cifar100" : "cifar10") + " mutation " + std::to_string(i));
    }
  }
  EXPECT_GT(refused, 100);
  EXPECT_GT(loaded, 100);
}

// --- JPEG and PNG ----------------------------------------------------------------

// The fixtures of tests/fixtures/images (every JPEG colour space, PNG gray
// and RGBA) and two written here: a progressive JPEG and an interlaced
// 16-bit palette-free PNG.
std::string progressive_jpeg(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return {};
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = 37;
  c.image_height = 21;
  c.input_components = 3;
  c.in_color_space = JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  std::vector<uint8_t> row(37 * 3);
  while (c.next_scanline < c.image_height) {
    for (int x = 0; x < 37 * 3; ++x) row[x] = static_cast<uint8_t>(x * 7 + c.next_scanline * 11);
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
  return read_bytes(path);
}

std::string interlaced_png(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return {};
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(png);
  png_init_io(png, f);
  png_set_IHDR(png, info, 19, 13, 16, PNG_COLOR_TYPE_RGB_ALPHA, PNG_INTERLACE_ADAM7, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  std::vector<uint8_t> img(13 * 19 * 8);
  for (size_t i = 0; i < img.size(); ++i) img[i] = static_cast<uint8_t>(i * 13);
  std::vector<png_bytep> rows(13);
  for (int y = 0; y < 13; ++y) rows[y] = img.data() + size_t(y) * 19 * 8;
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  std::fclose(f);
  return read_bytes(path);
}

// JPEG: the two bytes after every marker (segment lengths) and the SOF's
// height and width; PNG: every chunk's length and type, IHDR's fields.
std::vector<size_t> image_fields(const std::string& b) {
  std::vector<size_t> out;
  if (b.size() > 2 && static_cast<unsigned char>(b[0]) == 0xff) {
    for (size_t i = 0; i + 1 < b.size(); ++i) {
      const auto m = static_cast<unsigned char>(b[i + 1]);
      if (static_cast<unsigned char>(b[i]) != 0xff || m == 0 || m == 0xff) continue;
      for (size_t k = 2; k < 10; ++k) out.push_back(i + k);
      if (m == 0xda) break;  // entropy-coded data follows
    }
  } else {
    for (size_t at = 8; at + 12 <= b.size();) {
      for (size_t k = 0; k < 8; ++k) out.push_back(at + k);
      if (b.compare(at + 4, 4, "IHDR") == 0)
        for (size_t k = 8; k < 21; ++k) out.push_back(at + k);
      const uint32_t len = (uint32_t(static_cast<unsigned char>(b[at])) << 24) |
                           (uint32_t(static_cast<unsigned char>(b[at + 1])) << 16) |
                           (uint32_t(static_cast<unsigned char>(b[at + 2])) << 8) | static_cast<unsigned char>(b[at + 3]);
      at += size_t{len} + 12;
    }
  }
  return out;
}

// A PNG's chunk CRCs recomputed, so that a mutation reaches the decoder
// instead of libpng's CRC check.
std::string fix_png_crcs(std::string b) {
  for (size_t at = 8; at + 12 <= b.size();) {
    const uint32_t len = (uint32_t(static_cast<unsigned char>(b[at])) << 24) |
                         (uint32_t(static_cast<unsigned char>(b[at + 1])) << 16) |
                         (uint32_t(static_cast<unsigned char>(b[at + 2])) << 8) | static_cast<unsigned char>(b[at + 3]);
    if (len > b.size() - at - 12) break;
    const uint32_t crc = static_cast<uint32_t>(
        ::crc32(0, reinterpret_cast<const Bytef*>(b.data() + at + 4), static_cast<uInt>(len + 4)));
    for (int k = 0; k < 4; ++k) b[at + 8 + len + k] = static_cast<char>(crc >> (24 - 8 * k));
    at += size_t{len} + 12;
  }
  return b;
}

TEST_F(Fuzz, JpegAndPngDecoders) {
  const char* fixtures = std::getenv("AQ_IMAGE_FIXTURES");
  if (!fixtures || !*fixtures) GTEST_SKIP() << "AQ_IMAGE_FIXTURES is not set (tests/meson.build sets it)";
  std::vector<std::pair<std::string, std::string>> seeds;
  for (const char* f : {"rgb.jpg", "gray.jpg", "cmyk.jpg", "ycck.jpg", "gray.png", "rgba.png"}) {
    seeds.emplace_back(f, read_bytes(std::string(fixtures) + "/" + f));
    ASSERT_FALSE(seeds.back().second.empty()) << fixtures << "/" << f;
  }
  seeds.emplace_back("progressive.jpg", progressive_jpeg(dir_ + "/p.jpg"));
  seeds.emplace_back("interlaced.png", interlaced_png(dir_ + "/i.png"));
  for (const auto& s : seeds) ASSERT_FALSE(s.second.empty()) << s.first;

  const std::string image = dir_ + "/in/train/c/x.jpg";
  ::mkdir((dir_ + "/in").c_str(), 0777);
  ::mkdir((dir_ + "/in/train").c_str(), 0777);
  ::mkdir((dir_ + "/in/train/c").c_str(), 0777);
  ::mkdir((dir_ + "/in/val").c_str(), 0777);
  write_bytes(image, seeds[0].second);
  aq::data::OpenOptions options;
  options.image_size = 16;
  const auto ds = aq::data::open("imagenet", dir_ + "/in", aq::data::Split::kTrain, options);
  ASSERT_EQ(ds->size(), 1);
  std::vector<float> out(3 * 16 * 16);

  std::mt19937_64 rng(fuzz_seed() + 3);
  int loaded = 0, refused = 0;
  const int per_seed = 400;
  for (const auto& [name, bytes] : seeds) {
    const bool png = name.find(".png") != std::string::npos;
    const auto fields = image_fields(bytes);
    for (int i = 0; i < per_seed; ++i) {
      std::string m = mutate(bytes, rng, fields);
      if (png && rng() % 2) m = fix_png_crcs(m);
      write_bytes(image, m);
      g_largest = 0;
      expect_clean(
          [&] {
            std::mt19937_64 r(i);
            ds->get(0, i % 2 == 0, r, out.data());
            for (float v : out)
              if (!std::isfinite(v)) throw std::logic_error("non-finite pixel");
          },
          loaded, refused, name + " mutation " + std::to_string(i));
      EXPECT_LT(g_largest.load(), size_t{64} << 20) << name << " mutation " << i;
    }
  }
  EXPECT_GT(loaded, 200);
  EXPECT_GT(refused, 200);
}

// A header that claims a huge image is refused before its pixels are
// allocated: PIL's limit of 178956970 pixels, and a PNG cannot hold more
// pixel bytes than 1032 times its compressed size (deflate's best ratio).
TEST_F(Fuzz, HugeImageHeadersAreRefusedCheaply) {
  const char* fixtures = std::getenv("AQ_IMAGE_FIXTURES");
  if (!fixtures || !*fixtures) GTEST_SKIP() << "AQ_IMAGE_FIXTURES is not set";
  for (const char* dirs : {"/h", "/h/train", "/h/train/c", "/h/val"}) ::mkdir((dir_ + dirs).c_str(), 0777);
  const std::string image = dir_ + "/h/train/c/x.jpg";
  write_bytes(image, read_bytes(std::string(fixtures) + "/rgb.jpg"));
  const auto ds = aq::data::open("imagenet", dir_ + "/h", aq::data::Split::kTrain);
  std::vector<float> out(3 * 224 * 224);
  auto expect_refused = [&](const std::string& bytes, const std::string& want) {
    write_bytes(image, bytes);
    g_largest = 0;
    std::mt19937_64 r(1);
    try {
      ds->get(0, false, r, out.data());
      ADD_FAILURE() << "decoded: " << want;
    } catch (const aq::data::BadImage& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    EXPECT_LT(g_largest.load(), size_t{64} << 20) << want;
  };
  // JPEG: the SOF0 marker's height and width set to 60000 x 60000, then
  // 20000 x 8000 (under 65535 each, over the pixel limit together).
  std::string jpeg = read_bytes(std::string(fixtures) + "/rgb.jpg");
  const size_t sof = jpeg.find("\xff\xc0");
  ASSERT_NE(sof, std::string::npos);
  auto set16 = [](std::string& b, size_t at, unsigned v) {
    b[at] = static_cast<char>(v >> 8);
    b[at + 1] = static_cast<char>(v);
  };
  set16(jpeg, sof + 5, 60000);
  set16(jpeg, sof + 7, 60000);
  expect_refused(jpeg, "60000x60000");
  set16(jpeg, sof + 5, 9000);
  set16(jpeg, sof + 7, 20000);
  expect_refused(jpeg, "20000x9000");
  // 12000 x 12000 is under the limit but the file ends (without its end
  // marker) long before its pixels: an error, without a buffer of the whole
  // image first.
  set16(jpeg, sof + 5, 12000);
  set16(jpeg, sof + 7, 12000);
  expect_refused(jpeg.substr(0, jpeg.size() - 2), "x.jpg: cannot decode JPEG image");
  // PNG: IHDR's width and height set to 10000 x 10000 in a file of a few
  // hundred bytes.
  std::string png = read_bytes(std::string(fixtures) + "/rgba.png");
  for (size_t at : {16, 20}) {
    png[at] = 0;
    png[at + 1] = 0;
    set16(png, at + 2, 10000);
  }
  expect_refused(fix_png_crcs(png), "10000x10000");
}

// --- ImageNet folders -----------------------------------------------------------

// Folder edge cases: each opens with the images it can use or is one error;
// each unusable file is a BadImage naming it.
TEST_F(Fuzz, FolderEdgeCases) {
  const char* fixtures = std::getenv("AQ_IMAGE_FIXTURES");
  if (!fixtures || !*fixtures) GTEST_SKIP() << "AQ_IMAGE_FIXTURES is not set";
  const std::string jpg = read_bytes(std::string(fixtures) + "/rgb.jpg");
  const std::string root = dir_ + "/f";
  for (const char* d : {"", "/train", "/train/a", "/train/empty", "/train/b", "/train/b/dir.jpg", "/val", "/val/a",
                        "/val/empty", "/val/b"})
    ::mkdir((root + d).c_str(), 0777);
  write_bytes(root + "/train/a/good.jpg", jpg);
  write_bytes(root + "/train/a/zero.jpg", "");
  write_bytes(root + "/train/b/dir.jpg/inner.JPG", jpg);  // a folder named like an image holds one
  write_bytes(root + "/train/b/locked.png", jpg);
  ::chmod((root + "/train/b/locked.png").c_str(), 0);
  ::mkfifo((root + "/train/b/fifo.jpg").c_str(), 0666);  // not a regular file: not listed, never opened
  ::symlink("nowhere.jpg", (root + "/train/b/dangling.jpg").c_str());
  write_bytes(root + "/val/a/v.jpg", jpg);

  const auto train = aq::data::open("imagenet", root, aq::data::Split::kTrain);
  EXPECT_EQ(train->info().num_classes, 3);  // a, b, empty: the class list is train/'s folders
  ASSERT_EQ(train->size(), 4);              // a/good, a/zero, b/dir.jpg/inner.JPG, b/locked.png
  std::vector<float> out(3 * 224 * 224);
  std::mt19937_64 r(1);
  const bool root_user = ::geteuid() == 0;
  for (int64_t i = 0; i < train->size(); ++i) {
    try {
      train->get(i, true, r, out.data());
      EXPECT_TRUE(i == 0 || i == 2 || (i == 3 && root_user)) << "sample " << i << " loaded";
    } catch (const aq::data::BadImage& e) {
      const std::string what = e.what();
      if (i == 1) EXPECT_NE(what.find("zero.jpg: empty file"), std::string::npos) << what;
      else if (i == 3) EXPECT_NE(what.find("locked.png: cannot open"), std::string::npos) << what;
      else ADD_FAILURE() << "sample " << i << ": " << what;
    }
  }
  const auto val = aq::data::open("imagenet", root, aq::data::Split::kTest);
  EXPECT_EQ(val->size(), 1);
  EXPECT_EQ(val->label(0), 0);

  // A class folder that cannot be listed: one error naming it.
  ::chmod((root + "/val/b").c_str(), 0);
  if (!root_user) {
    try {
      aq::data::open("imagenet", root, aq::data::Split::kTest);
      ADD_FAILURE() << "opened with an unlistable folder";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("val/b"), std::string::npos) << e.what();
    }
  }
  ::chmod((root + "/val/b").c_str(), 0777);
  ::chmod((root + "/train/b/locked.png").c_str(), 0644);
}

}  // namespace
