// The text dataset: the corpus a folder makes (order, .gz, hidden files),
// the split by position, window indices, the loader's token batches, and
// the errors of bad folders.
#include "aq/data.h"
#include "temp_dir.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

using aq::data::Split;

void write(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

void write_gz(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

std::string text_of(int n, char seed) {
  std::string s;
  for (int i = 0; i < n; ++i) s += static_cast<char>(' ' + (seed * 7 + i * 13) % 90);
  return s;
}

aq::data::OpenOptions context(int64_t t) {
  aq::data::OpenOptions o;
  o.context = t;
  return o;
}

std::string error_of(const std::string& dir, Split split, int64_t t) {
  try {
    aq::data::open("text", dir, split, context(t));
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

// Files in the byte order of their relative paths, .gz decompressed,
// hidden ones skipped; the last tenth is validation; window i is bytes
// [i T, i T + T] of its split.
TEST(Text, CorpusSplitAndWindows) {
  TempDir d("aq-test-text");
  ::mkdir((d.str() + "/b").c_str(), 0755);
  const std::string a = text_of(300, 1), b1 = text_of(250, 2), c = text_of(450, 3);
  write(d.str() + "/a.txt", a);
  write(d.str() + "/b/one", b1);
  write_gz(d.str() + "/c.1.gz", c);
  write(d.str() + "/.hidden", "never read");
  const std::string corpus = a + b1 + c;  // "a.txt" < "b/one" < "c.1.gz"
  const size_t n = corpus.size(), val = n / 10;
  const int64_t T = 16;
  const auto train = aq::data::open("text", d.str(), Split::kTrain, context(T));
  const auto test = aq::data::open("text", d.str(), Split::kTest, context(T));
  EXPECT_EQ(train->info().name, "text");
  EXPECT_EQ(train->info().sequence, T);
  EXPECT_EQ(train->info().num_classes, 256);
  EXPECT_EQ(train->size(), static_cast<int64_t>((n - val - 1) / T));
  EXPECT_EQ(test->size(), static_cast<int64_t>((val - 1) / T));
  std::vector<int64_t> w(T + 1);
  for (int64_t i : {int64_t{0}, int64_t{7}, train->size() - 1}) {
    train->get_tokens(i, w.data());
    for (int64_t j = 0; j <= T; ++j) ASSERT_EQ(w[j], static_cast<unsigned char>(corpus[i * T + j])) << i << " " << j;
  }
  for (int64_t i : {int64_t{0}, test->size() - 1}) {
    test->get_tokens(i, w.data());
    for (int64_t j = 0; j <= T; ++j)
      ASSERT_EQ(w[j], static_cast<unsigned char>(corpus[n - val + i * T + j])) << i << " " << j;
  }
  EXPECT_THROW(train->get_tokens(train->size(), w.data()), std::invalid_argument);
  // The same folder gives the same windows.
  const auto again = aq::data::open("text", d.str(), Split::kTrain, context(T));
  std::vector<int64_t> w2(T + 1);
  again->get_tokens(5, w2.data());
  train->get_tokens(5, w.data());
  EXPECT_EQ(w, w2);
}

// Batches: inputs and targets int64 [B, T], the targets shifted by one,
// with the windows' indices; the order depends only on (seed, epoch), and a
// resumed epoch gives the same later batches.
TEST(Text, LoaderBatchesOfTokens) {
  TempDir d("aq-test-text");
  write(d.str() + "/only.txt", text_of(2000, 5));
  const int64_t T = 8;
  const auto train = aq::data::open("text", d.str(), Split::kTrain, context(T));
  aq::data::LoaderOptions lo;
  lo.batch_size = 4;
  lo.seed = 3;
  aq::data::Loader loader(train, lo);
  loader.start(1);
  auto b = loader.next();
  ASSERT_TRUE(b);
  ASSERT_EQ(b->images.sizes(), (std::vector<int64_t>{4, T}));
  ASSERT_EQ(b->labels.sizes(), (std::vector<int64_t>{4, T}));
  EXPECT_EQ(b->images.scalar_type(), torch::kInt64);
  std::vector<int64_t> w(T + 1);
  for (int64_t i = 0; i < 4; ++i) {
    train->get_tokens(b->indices[i].item<int64_t>(), w.data());
    for (int64_t j = 0; j < T; ++j) {
      EXPECT_EQ(b->images[i][j].item<int64_t>(), w[j]);
      EXPECT_EQ(b->labels[i][j].item<int64_t>(), w[j + 1]);
    }
  }
  auto second = loader.next();
  lo.workers = 2;
  aq::data::Loader resumed(train, lo);
  resumed.start(1, 1);
  auto r = resumed.next();
  ASSERT_TRUE(second && r);
  EXPECT_TRUE(torch::equal(second->indices, r->indices));
  EXPECT_TRUE(torch::equal(second->images, r->images));
}

TEST(Text, BadFoldersOneClearError) {
  TempDir d("aq-test-text");
  EXPECT_EQ(error_of(d.str() + "/missing", Split::kTrain, 8),
            "text: " + d.str() + "/missing: no such folder (give a folder of text files)");
  EXPECT_EQ(error_of(d.str(), Split::kTrain, 8), "text: " + d.str() + ": no files in it (give a folder of text files)");
  write(d.str() + "/broken.gz", std::string("\x1f\x8b\x08\x00garbage that is not deflate", 30));
  EXPECT_EQ(error_of(d.str(), Split::kTrain, 8), "text: " + d.str() + ": none of its 1 files can be read");
  write(d.str() + "/short.txt", text_of(100, 1));  // 90 training bytes, 10 validation bytes
  EXPECT_EQ(error_of(d.str(), Split::kTest, 10),
            "text: " + d.str() +
                ": the validation split (the last 10% of 100 bytes) has 10 bytes, less than one window of 11 "
                "(--context 10 + 1): give more text or a smaller --context");
  EXPECT_EQ(error_of(d.str(), Split::kTest, 9), "no error");
  EXPECT_NE(error_of(d.str(), Split::kTrain, 90).find("training split (the first 90% of 100 bytes) has 90 bytes"),
            std::string::npos);
  EXPECT_EQ(error_of(d.str(), Split::kTrain, 0), "text: --context must be at least 1, not 0");
}

// The licence texts of a Debian machine: a small real corpus.
TEST(Text, DebianLicences) {
  struct stat st;
  if (::stat("/usr/share/common-licenses", &st) != 0) GTEST_SKIP() << "no /usr/share/common-licenses";
  const auto train = aq::data::open("text", "/usr/share/common-licenses", Split::kTrain, context(256));
  const auto test = aq::data::open("text", "/usr/share/common-licenses", Split::kTest, context(256));
  EXPECT_GT(train->size(), 100);
  EXPECT_GT(test->size(), 10);
  std::vector<int64_t> w(257);
  train->get_tokens(0, w.data());
  for (int64_t t : w) EXPECT_TRUE(t >= 0 && t < 256);
}

}  // namespace
