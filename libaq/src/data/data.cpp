// Datasets (IDX, CIFAR binary, JPEG folders, synthetic) and the batch loader.
#include "aq/data.h"

#include <torch/cuda.h>

#include <cstdio>  // before jpeglib.h, which uses FILE
#include <jpeglib.h>
#include <jerror.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cmath>
#include <condition_variable>
#include <cerrno>
#include <csetjmp>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

#include <dirent.h>
#include <sys/stat.h>

namespace aq::data {
namespace fs = std::filesystem;
namespace {

[[noreturn]] void bad_arg(const std::string& what) { throw std::invalid_argument(what); }
[[noreturn]] void bad_file(const std::string& what) { throw std::runtime_error(what); }

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// File-system queries go through POSIX: libtorch.so exports its own copies of
// some std::filesystem functions (status, remove_all, ...), which the dynamic
// linker may pick over libstdc++'s, and some of them crash.
bool is_file(const fs::path& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const fs::path& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Names in `dir` (following symbolic links) that are folders, resp. regular files; sorted.
void list_dir(const fs::path& dir, std::vector<std::string>* folders, std::vector<std::string>* files) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) bad_file("imagenet: cannot list " + dir.string() + ": " + std::strerror(errno));
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    if (folders && is_dir(dir / name)) folders->push_back(name);
    if (files && is_file(dir / name)) files->push_back(name);
  }
  ::closedir(d);
  if (folders) std::sort(folders->begin(), folders->end());
  if (files) std::sort(files->begin(), files->end());
}

// --- Random numbers -----------------------------------------------------------
// Our own mixing and draws (not std::*_distribution, whose output differs
// between standard libraries) so that batches are the same bytes everywhere.

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ (b * 0xd1342543de82ef95ULL + 1)); }
uint64_t mix(uint64_t a, uint64_t b, uint64_t c) { return mix(mix(a, b), c); }

double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
double uniform(std::mt19937_64& rng, double lo, double hi) { return lo + (hi - lo) * uniform01(rng); }
// In [0, n); n >= 1.  The modulo bias is below 2^-40 for the sizes used here.
int64_t below(std::mt19937_64& rng, int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); }
bool coin(std::mt19937_64& rng) { return (rng() >> 63) != 0; }

// Python's round(): halves to even (the default floating-point rounding mode).
int64_t round_even(double v) { return static_cast<int64_t>(std::nearbyint(v)); }

// --- Normalisation ------------------------------------------------------------

// out = (v / 255 - mean) / std, as v * scale + shift per channel.
struct Normalise {
  std::vector<float> scale, shift;
  std::vector<std::array<float, 256>> lut;  // of the uint8 values
  explicit Normalise(const Info& info) {
    for (size_t c = 0; c < info.mean.size(); ++c) {
      scale.push_back(static_cast<float>(1.0 / (255.0 * info.std[c])));
      shift.push_back(static_cast<float>(-info.mean[c] / info.std[c]));
      std::array<float, 256> t{};
      for (int v = 0; v < 256; ++v) t[v] = static_cast<float>((v / 255.0 - info.mean[c]) / info.std[c]);
      lut.push_back(t);
    }
  }
};

// --- In-memory datasets: IDX and CIFAR ----------------------------------------

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
  void read(void* buf, size_t n, const std::string& what) {
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
      bad_file(name_ + ": " + path_ + ": truncated: " + std::to_string(got) + " of the " + std::to_string(n) +
               " bytes of " + what);
  }

  uint32_t read_u32(const std::string& what) {
    unsigned char b[4];
    read(b, 4, what);
    return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
  }

 private:
  std::string name_, path_;
  gzFile f_ = nullptr;
};

