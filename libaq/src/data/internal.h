// What the files of the data layer share (internal to it): errors, file
// queries, the random draws batches depend on, normalisation, and the
// per-format datasets that open() picks from.
#pragma once

#include "aq/data.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/stat.h>

namespace aq::data::detail {
namespace fs = std::filesystem;

[[noreturn]] inline void bad_arg(const std::string& what) { throw std::invalid_argument(what); }
[[noreturn]] inline void bad_file(const std::string& what) { throw std::runtime_error(what); }

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// File-system queries go through POSIX: libtorch.so exports its own copies of
// some std::filesystem functions (status, remove_all, ...), which the dynamic
// linker may pick over libstdc++'s, and some of them crash.
inline bool is_file(const fs::path& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// --- Random numbers -----------------------------------------------------------
// Our own mixing and draws (not std::*_distribution, whose output differs
// between standard libraries) so that batches are the same bytes everywhere.

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ (b * 0xd1342543de82ef95ULL + 1)); }
inline uint64_t mix(uint64_t a, uint64_t b, uint64_t c) { return mix(mix(a, b), c); }

// In [0, n); n >= 1.  The modulo bias is below 2^-40 for the sizes used here.
inline int64_t below(std::mt19937_64& rng, int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); }
inline bool coin(std::mt19937_64& rng) { return (rng() >> 63) != 0; }

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

// --- The datasets open() picks from ------------------------------------------
// open() calls these once it has checked the name and the options (and has a
// folder, for the datasets kept in files).

// fashion-mnist or mnist: IDX files, gzipped or not.
std::shared_ptr<const Dataset> open_idx(const std::string& name, const std::string& root, Split split);
// cifar10 or cifar100: the binary distribution.
std::shared_ptr<const Dataset> open_cifar(const std::string& name, const std::string& root, Split split);
// imagenet: train/<class>/*.jpg and val/<class>/*.jpg under `root`.
std::shared_ptr<const Dataset> open_folder(const std::string& root, Split split, int64_t image_size);
std::shared_ptr<const Dataset> open_synthetic(Split split, const OpenOptions& options);
// text: the files under `root` as windows of context + 1 bytes (text.cpp).
std::shared_ptr<const Dataset> open_text(const std::string& root, Split split, int64_t context);

}  // namespace aq::data::detail
