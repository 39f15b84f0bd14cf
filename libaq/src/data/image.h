// Image files of the ImageNet-style folders, decoded by their content, not
// their name: JPEG (libjpeg) in every colour space it gives, CMYK and YCCK
// converted to RGB as PIL converts them; PNG (libpng) of any colour type and
// depth, reduced to 8-bit RGB as PIL's convert("RGB") does.  Then PIL's
// bilinear resampling to normalised CHW floats.  Every failure to read or
// decode throws BadImage naming the file.
//
// Memory is bounded by what the file can hold: images over kMaxPixels
// (PIL's DecompressionBombError limit) are refused from their header, a PNG
// that claims more pixel bytes than deflate could unpack from its size too,
// JPEG rows are stored as they are decoded (a truncated file claiming a
// large image fails before its whole buffer exists), and libjpeg's own
// buffers are capped at kJpegMemory.
#pragma once

#include "internal.h"

#include <cstdio>  // before jpeglib.h, which uses FILE
#include <jpeglib.h>

#include <csetjmp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace aq::data::detail {

constexpr int64_t kMaxPixels = 178956970;
constexpr long kJpegMemory = 1L << 30;

// Throws BadImage unless `w` x `h` is a size to decode.
void check_size(const std::string& path, const char* format, int64_t w, int64_t h);

// The whole file; throws BadImage when it cannot be read or is empty.
std::vector<unsigned char> read_file(const std::string& path);

// A decoder: header first, then a decode (at a chosen scale, where the
// format has scales) to HWC RGB.
class Image {
 public:
  virtual ~Image() = default;
  int width() const { return width_; }
  int height() const { return height_; }
  // The smallest scale n/8 whose output still has at least `need_w` x `need_h`
  // pixels for each `region_w` x `region_h` pixels of the full image.
  virtual int pick_scale(double region_w, double region_h, int need_w, int need_h) = 0;
  // Decodes at scale n/8 to HWC RGB in rgb(); out_width() x out_height().
  virtual void decode(int n) = 0;
  int out_width() const { return out_width_; }
  int out_height() const { return out_height_; }
  const uint8_t* rgb() const { return rgb_.data(); }

 protected:
  int width_ = 0, height_ = 0, out_width_ = 0, out_height_ = 0;
  std::vector<uint8_t> rgb_;
};

// Opens `path` as whatever its first bytes say it is, header read.
std::unique_ptr<Image> open_image(const std::string& path);

struct JpegErrors {
  jpeg_error_mgr pub;  // first: libjpeg sees a jpeg_error_mgr*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

// One JPEG file.  Every function that calls into libjpeg sets the jump
// target itself and holds no automatic objects with destructors past it.
class Jpeg final : public Image {
 public:
  Jpeg(const std::string& path, std::vector<unsigned char> bytes);
  ~Jpeg() override {
    if (created_) jpeg_destroy_decompress(&cinfo_);
  }
  Jpeg(const Jpeg&) = delete;
  Jpeg& operator=(const Jpeg&) = delete;

  // Reads the header: width() and height() are then known.
  void open();
  int pick_scale(double region_w, double region_h, int need_w, int need_h) override;
  void decode(int n) override;

 private:
  [[noreturn]] void fail();
  [[noreturn]] void unsupported(const char* what);
  void read_rows();

  std::string path_;
  std::vector<unsigned char> bytes_;
  std::vector<uint8_t> cmyk_row_;
  jpeg_decompress_struct cinfo_{};
  JpegErrors err_{};
  bool created_ = false, cmyk_ = false, inverted_ = false;
};

// PIL's CMYK to RGB: each channel (255 - ink) * (255 - k) / 255, rounded as
// PIL's MULDIV255.  `inverted`: the file stores 255 - ink (Adobe's CMYK, as
// PIL assumes whenever the file has an Adobe marker).
void cmyk_to_rgb(const uint8_t* cmyk, int n, bool inverted, uint8_t* rgb);

// One PNG file, decoded whole (PNG has no reduced scales).
class Png final : public Image {
 public:
  Png(const std::string& path, std::vector<unsigned char> bytes);
  int pick_scale(double, double, int, int) override { return 8; }
  void decode(int n) override;

 private:
  std::string path_;
  std::vector<unsigned char> bytes_;
  std::vector<unsigned char*> rows_;
};

// Resamples the region (x0, y0, w, h) of an HWC RGB image to `out_w` x `out_h`,
// flipped horizontally when `flip`, and writes it normalised as CHW.
void resample(const uint8_t* src, int sw, int sh, double x0, double y0, double w, double h, int out_w, int out_h,
              bool flip, const Normalise& norm, float* out);

}  // namespace aq::data::detail