std::shared_ptr<const Dataset> open_idx(const std::string& name, const std::string& root, Split split) {
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

  std::vector<uint8_t> pixels(size_t{n} * rows * cols), lab(n);
  images.read(pixels.data(), pixels.size(), "pixels");
  labels.read(lab.data(), lab.size(), "labels");
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

std::shared_ptr<const Dataset> open_cifar(const std::string& name, const std::string& root, Split split) {
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

// --- JPEG decoding ------------------------------------------------------------

struct JpegErrors {
  jpeg_error_mgr pub;  // first: libjpeg sees a jpeg_error_mgr*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

// libjpeg's default calls exit(); we jump back into the caller instead.
void jpeg_on_error(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<JpegErrors*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->message);
  std::longjmp(e->jump, 1);
}

// Warnings are silent (the library never prints), except a premature end of
// file: libjpeg would pad the image with grey, we fail like PIL does.
void jpeg_on_message(j_common_ptr cinfo, int level) {
  if (level < 0) {
    cinfo->err->num_warnings++;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_on_error(cinfo);
  }
}

// One JPEG file: header first, then a decode at a chosen scale to RGB.
// Every function that calls into libjpeg sets the jump target itself and
// holds no automatic objects with destructors past it.
class Jpeg {
 public:
  explicit Jpeg(const std::string& path) : path_(path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) bad_file(path + ": cannot open: " + std::strerror(errno));
    bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (in.bad()) bad_file(path + ": read error");
    if (bytes_.empty()) bad_file(path + ": empty file, not a JPEG image");
    cinfo_.err = jpeg_std_error(&err_.pub);
    err_.pub.error_exit = jpeg_on_error;
    err_.pub.emit_message = jpeg_on_message;
  }
  // Reads the header: width() and height() are then known.
  void open() {
    if (setjmp(err_.jump)) fail();
    jpeg_create_decompress(&cinfo_);
    created_ = true;
    jpeg_mem_src(&cinfo_, bytes_.data(), static_cast<unsigned long>(bytes_.size()));
    jpeg_read_header(&cinfo_, TRUE);
    switch (cinfo_.jpeg_color_space) {
      case JCS_GRAYSCALE:
      case JCS_YCbCr:
      case JCS_RGB: break;
      case JCS_CMYK:
      case JCS_YCCK: unsupported("CMYK"); break;
      default: unsupported("unknown colour space"); break;
    }
    cinfo_.out_color_space = JCS_RGB;  // grayscale too: libjpeg replicates the channel
  }
  ~Jpeg() {
    if (created_) jpeg_destroy_decompress(&cinfo_);
  }
  Jpeg(const Jpeg&) = delete;
  Jpeg& operator=(const Jpeg&) = delete;

  int width() const { return static_cast<int>(cinfo_.image_width); }
  int height() const { return static_cast<int>(cinfo_.image_height); }

  // The smallest scale n/8 whose output still has at least `need_w` x `need_h`
  // pixels for each `region_w` x `region_h` pixels of the full image.
  int pick_scale(double region_w, double region_h, int need_w, int need_h) {
    if (setjmp(err_.jump)) fail();
    cinfo_.scale_denom = 8;
    for (int n = 1; n < 8; ++n) {
      cinfo_.scale_num = n;
      jpeg_calc_output_dimensions(&cinfo_);
      if (cinfo_.scale_num != static_cast<unsigned>(n)) continue;  // not supported by this libjpeg
      const double fx = static_cast<double>(cinfo_.output_width) / width();
      const double fy = static_cast<double>(cinfo_.output_height) / height();
      if (region_w * fx >= need_w - 1e-9 && region_h * fy >= need_h - 1e-9) return n;
    }
    return 8;
  }

  // Decodes at scale n/8 to HWC RGB in rgb(); out_width() x out_height().
  void decode(int n) {
    if (setjmp(err_.jump)) fail();
    cinfo_.scale_num = n;
    cinfo_.scale_denom = 8;
    cinfo_.out_color_space = JCS_RGB;
    jpeg_calc_output_dimensions(&cinfo_);
    rgb_.resize(size_t{cinfo_.output_width} * cinfo_.output_height * 3);
    jpeg_start_decompress(&cinfo_);
    if (cinfo_.output_components != 3) unsupported("output is not RGB");
    while (cinfo_.output_scanline < cinfo_.output_height) {
      JSAMPROW row = rgb_.data() + size_t{cinfo_.output_scanline} * cinfo_.output_width * 3;
      jpeg_read_scanlines(&cinfo_, &row, 1);
    }
    jpeg_abort_decompress(&cinfo_);  // all pixels are in; what follows them does not matter
  }
  int out_width() const { return static_cast<int>(cinfo_.output_width); }
  int out_height() const { return static_cast<int>(cinfo_.output_height); }
  const uint8_t* rgb() const { return rgb_.data(); }

 private:
  [[noreturn]] void fail() { throw std::runtime_error(path_ + ": cannot decode JPEG image: " + err_.message); }
  [[noreturn]] void unsupported(const char* what) {
    throw std::runtime_error(path_ + ": unsupported JPEG image (" + what + "); convert it to RGB or grayscale");
  }

  std::string path_;
  std::vector<unsigned char> bytes_;
  std::vector<uint8_t> rgb_;
  jpeg_decompress_struct cinfo_{};
  JpegErrors err_{};
  bool created_ = false;
};

// --- Resampling ---------------------------------------------------------------

// PIL's bilinear filter (a triangle widened by the downscale factor, so that
// shrinking averages instead of aliasing): for each output pixel, the first
// input pixel and the weights.
struct Taps {
  std::vector<int> first, count;
  std::vector<float> weights;  // out x stride
  int stride = 0;
};

Taps taps(int in_size, double start, double length, int out_size) {
  const double scale = length / out_size, fscale = std::max(scale, 1.0), support = fscale;
  Taps t;
  t.stride = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(size_t(out_size) * t.stride, 0.0f);
  for (int i = 0; i < out_size; ++i) {
    const double centre = start + (i + 0.5) * scale;
    int lo = std::max(0, static_cast<int>(std::floor(centre - support + 0.5)));
    int hi = std::min(in_size, static_cast<int>(std::floor(centre + support + 0.5)));
    lo = std::min(lo, in_size - 1);
    hi = std::max(hi, lo + 1);
    hi = std::min(hi, lo + t.stride);
    auto weight = [&](int x) {
      const double d = std::abs((x + 0.5 - centre) / fscale);
      return d < 1.0 ? 1.0 - d : 0.0;
    };
    double sum = 0;
    for (int x = lo; x < hi; ++x) sum += weight(x);
    t.first[i] = lo;
    t.count[i] = hi - lo;
    for (int x = lo; x < hi; ++x)
      t.weights[size_t(i) * t.stride + (x - lo)] = static_cast<float>(sum > 0 ? weight(x) / sum : 1.0 / (hi - lo));
  }
  return t;
}

// Resamples the region (x0, y0, w, h) of an HWC RGB image to `out_w` x `out_h`,
// flipped horizontally when `flip`, and writes it normalised as CHW.
void resample(const uint8_t* src, int sw, int sh, double x0, double y0, double w, double h, int out_w, int out_h,
              bool flip, const Normalise& norm, float* out) {
  const Taps tx = taps(sw, x0, w, out_w), ty = taps(sh, y0, h, out_h);
  int ylo = sh, yhi = 0;
  for (int i = 0; i < out_h; ++i) {
    ylo = std::min(ylo, ty.first[i]);
    yhi = std::max(yhi, ty.first[i] + ty.count[i]);
  }
  // Horizontal pass over the rows the vertical pass needs: [row][out x][channel].
  std::vector<float> tmp(size_t(yhi - ylo) * out_w * 3);
  for (int y = ylo; y < yhi; ++y) {
    const uint8_t* row = src + size_t(y) * sw * 3;
    float* t = tmp.data() + size_t(y - ylo) * out_w * 3;
    for (int i = 0; i < out_w; ++i) {
      const uint8_t* p = row + size_t(tx.first[i]) * 3;
      const float* wt = tx.weights.data() + size_t(i) * tx.stride;
      float r = 0, g = 0, b = 0;
      for (int k = 0; k < tx.count[i]; ++k, p += 3) {
        r += wt[k] * p[0];
        g += wt[k] * p[1];
        b += wt[k] * p[2];
      }
      t[i * 3] = r;
      t[i * 3 + 1] = g;
      t[i * 3 + 2] = b;
    }
  }
  const size_t plane = size_t(out_w) * out_h;
  for (int j = 0; j < out_h; ++j) {
    const float* wt = ty.weights.data() + size_t(j) * ty.stride;
    const float* base = tmp.data() + size_t(ty.first[j] - ylo) * out_w * 3;
    for (int i = 0; i < out_w; ++i) {
      float acc[3] = {0, 0, 0};
      const float* p = base + size_t(i) * 3;
      for (int k = 0; k < ty.count[j]; ++k, p += size_t(out_w) * 3) {
        acc[0] += wt[k] * p[0];
        acc[1] += wt[k] * p[1];
        acc[2] += wt[k] * p[2];
      }
      const size_t o = size_t(j) * out_w + (flip ? out_w - 1 - i : i);
      for (int c = 0; c < 3; ++c) out[c * plane + o] = acc[c] * norm.scale[c] + norm.shift[c];
    }
  }
}

// --- ImageNet-style folders ---------------------------------------------------

bool is_jpeg_name(const std::string& name) {
  const std::string n = lower(name);
  auto ends = [&](const std::string& e) {
    return n.size() > e.size() && n.compare(n.size() - e.size(), e.size(), e) == 0;
  };
  return ends(".jpg") || ends(".jpeg");
}

std::vector<std::string> subfolders(const fs::path& dir) {
  std::vector<std::string> names;
  list_dir(dir, &names, nullptr);
  return names;
}

// The JPEG files under `dir`, at any depth (as torchvision's ImageFolder).
void find_jpegs(const fs::path& dir, int depth, std::vector<std::string>& out) {
  std::vector<std::string> folders, files;
  list_dir(dir, &folders, &files);
  for (const auto& f : files)
    if (is_jpeg_name(f)) out.push_back((dir / f).string());
  if (depth < 16)
    for (const auto& f : folders) find_jpegs(dir / f, depth + 1, out);
}

class Folder final : public Dataset {
 public:
  Folder(const std::string& root, Split split, int64_t image_size) : norm_(make_info(0, image_size)) {
    const fs::path train = fs::path(root) / "train";
    const fs::path dir = fs::path(root) / (split == Split::kTrain ? "train" : "val");
    for (const fs::path& d : {train, dir})
      if (!is_dir(d))
        bad_file("imagenet: cannot find the folder " + d.string() +
                 " (expected train/<class>/*.jpg and val/<class>/*.jpg under " + root + ")");
    classes_ = subfolders(train);
    if (classes_.empty())
      bad_file("imagenet: no class folders in " + train.string() + " (expected train/<class>/*.jpg)");
    std::map<std::string, int64_t> label_of;
    for (size_t i = 0; i < classes_.size(); ++i) label_of[classes_[i]] = static_cast<int64_t>(i);

    std::vector<std::pair<std::string, int64_t>> samples;
    for (const std::string& cls : subfolders(dir)) {
      std::vector<std::string> files;
      find_jpegs(dir / cls, 0, files);
      const auto found = label_of.find(cls);
      if (!files.empty() && found == label_of.end())
        bad_file("imagenet: " + files[0] + " is in class folder '" + cls + "', which " + train.string() +
                 " does not have");
      for (auto& f : files) samples.emplace_back(std::move(f), found->second);
    }
    if (samples.empty()) bad_file("imagenet: no JPEG images (.jpg, .jpeg) in the class folders of " + dir.string());
    std::sort(samples.begin(), samples.end());
    for (auto& s : samples) {
      paths_.push_back(std::move(s.first));
      labels_.push_back(s.second);
    }
    info_ = make_info(static_cast<int64_t>(classes_.size()), image_size);
  }

  const Info& info() const override { return info_; }
  int64_t size() const override { return static_cast<int64_t>(paths_.size()); }
  int64_t label(int64_t index) const override { return labels_.at(check(index)); }

  void get(int64_t index, bool augment, std::mt19937_64& rng, float* out) const override {
    Jpeg jpeg(paths_[check(index)]);
    jpeg.open();
    const int w = jpeg.width(), h = jpeg.height(), S = static_cast<int>(info_.height);
    double x0, y0, cw, ch;
    bool flip = false;
    if (augment) {
      random_resized_crop(w, h, rng, x0, y0, cw, ch);
      flip = coin(rng);
    } else {
      // Resize the shorter side to round(S * 256 / 224), then crop S x S from the centre.
      const int64_t R = round_even(S * 256.0 / 224.0);
      const int64_t nw = w <= h ? R : static_cast<int64_t>(static_cast<double>(R) * w / h);
      const int64_t nh = w <= h ? static_cast<int64_t>(static_cast<double>(R) * h / w) : R;
      const double sx = static_cast<double>(w) / nw, sy = static_cast<double>(h) / nh;
      x0 = round_even((nw - S) / 2.0) * sx;
      y0 = round_even((nh - S) / 2.0) * sy;
      cw = S * sx;
      ch = S * sy;
    }
    jpeg.decode(jpeg.pick_scale(cw, ch, S, S));
    const double fx = static_cast<double>(jpeg.out_width()) / w, fy = static_cast<double>(jpeg.out_height()) / h;
    resample(jpeg.rgb(), jpeg.out_width(), jpeg.out_height(), x0 * fx, y0 * fy, cw * fx, ch * fy, S, S, flip, norm_,
             out);
  }

 private:
  static Info make_info(int64_t classes, int64_t image_size) {
    Info info;
    info.name = "imagenet";
    info.channels = 3;
    info.height = info.width = image_size;
    info.num_classes = classes;
    info.mean = {0.485, 0.456, 0.406};
    info.std = {0.229, 0.224, 0.225};
    return info;
  }

  // torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)).
  static void random_resized_crop(int w, int h, std::mt19937_64& rng, double& x0, double& y0, double& cw, double& ch) {
    const double area = static_cast<double>(w) * h, lr0 = std::log(3.0 / 4.0), lr1 = std::log(4.0 / 3.0);
    for (int attempt = 0; attempt < 10; ++attempt) {
      const double target = area * uniform(rng, 0.08, 1.0), ratio = std::exp(uniform(rng, lr0, lr1));
      const int64_t tw = round_even(std::sqrt(target * ratio)), th = round_even(std::sqrt(target / ratio));
      if (tw > 0 && th > 0 && tw <= w && th <= h) {
        y0 = static_cast<double>(below(rng, h - th + 1));
        x0 = static_cast<double>(below(rng, w - tw + 1));
        cw = static_cast<double>(tw);
        ch = static_cast<double>(th);
        return;
      }
    }
    const double in_ratio = static_cast<double>(w) / h;
    int64_t tw = w, th = h;
    if (in_ratio < 3.0 / 4.0) {
      th = round_even(w / (3.0 / 4.0));
    } else if (in_ratio > 4.0 / 3.0) {
      tw = round_even(h * (4.0 / 3.0));
    }
    tw = std::clamp<int64_t>(tw, 1, w);
    th = std::clamp<int64_t>(th, 1, h);
    x0 = static_cast<double>((w - tw) / 2);
    y0 = static_cast<double>((h - th) / 2);
    cw = static_cast<double>(tw);
    ch = static_cast<double>(th);
  }

  int64_t check(int64_t index) const {
    if (index < 0 || index >= size())
      bad_arg("imagenet: sample index " + std::to_string(index) + " out of range 0.." + std::to_string(size() - 1));
    return index;
  }

  Info info_;
  Normalise norm_;
  std::vector<std::string> classes_, paths_;
  std::vector<int64_t> labels_;
};

// --- Synthetic ----------------------------------------------------------------

// Pixels uniform with mean 0 and variance 1, labels uniform; both a function
// of (split, index) only.  A sample is a window, at an offset drawn from
// (split, index), of one fixed table of noise: a copy, fast enough not to
// slow a benchmark down at ImageNet size.
class Synthetic final : public Dataset {
 public:
  Synthetic(Split split, const OpenOptions& o) : split_(split == Split::kTrain ? 1 : 2) {
    size_ = split == Split::kTrain ? o.synthetic_size : std::max<int64_t>(1, o.synthetic_size / 10);
    info_.name = "synthetic";
    info_.channels = 3;
    info_.height = info_.width = o.image_size;
    info_.num_classes = o.synthetic_classes;
    info_.mean = {0, 0, 0};
    info_.std = {1, 1, 1};
    noise_.resize(size_t{1} << 20);
    const double k = std::sqrt(12.0) * 0x1.0p-32, half = std::sqrt(3.0);
    for (size_t i = 0; i < noise_.size(); i += 2) {
      const uint64_t r = splitmix64(0x5717e71cULL + i);
      noise_[i] = static_cast<float>(static_cast<uint32_t>(r) * k - half);
      noise_[i + 1] = static_cast<float>(static_cast<uint32_t>(r >> 32) * k - half);
    }
  }
  const Info& info() const override { return info_; }
  int64_t size() const override { return size_; }
  int64_t label(int64_t index) const override {
    return static_cast<int64_t>(mix(split_, check(index), 0x1abe1) % static_cast<uint64_t>(info_.num_classes));
  }
  void get(int64_t index, bool, std::mt19937_64&, float* out) const override {
    const size_t n = static_cast<size_t>(info_.channels * info_.height * info_.width), t = noise_.size();
    size_t at = mix(split_, check(index), 0x91c5e1) % t;
    for (size_t done = 0; done < n;) {
      const size_t len = std::min(n - done, t - at);
      std::copy_n(noise_.data() + at, len, out + done);
      done += len;
      at = 0;
    }
  }

 private:
  int64_t check(int64_t index) const {
    if (index < 0 || index >= size_)
      bad_arg("synthetic: sample index " + std::to_string(index) + " out of range 0.." + std::to_string(size_ - 1));
    return index;
  }
  uint64_t split_;
  int64_t size_;
  Info info_;
  std::vector<float> noise_;
};

std::string canonical(const std::string& name) {
  const std::string n = lower(name);
  if (n == "fashion-mnist" || n == "fmnist" || n == "fashion_mnist") return "fashion-mnist";
  for (const std::string& known : names())
    if (n == known) return known;
  bad_arg("unknown dataset '" + name + "' (use fashion-mnist, mnist, cifar10, cifar100, imagenet or synthetic)");
}

}  // namespace

