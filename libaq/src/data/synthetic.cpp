// The synthetic dataset of the benchmarks: no files, ImageNet-like shapes.
#include "internal.h"

#include <algorithm>
#include <cmath>

namespace aq::data {
using namespace detail;
namespace {

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

}  // namespace

std::shared_ptr<const Dataset> detail::open_synthetic(Split split, const OpenOptions& options) {
  return std::make_shared<Synthetic>(split, options);
}

}  // namespace aq::data
