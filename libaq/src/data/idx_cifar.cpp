// The datasets held in memory as uint8 images: Fashion-MNIST and MNIST (IDX
// files, gzipped or not) and CIFAR-10/100 (their binary distribution).
#include "internal.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>

namespace aq::data {
using namespace detail;
namespace {

// uint8 images held in memory (N x C x H x W) with their labels; training
// augmentation is a random crop with zero padding, plus a horizontal flip
// where `flip`.
class InMemory final : public Dataset {
 public:
  InMemory(Info info, std::vector<uint8_t> pixels, std::vector<uint8_t> labels, int pad, bool flip)
      : info_(std::move(info)),
        pixels_(std::move(pixels)),
        labels_(std::move(labels)),
        pad_(pad),
        flip_(flip),
        norm_(info_) {}

  const Info& info() const override { return info_; }
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  int64_t label(int64_t index) const override { return labels_.at(check(index)); }

  void get(int64_t index, bool augment, std::mt19937_64& rng, float* out) const override {
    const int64_t C = info_.channels, H = info_.height, W = info_.width;
    const uint8_t* src = pixels_.data() + check(index) * C * H * W;
    int64_t dy = 0, dx = 0;
    bool flip = false;
    if (augment) {  // torchvision: RandomCrop(padding=pad), then RandomHorizontalFlip
      dy = below(rng, 2 * pad_ + 1) - pad_;
      dx = below(rng, 2 * pad_ + 1) - pad_;
      if (flip_) flip = coin(rng);
    }
    for (int64_t c = 0; c < C; ++c) {
      const auto& lut = norm_.lut[c];
      const uint8_t* plane = src + c * H * W;
      for (int64_t y = 0; y < H; ++y) {
        float* row = out + (c * H + y) * W;
        const int64_t sy = y + dy;
        if (sy < 0 || sy >= H) {
          std::fill(row, row + W, lut[0]);
          continue;
        }
        const uint8_t* srow = plane + sy * W;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t sx = (flip ? W - 1 - x : x) + dx;
          row[x] = lut[sx >= 0 && sx < W ? srow[sx] : 0];
        }
      }
    }
  }

 private:
  int64_t check(int64_t index) const {
    if (index < 0 || index >= size())
      bad_arg(info_.name + ": sample index " + std::to_string(index) + " out of range 0.." +
              std::to_string(size() - 1));
    return index;
  }

  Info info_;
  std::vector<uint8_t> pixels_, labels_;
  int pad_;
  bool flip_;
  Normalise norm_;
};

// A gzipped or plain file read through zlib.
class GzFile {
 public:
  GzFile(const std::string& name, const std::string& path) : name_(name), path_(path) {
    f_ = gzopen(path.c_str(), "rb");
    if (!f_) bad_file(name_ + ": " + path_ + ": cannot open: " + std::strerror(errno));
  }
  ~GzFile() { gzclose(f_); }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  // Reads exactly `n` bytes; `what` says what they are, for the error.
  void read(void* buf, size_t n, const std::string& what) { read_from(buf, n, 0, n, what); }

  // Reads exactly `n` bytes into a vector grown as they arrive, so that a
  // header's count buys no more memory than the file holds.
  std::vector<uint8_t> read_vector(size_t n, const std::string& what) {
    std::vector<uint8_t> out;
    constexpr size_t kChunk = size_t{64} << 20;
    while (out.size() < n) {
      const size_t have = out.size(), step = std::min(n - have, std::max(kChunk, have));
      out.resize(have + step);
      read_from(out.data() + have, step, have, n, what);
    }
    return out;
  }

  uint32_t read_u32(const std::string& what) {
    unsigned char b[4];
    read(b, 4, what);
    return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
  }

 private:
  // Reads `n` bytes of `what`, of which `before` of `total` are read already.
  void read_from(void* buf, size_t n, size_t before, size_t total, const std::string& what) {
    auto* p = static_cast<char*>(buf);
    size_t got = 0;
    while (got < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - got, 1u << 30));
      const int r = gzread(f_, p + got, chunk);
      if (r < 0) {
        int code = 0;
        const char* msg = gzerror(f_, &code);
        bad_file(name_ + ": " + path_ + ": cannot read " + what + ": " + (msg ? msg : "zlib error"));
      }
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    if (got < n)
      bad_file(name_ + ": " + path_ + ": truncated: " + std::to_string(before + got) + " of the " +
               std::to_string(total) + " bytes of " + what);
  }

  std::string name_, path_;
  gzFile f_ = nullptr;
};

}  // namespace