std::string resolve_name(const std::string& dataset, int64_t num_classes) {
  if ((dataset == "cifar10" || dataset == "cifar100") && num_classes == 100) return "cifar100";
  if (dataset == "cifar100" && num_classes == 10) return "cifar10";
  return dataset;
}

const std::vector<std::string>& names() {
  static const std::vector<std::string> all = {"fashion-mnist", "mnist",    "cifar10",
                                               "cifar100",      "imagenet", "synthetic"};
  return all;
}

std::string default_root(const std::string& name) {
  return canonical(name) == "fashion-mnist" ? "/usr/share/datasets/fashion-mnist" : "";
}

std::shared_ptr<const Dataset> open(const std::string& name, const std::string& root, Split split,
                                    const OpenOptions& options) {
  const std::string n = canonical(name);
  if (options.image_size < 1) bad_arg("image size must be at least 1, not " + std::to_string(options.image_size));
  if (n == "synthetic") {
    if (options.synthetic_size < 1)
      bad_arg("synthetic: size must be at least 1, not " + std::to_string(options.synthetic_size));
    if (options.synthetic_classes < 1)
      bad_arg("synthetic: classes must be at least 1, not " + std::to_string(options.synthetic_classes));
    return std::make_shared<Synthetic>(split, options);
  }
  const std::string dir = root.empty() ? default_root(n) : root;
  if (dir.empty()) bad_file(n + ": no dataset folder given; give the folder that holds its files");
  if (n == "fashion-mnist" || n == "mnist") return open_idx(n, dir, split);
  if (n == "cifar10" || n == "cifar100") return open_cifar(n, dir, split);
  return std::make_shared<Folder>(dir, split, options.image_size);
}

