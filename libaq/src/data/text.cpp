// text: the bytes of a folder of text files as windows of tokens for
// byte-level language models.
//
// The corpus is every regular file under the folder (subfolders followed,
// symbolic links too, each folder once; names beginning with '.' skipped),
// in the byte order of their paths relative to the folder, concatenated as
// they are; a file whose name ends in .gz is decompressed (the man pages).
// The split is by position: the last tenth of the corpus's bytes is the
// validation (test) split, the rest the training split, so a single file
// is split too and the same folder always gives the same split.  Sample i of
// a split is its bytes [i T, i T + T], T = the context: inputs its first T
// bytes, targets its last T; windows overlap by one byte, so every byte but
// the first is a target once, and an index means the same window in every
// run on the same folder.
#include "internal.h"

#include <dirent.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <set>
#include <utility>

namespace aq::data {
using namespace detail;
namespace {

// Relative paths of the regular files under `dir` (prefix `rel`).
void walk(const std::string& dir, const std::string& rel, std::set<std::pair<dev_t, ino_t>>& seen,
          std::vector<std::string>& files) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) return;  // an unreadable subfolder holds nothing readable
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') names.emplace_back(e->d_name);
  ::closedir(d);
  for (const auto& n : names) {
    const std::string path = dir + "/" + n, r = rel.empty() ? n : rel + "/" + n;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) continue;  // a dangling link
    if (S_ISDIR(st.st_mode)) {
      if (seen.insert({st.st_dev, st.st_ino}).second) walk(path, r, seen, files);
    } else if (S_ISREG(st.st_mode)) {
      files.push_back(r);
    }
  }
}

// Appends the file's bytes (decompressed when its name ends in .gz); false
// when it cannot be read.
bool append(const std::string& path, std::vector<uint8_t>& out) {
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  const size_t before = out.size();
  if (gz) {
    gzFile f = gzopen(path.c_str(), "rb");
    if (!f) return false;
    uint8_t buf[1 << 16];
    int n;
    while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
    const bool ok = n == 0;
    gzclose(f);
    if (!ok) out.resize(before);
    return ok;
  }
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  uint8_t buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  const bool ok = !std::ferror(f);
  std::fclose(f);
  if (!ok) out.resize(before);
  return ok;
}

class Text final : public Dataset {
 public:
  Text(std::vector<uint8_t> bytes, int64_t context) : bytes_(std::move(bytes)), context_(context) {
    info_.name = "text";
    info_.channels = 1;
    info_.height = 1;
    info_.width = context;
    info_.num_classes = 256;
    info_.sequence = context;
    info_.mean = {0};
    info_.std = {1};
    size_ = (static_cast<int64_t>(bytes_.size()) - 1) / context;
  }
  const Info& info() const override { return info_; }
  int64_t size() const override { return size_; }
  // The window's last byte (token datasets have no class label).
  int64_t label(int64_t index) const override { return bytes_[check(index) * context_ + context_]; }
  // The window's inputs as floats (byte values), for readers of images.
  void get(int64_t index, bool, std::mt19937_64&, float* out) const override {
    const uint8_t* w = bytes_.data() + check(index) * context_;
    for (int64_t j = 0; j < context_; ++j) out[j] = w[j];
  }
  void get_tokens(int64_t index, int64_t* out) const override {
    const uint8_t* w = bytes_.data() + check(index) * context_;
    for (int64_t j = 0; j <= context_; ++j) out[j] = w[j];
  }

 private:
  int64_t check(int64_t index) const {
    if (index < 0 || index >= size_)
      bad_arg("text: sample index " + std::to_string(index) + " out of range 0.." + std::to_string(size_ - 1));
    return index;
  }
  std::vector<uint8_t> bytes_;
  int64_t context_, size_ = 0;
  Info info_;
};

}  // namespace

void Dataset::get_tokens(int64_t, int64_t*) const {
  throw std::logic_error(info().name + ": not a token dataset");
}

std::shared_ptr<const Dataset> detail::open_text(const std::string& root, Split split, int64_t context) {
  struct stat st;
  if (::stat(root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    bad_file("text: " + root + ": no such folder (give a folder of text files)");
  std::vector<std::string> files;
  std::set<std::pair<dev_t, ino_t>> seen{{st.st_dev, st.st_ino}};
  walk(root, "", seen, files);
  if (files.empty()) bad_file("text: " + root + ": no files in it (give a folder of text files)");
  std::sort(files.begin(), files.end());
  std::vector<uint8_t> corpus;
  size_t read = 0;
  for (const auto& f : files) read += append(root + "/" + f, corpus);
  if (read == 0)
    bad_file("text: " + root + ": none of its " + std::to_string(files.size()) + " files can be read");
  const size_t n = corpus.size(), val = n / 10, train = n - val;
  const bool is_train = split == Split::kTrain;
  const size_t len = is_train ? train : val;
  if (static_cast<int64_t>(len) < context + 1)
    bad_file("text: " + root + ": the " + (is_train ? "training split (the first 90%" : "validation split (the last 10%") +
             " of " + std::to_string(n) + " bytes) has " + std::to_string(len) + " bytes, less than one window of " +
             std::to_string(context + 1) + " (--context " + std::to_string(context) +
             " + 1): give more text or a smaller --context");
  std::vector<uint8_t> part(corpus.begin() + (is_train ? 0 : train), corpus.begin() + (is_train ? train : n));
  corpus = {};
  return std::make_shared<Text>(std::move(part), context);
}

}  // namespace aq::data