std::shared_ptr<const Dataset> detail::open_idx(const std::string& name, const std::string& root, Split split) {
  const bool fashion = name == "fashion-mnist";
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  auto find = [&](const std::string& base) {
    for (const std::string& f : {base + ".gz", base})
      if (is_file(fs::path(root) / f)) return (fs::path(root) / f).string();
    bad_file(name + ": cannot find " + base + ".gz (or " + base + ") in " + root + "; " +
             (fashion ? "install Debian's dataset-fashion-mnist package or give" : "give") +
             " the folder that holds the IDX files");
  };
  const std::string ipath = find(prefix + "-images-idx3-ubyte");
  const std::string lpath = find(prefix + "-labels-idx1-ubyte");

  GzFile images(name, ipath);
  const uint32_t imagic = images.read_u32("the header");
  if (imagic != 2051)
    bad_file(name + ": " + ipath + ": bad magic number " + std::to_string(imagic) +
             " (expected 2051, an IDX file of uint8 images)");
  const uint32_t n = images.read_u32("the header"), rows = images.read_u32("the header"),
                 cols = images.read_u32("the header");
  if (rows == 0 || cols == 0 || rows > 4096 || cols > 4096)
    bad_file(name + ": " + ipath + ": bad image size " + std::to_string(rows) + "x" + std::to_string(cols));

  GzFile labels(name, lpath);
  const uint32_t lmagic = labels.read_u32("the header");
  if (lmagic != 2049)
    bad_file(name + ": " + lpath + ": bad magic number " + std::to_string(lmagic) +
             " (expected 2049, an IDX file of uint8 labels)");
  const uint32_t nl = labels.read_u32("the header");
  if (nl != n)
    bad_file(name + ": " + ipath + " holds " + std::to_string(n) + " images but " + lpath + " holds " +
             std::to_string(nl) + " labels");
  if (n == 0) bad_file(name + ": " + ipath + ": holds no images");

  std::vector<uint8_t> lab = labels.read_vector(n, "labels");
  std::vector<uint8_t> pixels = images.read_vector(size_t{n} * rows * cols, "pixels");
  for (uint32_t i = 0; i < n; ++i)
    if (lab[i] >= 10)
      bad_file(name + ": " + lpath + ": label " + std::to_string(lab[i]) + " of sample " + std::to_string(i) +
               " is not in 0..9");

  Info info;
  info.name = name;
  info.channels = 1;
  info.height = rows;
  info.width = cols;
  info.num_classes = 10;
  info.mean = {fashion ? 0.2860 : 0.1307};
  info.std = {fashion ? 0.3530 : 0.3081};
  // Flipped digits change meaning: MNIST gets shifts only.
  return std::make_shared<InMemory>(std::move(info), std::move(pixels), std::move(lab), 4, fashion);
}

std::shared_ptr<const Dataset> detail::open_cifar(const std::string& name, const std::string& root, Split split) {
  const bool c100 = name == "cifar100";
  const std::string sub = c100 ? "cifar-100-binary" : "cifar-10-batches-bin";
  std::vector<std::string> files;
  if (c100) {
    files = {split == Split::kTrain ? "train.bin" : "test.bin"};
  } else if (split == Split::kTrain) {
    for (int i = 1; i <= 5; ++i) files.push_back("data_batch_" + std::to_string(i) + ".bin");
  } else {
    files = {"test_batch.bin"};
  }
  fs::path dir;
  for (const fs::path& d : {fs::path(root), fs::path(root) / sub})
    if (is_file(d / files[0])) {
      dir = d;
      break;
    }
  const std::string listed = files.size() > 1 ? files.front() + " .. " + files.back() : files[0];
  if (dir.empty())
    bad_file(name + ": cannot find " + listed + " in " + root + " or " + (fs::path(root) / sub).string() +
             "; give the folder of the unpacked binary version (" + (c100 ? "cifar-100-binary" : "cifar-10-binary") +
             ".tar.gz)");

  const size_t label_bytes = c100 ? 2 : 1, record = label_bytes + 3072;
  std::vector<uint8_t> pixels, labels;
  for (const std::string& f : files) {
    const std::string path = (dir / f).string();
    std::ifstream in(path, std::ios::binary);
    if (!in) bad_file(name + ": cannot open " + path + " (expected " + listed + " in " + dir.string() + ")");
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) bad_file(name + ": " + path + ": read error");
    if (bytes.empty() || bytes.size() % record != 0)
      bad_file(name + ": " + path + ": size " + std::to_string(bytes.size()) + " is not a positive multiple of " +
               std::to_string(record) + " bytes (one record: " + (c100 ? "coarse and fine label" : "label") +
               ", 3x32x32 pixels)");
    const size_t n = bytes.size() / record;
    for (size_t i = 0; i < n; ++i) {
      const uint8_t* r = bytes.data() + i * record;
      const uint8_t l = r[label_bytes - 1];  // CIFAR-100: the fine label
      if (l >= (c100 ? 100 : 10))
        bad_file(name + ": " + path + ": label " + std::to_string(l) + " of record " + std::to_string(i) +
                 " is out of range");
      labels.push_back(l);
      pixels.insert(pixels.end(), r + label_bytes, r + record);
    }
  }
  Info info;
  info.name = name;
  info.channels = 3;
  info.height = info.width = 32;
  info.num_classes = c100 ? 100 : 10;
  if (c100) {
    info.mean = {0.5071, 0.4865, 0.4409};
    info.std = {0.2673, 0.2564, 0.2762};
  } else {
    info.mean = {0.4914, 0.4822, 0.4465};
    info.std = {0.2470, 0.2435, 0.2616};
  }
  return std::make_shared<InMemory>(std::move(info), std::move(pixels), std::move(labels), 4, true);
}

}  // namespace aq::data