// --- Loader -------------------------------------------------------------------

struct Loader::State {
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
  };

  bool started = false;
  bool pinned = false;
  int64_t epoch = 0;
  std::shared_ptr<const std::vector<int64_t>> order;
  int64_t next_deliver = 0, end = 0;

  // Workers: batches [next_deliver, next_schedule) are being made or wait in
  // `ready`; a new start() bumps `generation`, which voids them.
  std::mutex mu;
  std::condition_variable work_cv, ready_cv;
  std::vector<std::thread> threads;
  bool stop = false;
  std::atomic<uint64_t> generation{0};
  int64_t next_schedule = 0, max_ahead = 0;
  std::map<int64_t, Result> ready;
};

namespace {

struct Cancelled {};

// Batch `b` of an epoch; throws Cancelled when `generation` moves past `gen`.
Batch make_batch(const Dataset& ds, const LoaderOptions& o, bool pinned, const std::vector<int64_t>& order,
                 int64_t epoch, int64_t b, const std::atomic<uint64_t>* generation, uint64_t gen) {
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t lo = b * o.batch_size, hi = std::min(n, lo + o.batch_size), B = hi - lo;
  const Info& info = ds.info();
  const int64_t per = info.channels * info.height * info.width;
  Batch batch;
  batch.images = torch::empty({B, info.channels, info.height, info.width},
                              torch::TensorOptions().dtype(torch::kFloat32).pinned_memory(pinned));
  batch.labels = torch::empty({B}, torch::kInt64);
  batch.indices = torch::empty({B}, torch::kInt64);
  float* img = batch.images.data_ptr<float>();
  int64_t* lab = batch.labels.data_ptr<int64_t>();
  int64_t* idx = batch.indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    if (generation && generation->load(std::memory_order_relaxed) != gen) throw Cancelled{};
    const int64_t index = order[lo + i];
    std::mt19937_64 rng(mix(o.seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(index)));
    ds.get(index, o.augment, rng, img + i * per);
    lab[i] = ds.label(index);
    idx[i] = index;
  }
  return batch;
}

}  // namespace

