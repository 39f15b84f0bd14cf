// ImageNet-style folders: train/ and val/ of class subfolders of image
// files, with torchvision's training and evaluation transforms.
#include "image.h"
#include "internal.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <map>
#include <utility>

#include <dirent.h>
#include <sys/stat.h>

namespace aq::data {
using namespace detail;
namespace {

// Through POSIX, as is_file (internal.h) and for its reason.
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

// Our own draws, as those of internal.h and for the same reason.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }
double uniform(std::mt19937_64& rng, double lo, double hi) { return lo + (hi - lo) * uniform01(rng); }

// Python's round(): halves to even (the default floating-point rounding mode).
int64_t round_even(double v) { return static_cast<int64_t>(std::nearbyint(v)); }

// By name only to pick the files (as torchvision's ImageFolder); each is then
// decoded by its content.
bool is_image_name(const std::string& name) {
  const std::string n = lower(name);
  auto ends = [&](const std::string& e) {
    return n.size() > e.size() && n.compare(n.size() - e.size(), e.size(), e) == 0;
  };
  return ends(".jpg") || ends(".jpeg") || ends(".png");
}

std::vector<std::string> subfolders(const fs::path& dir) {
  std::vector<std::string> names;
  list_dir(dir, &names, nullptr);
  return names;
}

// The image files under `dir`, at any depth (as torchvision's ImageFolder).
void find_images(const fs::path& dir, int depth, std::vector<std::string>& out) {
  std::vector<std::string> folders, files;
  list_dir(dir, &folders, &files);
  for (const auto& f : files)
    if (is_image_name(f)) out.push_back((dir / f).string());
  if (depth < 16)
    for (const auto& f : folders) find_images(dir / f, depth + 1, out);
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
      find_images(dir / cls, 0, files);
      const auto found = label_of.find(cls);
      if (!files.empty() && found == label_of.end())
        bad_file("imagenet: " + files[0] + " is in class folder '" + cls + "', which " + train.string() +
                 " does not have");
      for (auto& f : files) samples.emplace_back(std::move(f), found->second);
    }
    if (samples.empty()) bad_file("imagenet: no images (.jpg, .jpeg, .png) in the class folders of " + dir.string());
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
    const auto image = open_image(paths_[check(index)]);
    const int w = image->width(), h = image->height(), S = static_cast<int>(info_.height);
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
    image->decode(image->pick_scale(cw, ch, S, S));
    const double fx = static_cast<double>(image->out_width()) / w, fy = static_cast<double>(image->out_height()) / h;
    resample(image->rgb(), image->out_width(), image->out_height(), x0 * fx, y0 * fy, cw * fx, ch * fy, S, S, flip,
             norm_, out);
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

}  // namespace

std::shared_ptr<const Dataset> detail::open_folder(const std::string& root, Split split, int64_t image_size) {
  return std::make_shared<Folder>(root, split, image_size);
}

}  // namespace aq::data
