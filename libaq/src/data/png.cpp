// PNG decoding through libpng's progressive-free classic interface, reduced
// to 8-bit RGB as PIL's convert("RGB") reduces it: palette looked up, gray
// replicated, 16-bit samples cut to their high byte, alpha dropped (not
// composited), gamma chunks ignored.
#include "image.h"

#include <png.h>

#include <algorithm>
#include <cstring>

namespace aq::data::detail {
namespace {

struct Reader {
  const std::vector<unsigned char>* bytes;
  size_t pos = 0;
};

struct Failure {
  char message[256] = "";
};

extern "C" void png_on_error(png_structp png, png_const_charp msg) {
  auto* f = static_cast<Failure*>(png_get_error_ptr(png));
  std::snprintf(f->message, sizeof f->message, "%s", msg);
  png_longjmp(png, 1);
}
extern "C" void png_on_warning(png_structp, png_const_charp) {}

extern "C" void png_read_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<Reader*>(png_get_io_ptr(png));
  if (r->bytes->size() - r->pos < n) png_error(png, "file truncated");
  std::memcpy(out, r->bytes->data() + r->pos, n);
  r->pos += n;
}

}  // namespace

Png::Png(const std::string& path, std::vector<unsigned char> bytes) : path_(path), bytes_(std::move(bytes)) {
  // The header only, for width() and height().
  if (bytes_.size() < 24 || std::memcmp(bytes_.data() + 12, "IHDR", 4) != 0)
    throw BadImage(path_ + ": cannot decode PNG image: no IHDR chunk");
  auto be32 = [&](size_t at) {
    return (uint32_t{bytes_[at]} << 24) | (uint32_t{bytes_[at + 1]} << 16) | (uint32_t{bytes_[at + 2]} << 8) |
           bytes_[at + 3];
  };
  const uint32_t w = be32(16), h = be32(20);
  check_size(path_, "PNG", w, h);
  // The unfiltered pixel bytes cannot exceed what deflate unpacks from the
  // whole file (at most 1032:1).  Bits per pixel from the colour type and
  // depth; 1 where they make no sense (libpng refuses those later).
  const int channels[7] = {1, 0, 3, 1, 2, 0, 4};
  const int depth = bytes_.size() > 25 ? bytes_[24] : 1, type = bytes_.size() > 25 ? bytes_[25] : 0;
  const uint64_t bits = std::max(1, (type <= 6 ? channels[type] : 1) * std::min(depth, 16));
  if (uint64_t{h} * ((uint64_t{w} * bits + 7) / 8) > uint64_t{1032} * bytes_.size())
    throw BadImage(path_ + ": cannot decode PNG image: size " + std::to_string(w) + "x" + std::to_string(h) +
                   " cannot be held in its " + std::to_string(bytes_.size()) + " bytes");
  width_ = static_cast<int>(w);
  height_ = static_cast<int>(h);
}

void Png::decode(int) {
  Failure failure;
  Reader reader{&bytes_};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &failure, png_on_error, png_on_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw BadImage(path_ + ": cannot decode PNG image: out of memory");
  }
  volatile bool ok = false;  // set after the jump target: volatile keeps it valid past a longjmp
  if (setjmp(png_jmpbuf(png)) == 0) {
    png_set_read_fn(png, &reader, png_read_memory);
    png_read_info(png, info);
    if (static_cast<int>(png_get_image_width(png, info)) != width_ ||
        static_cast<int>(png_get_image_height(png, info)) != height_)
      png_error(png, "inconsistent header");
    png_set_expand(png);          // palette to RGB, gray below 8 bits to 8, tRNS to alpha
    png_set_strip_16(png);        // the high byte, as PIL
    png_set_strip_alpha(png);     // dropped, as PIL's RGBA to RGB
    png_set_gray_to_rgb(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_channels(png, info) != 3 || png_get_bit_depth(png, info) != 8) png_error(png, "not 8-bit RGB after conversion");
    out_width_ = width_;
    out_height_ = height_;
    rgb_.resize(size_t(width_) * height_ * 3);
    rows_.resize(height_);  // a member: a local changed past setjmp is indeterminate after longjmp
    for (int y = 0; y < height_; ++y) rows_[y] = rgb_.data() + size_t(y) * width_ * 3;
    png_read_image(png, rows_.data());
    ok = true;
  }
  png_destroy_read_struct(&png, &info, nullptr);
  if (!ok) throw BadImage(path_ + ": cannot decode PNG image: " + failure.message);
}

}  // namespace aq::data::detail
