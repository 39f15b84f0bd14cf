// JPEG decoding (libjpeg) and PIL's bilinear resampling to normalised CHW
// floats, for the ImageNet-style folders.
#pragma once

#include "internal.h"

#include <cstdio>  // before jpeglib.h, which uses FILE
#include <jpeglib.h>

#include <csetjmp>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace aq::data::detail {

struct JpegErrors {
  jpeg_error_mgr pub;  // first: libjpeg sees a jpeg_error_mgr*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

// One JPEG file: header first, then a decode at a chosen scale to RGB.
// Every function that calls into libjpeg sets the jump target itself and
// holds no automatic objects with destructors past it.
class Jpeg {
 public:
  explicit Jpeg(const std::string& path);
  // Reads the header: width() and height() are then known.
  void open();
  ~Jpeg() {
    if (created_) jpeg_destroy_decompress(&cinfo_);
  }
  Jpeg(const Jpeg&) = delete;
  Jpeg& operator=(const Jpeg&) = delete;

  int width() const { return static_cast<int>(cinfo_.image_width); }
  int height() const { return static_cast<int>(cinfo_.image_height); }

  // The smallest scale n/8 whose output still has at least `need_w` x `need_h`
  // pixels for each `region_w` x `region_h` pixels of the full image.
  int pick_scale(double region_w, double region_h, int need_w, int need_h);

  // Decodes at scale n/8 to HWC RGB in rgb(); out_width() x out_height().
  void decode(int n);
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

// Resamples the region (x0, y0, w, h) of an HWC RGB image to `out_w` x `out_h`,
// flipped horizontally when `flip`, and writes it normalised as CHW.
void resample(const uint8_t* src, int sw, int sh, double x0, double y0, double w, double h, int out_w, int out_h,
              bool flip, const Normalise& norm, float* out);

}  // namespace aq::data::detail
