// JPEG decoding through libjpeg, its errors turned into exceptions, and
// resampling.
#include "jpeg.h"

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

Jpeg::Jpeg(const std::string& path) : path_(path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad_file(path + ": cannot open: " + std::strerror(errno));
  bytes_.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) bad_file(path + ": read error");
  if (bytes_.empty()) bad_file(path + ": empty file, not a JPEG image");
  cinfo_.err = jpeg_std_error(&err_.pub);
  err_.pub.error_exit = jpeg_on_error;
  err_.pub.emit_message = jpeg_on_message;
}

void Jpeg::open() {
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
