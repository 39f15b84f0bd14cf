// JPEG decoding through libjpeg, its errors turned into exceptions; the
// choice of decoder by content; resampling.
#include "image.h"

#include <jerror.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

namespace aq::data::detail {
namespace {

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

}  // namespace

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BadImage(path + ": cannot open: " + std::strerror(errno));
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw BadImage(path + ": read error");
  if (bytes.empty()) throw BadImage(path + ": empty file, not an image");
  return bytes;
}

void check_size(const std::string& path, const char* format, int64_t w, int64_t h) {
  if (w <= 0 || h <= 0 || w * h > kMaxPixels)
    throw BadImage(path + ": cannot decode " + format + " image: size " + std::to_string(w) + "x" +
                   std::to_string(h) + (w > 0 && h > 0 ? " is over the limit of " + std::to_string(kMaxPixels) +
                                                             " pixels"
                                                       : ""));
}

std::unique_ptr<Image> open_image(const std::string& path) {
  std::vector<unsigned char> bytes = read_file(path);
  static const unsigned char kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 3 && bytes[0] == 0xff && bytes[1] == 0xd8 && bytes[2] == 0xff) {
    auto j = std::make_unique<Jpeg>(path, std::move(bytes));
    j->open();
    return j;
  }
  if (bytes.size() >= 8 && std::equal(kPng, kPng + 8, bytes.begin())) return std::make_unique<Png>(path, std::move(bytes));
  throw BadImage(path + ": not a JPEG or PNG image (by its content)");
}

void cmyk_to_rgb(const uint8_t* cmyk, int n, bool inverted, uint8_t* rgb) {
  auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (int i = 0; i < n; ++i, cmyk += 4, rgb += 3) {
    const int k = inverted ? 255 - cmyk[3] : cmyk[3], nk = 255 - k;
    for (int c = 0; c < 3; ++c) {
      const int ink = inverted ? 255 - cmyk[c] : cmyk[c];
      rgb[c] = static_cast<uint8_t>(std::clamp(nk - muldiv255(ink, nk), 0, 255));
    }
  }
}

Jpeg::Jpeg(const std::string& path, std::vector<unsigned char> bytes) : path_(path), bytes_(std::move(bytes)) {
  cinfo_.err = jpeg_std_error(&err_.pub);
  err_.pub.error_exit = jpeg_on_error;
  err_.pub.emit_message = jpeg_on_message;
}

void Jpeg::fail() { throw BadImage(path_ + ": cannot decode JPEG image: " + err_.message); }
void Jpeg::unsupported(const char* what) { throw BadImage(path_ + ": unsupported JPEG image (" + what + ")"); }

void Jpeg::open() {
  if (setjmp(err_.jump)) fail();
  jpeg_create_decompress(&cinfo_);
  created_ = true;
  cinfo_.mem->max_memory_to_use = kJpegMemory;  // over it libjpeg fails (no backing store)
  jpeg_mem_src(&cinfo_, bytes_.data(), static_cast<unsigned long>(bytes_.size()));
  jpeg_read_header(&cinfo_, TRUE);
  switch (cinfo_.jpeg_color_space) {
    case JCS_GRAYSCALE:
    case JCS_YCbCr:
    case JCS_RGB: cinfo_.out_color_space = JCS_RGB; break;  // grayscale too: libjpeg replicates the channel
    case JCS_CMYK:
    case JCS_YCCK:  // libjpeg turns YCCK into CMYK; RGB is ours to make, as PIL makes it
      cinfo_.out_color_space = JCS_CMYK;
      cmyk_ = true;
      inverted_ = cinfo_.saw_Adobe_marker;
      break;
    default: unsupported("unknown colour space"); break;
  }
  check_size(path_, "JPEG", cinfo_.image_width, cinfo_.image_height);
  width_ = static_cast<int>(cinfo_.image_width);
  height_ = static_cast<int>(cinfo_.image_height);
}

int Jpeg::pick_scale(double region_w, double region_h, int need_w, int need_h) {
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

void Jpeg::decode(int n) {
  if (setjmp(err_.jump)) fail();
  cinfo_.scale_num = n;
  cinfo_.scale_denom = 8;
  jpeg_calc_output_dimensions(&cinfo_);
  out_width_ = static_cast<int>(cinfo_.output_width);
  out_height_ = static_cast<int>(cinfo_.output_height);
  rgb_.clear();
  rgb_.reserve(std::min<size_t>(size_t(out_width_) * out_height_ * 3, size_t{4} << 20));
  if (cmyk_) cmyk_row_.resize(size_t(out_width_) * 4);
  jpeg_start_decompress(&cinfo_);
  if (cinfo_.output_components != (cmyk_ ? 4 : 3)) unsupported("unexpected number of output channels");
  read_rows();
  jpeg_abort_decompress(&cinfo_);  // all pixels are in; what follows them does not matter
}

void Jpeg::read_rows() {
  const size_t row_bytes = size_t{cinfo_.output_width} * 3;
  while (cinfo_.output_scanline < cinfo_.output_height) {
    rgb_.resize(rgb_.size() + row_bytes);  // grows with the rows decoded: see image.h
    uint8_t* out = rgb_.data() + size_t{cinfo_.output_scanline} * row_bytes;
    JSAMPROW row = cmyk_ ? cmyk_row_.data() : out;
    jpeg_read_scanlines(&cinfo_, &row, 1);
    if (cmyk_) cmyk_to_rgb(cmyk_row_.data(), out_width_, inverted_, out);
  }
}

// --- Resampling ---------------------------------------------------------------

namespace {

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

}  // namespace

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

}  // namespace aq::data::detail