Loader::Loader(std::shared_ptr<const Dataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options), state_(std::make_unique<State>()) {
  if (!dataset_) bad_arg("loader: no dataset");
  if (options_.batch_size < 1) bad_arg("batch size must be at least 1, not " + std::to_string(options_.batch_size));
  if (options_.workers < 0) bad_arg("workers must be 0 or more, not " + std::to_string(options_.workers));
  State& s = *state_;
  s.pinned = options_.pin_memory && torch::cuda::is_available();
  s.max_ahead = 2 * int64_t{options_.workers};
  for (int w = 0; w < options_.workers; ++w)
    s.threads.emplace_back([this] {
      State& s = *state_;
      std::unique_lock<std::mutex> lock(s.mu);
      for (;;) {
        s.work_cv.wait(lock, [&] {
          return s.stop || (s.started && s.next_schedule < s.end && s.next_schedule - s.next_deliver < s.max_ahead);
        });
        if (s.stop) return;
        const int64_t b = s.next_schedule++;
        const uint64_t gen = s.generation.load();
        const int64_t epoch = s.epoch;
        const auto order = s.order;
        lock.unlock();
        State::Result r;
        bool cancelled = false;
        try {
          r.batch = make_batch(*dataset_, options_, s.pinned, *order, epoch, b, &s.generation, gen);
        } catch (const Cancelled&) {
          cancelled = true;
        } catch (...) {
          r.error = std::current_exception();
        }
        lock.lock();
        if (!cancelled && gen == s.generation.load()) {
          s.ready.emplace(b, std::move(r));
          s.ready_cv.notify_all();
        }
      }
    });
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    state_->generation++;
  }
  state_->work_cv.notify_all();
  for (auto& t : state_->threads) t.join();
}

int64_t Loader::batches_per_epoch() const {
  const int64_t n = dataset_->size(), bs = options_.batch_size;
  return options_.drop_last ? n / bs : (n + bs - 1) / bs;
}

void Loader::start(int64_t epoch, int64_t first_batch) {
  const int64_t nb = batches_per_epoch();
  if (epoch < 0) bad_arg("loader: epoch must be 0 or more, not " + std::to_string(epoch));
  if (first_batch < 0 || first_batch > nb)
    bad_arg("loader: first batch " + std::to_string(first_batch) + " is not in 0.." + std::to_string(nb));
  auto order = std::make_shared<std::vector<int64_t>>(dataset_->size());
  for (size_t i = 0; i < order->size(); ++i) (*order)[i] = static_cast<int64_t>(i);
  if (options_.shuffle) {  // Fisher-Yates from (seed, epoch) only
    std::mt19937_64 rng(mix(options_.seed, 0x5eedULL, static_cast<uint64_t>(epoch)));
    for (int64_t i = static_cast<int64_t>(order->size()) - 1; i > 0; --i)
      std::swap((*order)[i], (*order)[below(rng, i + 1)]);
  }
  State& s = *state_;
  std::map<int64_t, State::Result> old;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.generation++;
    s.started = true;
    s.epoch = epoch;
    s.order = std::move(order);
    s.end = nb;
    s.next_deliver = s.next_schedule = first_batch;
    old.swap(s.ready);  // freed outside the lock
  }
  s.work_cv.notify_all();
}

std::optional<Batch> Loader::next() {
  State& s = *state_;
  if (!s.started) start(0);
  if (s.threads.empty()) {
    if (s.next_deliver >= s.end) return std::nullopt;
    return make_batch(*dataset_, options_, s.pinned, *s.order, s.epoch, s.next_deliver++, nullptr, 0);
  }
  State::Result r;
  {
    std::unique_lock<std::mutex> lock(s.mu);
    if (s.next_deliver >= s.end) return std::nullopt;
    s.ready_cv.wait(lock, [&] { return s.ready.count(s.next_deliver) > 0; });
    auto it = s.ready.find(s.next_deliver);
    r = std::move(it->second);
    s.ready.erase(it);
    s.next_deliver++;
  }
  s.work_cv.notify_all();
  if (r.error) std::rethrow_exception(r.error);
  return std::move(r.batch);
}

}  // namespace aq::data
