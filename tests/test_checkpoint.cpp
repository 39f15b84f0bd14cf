// Checkpoints: round trips of every dtype and field, order, atomic writes,
// and one-line errors for every kind of bad input.
#include "aq/checkpoint.h"
#include "temp_dir.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <hdf5.h>
#include <torch/cuda.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using aq::ckpt::Checkpoint;
using aq::ckpt::load;
using aq::ckpt::save;

// A fresh folder per test, removed afterwards.  (POSIX calls rather than
// std::filesystem: libtorch.so exports its own copies of some
// std::filesystem functions, and remove_all(path, error_code&) from there
// crashes.)
class CheckpointFixture : public ::testing::Test {
 protected:
  TempDir tmp_{"aq-ckpt"};
  const std::string dir_ = tmp_.str();
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    DIR* d = ::opendir(dir_.c_str());
    if (!d) return out;
    while (const dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.emplace_back(e->d_name);
    ::closedir(d);
    return out;
  }
  // Names in the folder that look like save()'s temporary files.
  std::vector<std::string> temp_files() const {
    std::vector<std::string> out;
    for (const auto& e : entries())
      if (e.find(".tmp") != std::string::npos) out.push_back(e);
    return out;
  }
};
using CheckpointRoundTrip = CheckpointFixture;
using CheckpointSave = CheckpointFixture;
using CheckpointLoad = CheckpointFixture;
using CheckpointLayout = CheckpointFixture;

std::string read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_bytes(const std::string& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Same dtype, shape and bytes (bit-exact, NaN payloads included).
void expect_identical(const torch::Tensor& got, const torch::Tensor& want, const std::string& key) {
  SCOPED_TRACE(key);
  ASSERT_TRUE(got.defined());
  EXPECT_EQ(got.scalar_type(), want.scalar_type());
  EXPECT_EQ(got.sizes(), want.sizes());
  EXPECT_TRUE(got.device().is_cpu());
  EXPECT_TRUE(got.is_contiguous());
  torch::Tensor w = want.contiguous();
  ASSERT_EQ(got.numel() * got.element_size(), w.numel() * w.element_size());
  if (w.numel() > 0) {
    EXPECT_EQ(std::memcmp(got.data_ptr(), w.data_ptr(), w.numel() * w.element_size()), 0);
  }
}

void expect_same_list(const aq::ckpt::Tensors& got, const aq::ckpt::Tensors& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first);
    expect_identical(got[i].second, want[i].second, want[i].first);
  }
}

// Random bit patterns of a 2-byte type: every pattern, NaNs included, must survive.
torch::Tensor random_bits16(c10::ScalarType st, int64_t n) {
  return torch::randint(-32768, 32768, {n}, torch::kInt16).view(st);
}

// The error message of f(), which must throw std::runtime_error.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no std::runtime_error";
  return "";
}

// HDF5 files and objects still open in the process (none after a failure).
ssize_t open_hdf5_objects() { return H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL); }

// Loads `p` and checks that the error is exactly `want`, on one line, that
// HDF5 printed nothing and that nothing was left open.
void expect_load_error(const std::string& p, const std::string& want) {
  testing::internal::CaptureStderr();
  std::string got = error_of([&] { load(p); });
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(got, want);
  EXPECT_EQ(got.find('\n'), std::string::npos);
  EXPECT_EQ(err, "");
  EXPECT_EQ(open_hdf5_objects(), 0);
}

Checkpoint small_checkpoint() {
  Checkpoint c;
  c.meta["arch"] = "resnet18";
  c.counters["epoch"] = 3;
  c.scalars["lr"] = 0.1;
  c.parameters.emplace_back("conv1.weight", torch::randn({4, 3, 3, 3}));
  c.buffers.emplace_back("bn1.running_mean", torch::zeros({4}));
  c.metric_columns = {"epoch", "train_loss"};
  c.metric_rows = {{1, 2.5}, {2, 1.25}};
  return c;
}

// Writes the root attributes of an aq checkpoint to an open HDF5 file.
void write_root_attrs(hid_t f, const char* format, int64_t version) {
  hid_t str = H5Tcopy(H5T_C_S1);
  H5Tset_size(str, H5T_VARIABLE);
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(f, "format", str, space, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, str, &format);
  H5Aclose(a);
  a = H5Acreate2(f, "version", H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_INT64, &version);
  H5Aclose(a);
  H5Sclose(space);
  H5Tclose(str);
}

// Rewrites the string attribute `name` of object `obj` in an existing file.
void set_string_attr(const std::string& file, const std::string& obj, const char* name, const char* value) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  hid_t o = H5Oopen(f, obj.c_str(), H5P_DEFAULT);
  ASSERT_GE(o, 0);
  H5Adelete(o, name);
  hid_t str = H5Tcopy(H5T_C_S1);
  H5Tset_size(str, H5T_VARIABLE);
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(o, name, str, space, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(H5Awrite(a, str, &value), 0);
  H5Aclose(a);
  H5Sclose(space);
  H5Tclose(str);
  H5Oclose(o);
  ASSERT_GE(H5Fclose(f), 0);
}

// Points standard input at `file` (or closes it) for one scope.
class StdinFrom {
 public:
  explicit StdinFrom(const std::string& file) : saved_(::dup(0)) {
    if (file.empty()) {
      ::close(0);
      return;
    }
    int fd = ::open(file.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    ::dup2(fd, 0);
    ::close(fd);
  }
  ~StdinFrom() {
    ::dup2(saved_, 0);
    ::close(saved_);
  }
  StdinFrom(const StdinFrom&) = delete;
  StdinFrom& operator=(const StdinFrom&) = delete;

 private:
  int saved_;
};

// ---------------------------------------------------------------- round trips

TEST_F(CheckpointRoundTrip, EveryDtypeBitExact) {
  torch::manual_seed(1);
  Checkpoint c;
  auto f32 = torch::randn({5, 7});
  f32[0][0] = std::numeric_limits<float>::infinity();
  f32[0][1] = -0.0f;
  f32[0][2] = std::numeric_limits<float>::denorm_min();
  f32[0][3] = std::numeric_limits<float>::quiet_NaN();
  c.parameters = {
      {"f32", f32},
      {"f64", torch::randn({3, 2}, torch::kFloat64) * 1e300},
      {"f16", random_bits16(torch::kFloat16, 4096)},
      {"bf16", random_bits16(torch::kBFloat16, 4096)},
      {"i8", torch::randint(-128, 128, {300}, torch::kInt8)},
      {"i16", torch::randint(-32768, 32768, {300}, torch::kInt16)},
      {"i32", torch::randint(INT32_MIN, INT32_MAX, {300}, torch::kInt32)},
      {"i64", torch::tensor({INT64_MIN, int64_t{-1}, int64_t{0}, INT64_MAX}, torch::kInt64)},
      {"u8", torch::randint(0, 256, {2, 3, 4}, torch::kUInt8)},
      {"bool", torch::rand({33}) > 0.5},
  };
  c.rng.emplace_back("cpu", at::detail::getDefaultCPUGenerator().get_state());
  save(path("a.h5"), c);
  Checkpoint r = load(path("a.h5"));
  expect_same_list(r.parameters, c.parameters);
  expect_same_list(r.rng, c.rng);
  EXPECT_EQ(r.rng[0].second.scalar_type(), torch::kUInt8);
  // The restored generator state is usable as is: it replays the same numbers.
  auto gen = at::detail::getDefaultCPUGenerator();
  gen.set_state(c.rng[0].second);
  torch::Tensor x = torch::randn({8});
  gen.set_state(r.rng[0].second);
  EXPECT_TRUE(torch::equal(torch::randn({8}), x));
}

TEST_F(CheckpointRoundTrip, ZeroDimEmptyAndNonContiguous) {
  auto base = torch::arange(24, torch::kFloat32).reshape({4, 6});
  Checkpoint c;
  c.buffers = {
      {"num_batches_tracked", torch::tensor(int64_t{17})},  // 0-d
      {"half0d", torch::tensor(1.5).to(torch::kFloat16)},
      {"empty", torch::empty({0})},
      {"empty3", torch::empty({3, 0, 2}, torch::kInt32)},
      {"transposed", base.t()},
      {"strided", base.slice(1, 0, 6, 2)},
      {"expanded", torch::arange(3, torch::kFloat64).expand({4, 3})},
      {"bool_view", (base > 10).t()},
  };
  save(path("a.h5"), c);
  Checkpoint r = load(path("a.h5"));
  ASSERT_EQ(r.buffers.size(), c.buffers.size());
  for (size_t i = 0; i < c.buffers.size(); ++i) {
    EXPECT_EQ(r.buffers[i].first, c.buffers[i].first);
    expect_identical(r.buffers[i].second, c.buffers[i].second, c.buffers[i].first);
  }
  EXPECT_EQ(r.buffers[0].second.dim(), 0);
  EXPECT_EQ(r.buffers[0].second.item<int64_t>(), 17);
  EXPECT_EQ(r.buffers[3].second.sizes(), (std::vector<int64_t>{3, 0, 2}));
  EXPECT_TRUE(torch::equal(r.buffers[4].second, base.t()));
}

TEST_F(CheckpointRoundTrip, CudaTensorsComeBackOnCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  Checkpoint c;
  c.parameters.emplace_back("w", torch::randn({3, 5}, torch::kCUDA).t());
  c.parameters.emplace_back("h", torch::randn({7}, torch::kCUDA).to(torch::kFloat16));
  save(path("a.h5"), c);
  Checkpoint r = load(path("a.h5"));
  ASSERT_EQ(r.parameters.size(), 2u);
  for (size_t i = 0; i < 2; ++i)
    expect_identical(r.parameters[i].second, c.parameters[i].second.cpu(), c.parameters[i].first);
}

TEST_F(CheckpointRoundTrip, TenMegabyteTensor) {
  Checkpoint c;
  c.parameters = {{"fc.weight", torch::randn({1000, 2621})}};  // 10.5 MB
  save(path("big.h5"), c);
  EXPECT_GT(read_bytes(path("big.h5")).size(), 10'000'000u);
  Checkpoint r = load(path("big.h5"));
  expect_same_list(r.parameters, c.parameters);
}

TEST_F(CheckpointRoundTrip, InsertionOrderOfFiftyDottedNames) {
  // Names in an order that is neither sorted nor reverse sorted.
  Checkpoint c;
  for (int i = 0; i < 50; ++i) {
    int j = (i * 17) % 50;
    std::string name = "layer" + std::to_string(j % 4 + 1) + "." + std::to_string(j) + ".conv" + std::to_string(j % 3) +
                       (j % 2 ? ".weight" : ".bias");
    c.parameters.emplace_back(name, torch::full({2}, static_cast<float>(j)));
    c.optimizer.emplace_back(name + ".momentum_buffer", torch::full({2}, static_cast<float>(-j)));
  }
  c.buffers = {{"z.running_var", torch::ones({1})}, {"a.running_mean", torch::zeros({1})}};
  save(path("a.h5"), c);
  Checkpoint r = load(path("a.h5"));
  expect_same_list(r.parameters, c.parameters);
  expect_same_list(r.optimizer, c.optimizer);
  expect_same_list(r.buffers, c.buffers);
}

TEST_F(CheckpointRoundTrip, MetaCountersScalarsMetrics) {
  Checkpoint c;
  c.meta = {{"arch", "resnet18"},
            {"config",
             "-c quantize --ca=True --cabits=2 --ibits=8 --pergroup=True --perlayer=True "
             "--usegradient=False --level L3"},
            {"command", "aq-train --arch resnet18 \"quoted\" 'x'"},
            {"empty", ""},
            {"utf8", "größe \xE2\x9C\x93"},
            {"long", std::string(200000, 'x')}};
  c.counters = {{"epoch", 90}, {"step", int64_t{1} << 40}, {"batch", 0}, {"negative", -5}};
  c.scalars = {{"lr", 0.1}, {"momentum", 0.9}, {"tiny", 1e-300}, {"inf", HUGE_VAL}};
  c.metric_columns = {"epoch",    "lr",       "train_loss", "train_acc", "val_loss",
                      "val_top1", "val_top5", "img_per_s",  "act_mb",    "peak_mb"};
  for (int e = 1; e <= 3; ++e) {
    std::vector<double> row;
    for (int k = 0; k < 10; ++k) row.push_back(e * 10 + k + 0.125);
    c.metric_rows.push_back(row);
  }
  save(path("a.h5"), c);
  Checkpoint r = load(path("a.h5"));
  EXPECT_EQ(r.meta, c.meta);
  EXPECT_EQ(r.counters, c.counters);
  EXPECT_EQ(r.scalars, c.scalars);
  EXPECT_EQ(r.metric_columns, c.metric_columns);
  EXPECT_EQ(r.metric_rows, c.metric_rows);
  EXPECT_TRUE(r.parameters.empty() && r.buffers.empty() && r.optimizer.empty() && r.rng.empty());

  // No rows yet: the columns still come back.
  c.metric_rows.clear();
  save(path("a.h5"), c);
  r = load(path("a.h5"));
  EXPECT_EQ(r.metric_columns, c.metric_columns);
  EXPECT_TRUE(r.metric_rows.empty());

  // Nothing at all.
  save(path("empty.h5"), Checkpoint{});
  r = load(path("empty.h5"));
  EXPECT_TRUE(r.meta.empty() && r.counters.empty() && r.scalars.empty() && r.metric_columns.empty() &&
              r.metric_rows.empty() && r.parameters.empty());
}

// ---------------------------------------------------------------- layout

TEST_F(CheckpointLayout, MatchesTheManPage) {
  Checkpoint c = small_checkpoint();
  c.parameters.emplace_back("h", torch::ones({2}, torch::kFloat16));
  c.parameters.emplace_back("b", torch::ones({2}, torch::kBFloat16));
  save(path("a.h5"), c);
  hid_t f = H5Fopen(path("a.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  int64_t version = 0;
  hid_t a = H5Aopen(f, "version", H5P_DEFAULT);
  H5Aread(a, H5T_NATIVE_INT64, &version);
  H5Aclose(a);
  EXPECT_EQ(version, 1);
  a = H5Aopen(f, "format", H5P_DEFAULT);
  hid_t t = H5Aget_type(a);
  EXPECT_TRUE(H5Tis_variable_str(t) > 0);
  EXPECT_EQ(H5Tget_cset(t), H5T_CSET_UTF8);
  H5Tclose(t);
  H5Aclose(a);
  for (const char* g :
       {"/meta", "/counters", "/scalars", "/model/parameters", "/model/buffers", "/optimizer", "/adaptive", "/rng"})
    EXPECT_GT(H5Lexists(f, g, H5P_DEFAULT), 0) << g;
  EXPECT_GT(H5Aexists_by_name(f, "/meta", "arch", H5P_DEFAULT), 0);

  // float32 parameter: 4-byte little-endian IEEE float of the tensor's shape, with a dtype attribute.
  hid_t d = H5Dopen2(f, "/model/parameters/conv1.weight", H5P_DEFAULT);
  ASSERT_GE(d, 0);
  t = H5Dget_type(d);
  EXPECT_GT(H5Tequal(t, H5T_IEEE_F32LE), 0);
  H5Tclose(t);
  hid_t s = H5Dget_space(d);
  hsize_t dims[4];
  ASSERT_EQ(H5Sget_simple_extent_dims(s, dims, nullptr), 4);
  EXPECT_EQ(dims[0], 4u);
  EXPECT_EQ(dims[3], 3u);
  H5Sclose(s);
  EXPECT_GT(H5Aexists(d, "dtype"), 0);
  H5Dclose(d);

  // float16: IEEE half; bfloat16: uint16 bit patterns.
  d = H5Dopen2(f, "/model/parameters/h", H5P_DEFAULT);
  t = H5Dget_type(d);
  EXPECT_EQ(H5Tget_class(t), H5T_FLOAT);
  EXPECT_EQ(H5Tget_size(t), 2u);
  EXPECT_EQ(H5Tget_ebias(t), 15u);
  H5Tclose(t);
  H5Dclose(d);
  d = H5Dopen2(f, "/model/parameters/b", H5P_DEFAULT);
  t = H5Dget_type(d);
  EXPECT_GT(H5Tequal(t, H5T_STD_U16LE), 0);
  H5Tclose(t);
  H5Dclose(d);

  // Metrics: float64 [rows, columns] with the column names.
  d = H5Dopen2(f, "/metrics", H5P_DEFAULT);
  ASSERT_GE(d, 0);
  s = H5Dget_space(d);
  ASSERT_EQ(H5Sget_simple_extent_dims(s, dims, nullptr), 2);
  EXPECT_EQ(dims[0], 2u);
  EXPECT_EQ(dims[1], 2u);
  H5Sclose(s);
  EXPECT_GT(H5Aexists(d, "columns"), 0);
  H5Dclose(d);
  EXPECT_GE(H5Fclose(f), 0);
}

// ---------------------------------------------------------------- save

TEST_F(CheckpointSave, OverwritesAndLeavesNoTemporaryFile) {
  Checkpoint c = small_checkpoint();
  save(path("a.h5"), c);
  c.counters["epoch"] = 4;
  save(path("a.h5"), c);
  EXPECT_EQ(load(path("a.h5")).counters.at("epoch"), 4);
  EXPECT_TRUE(temp_files().empty());
  EXPECT_EQ(entries(), std::vector<std::string>{"a.h5"});
}

TEST_F(CheckpointSave, RejectedInputLeavesOldFileIntact) {
  save(path("a.h5"), small_checkpoint());
  const std::string before = read_bytes(path("a.h5"));
  ASSERT_GT(before.size(), 1000u);

  Checkpoint bad = small_checkpoint();
  bad.parameters.emplace_back("layer1/conv", torch::ones({1}));
  EXPECT_THROW(save(path("a.h5"), bad), std::invalid_argument);

  bad = small_checkpoint();
  bad.optimizer.emplace_back("spectrum", torch::ones({2}, torch::kComplexFloat));
  try {
    save(path("a.h5"), bad);
    ADD_FAILURE() << "complex tensor accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("/optimizer/spectrum"), std::string::npos) << e.what();
  }

  bad = small_checkpoint();
  bad.metric_rows.push_back({1.0});  // 1 value for 2 columns
  EXPECT_THROW(save(path("a.h5"), bad), std::invalid_argument);

  bad = small_checkpoint();
  bad.buffers.emplace_back("bn1.running_mean", torch::ones({1}));  // duplicate
  EXPECT_THROW(save(path("a.h5"), bad), std::invalid_argument);

  bad = small_checkpoint();
  bad.buffers.emplace_back("undefined", torch::Tensor());
  EXPECT_THROW(save(path("a.h5"), bad), std::invalid_argument);

  EXPECT_EQ(read_bytes(path("a.h5")), before);
  EXPECT_TRUE(temp_files().empty());
}

TEST_F(CheckpointSave, MissingFolderIsARuntimeError) {
  const std::string p = path("no/such/folder/a.h5");
  std::string e = error_of([&] { save(p, small_checkpoint()); });
  EXPECT_EQ(e.rfind("cannot write checkpoint " + p + ": ", 0), 0u) << e;
  EXPECT_NE(e.find("No such file or directory"), std::string::npos) << e;
  EXPECT_NE(::access(p.c_str(), F_OK), 0);
}

TEST_F(CheckpointSave, FailedRenameRemovesTemporaryFile) {
  // The destination is a non-empty folder: everything succeeds until rename().
  ASSERT_EQ(::mkdir(path("a.h5").c_str(), 0777), 0);
  write_bytes(path("a.h5/keep"), "x");
  std::string e = error_of([&] { save(path("a.h5"), small_checkpoint()); });
  EXPECT_EQ(e.rfind("cannot write checkpoint " + path("a.h5") + ": ", 0), 0u) << e;
  struct stat st {};
  EXPECT_TRUE(::stat(path("a.h5").c_str(), &st) == 0 && S_ISDIR(st.st_mode));
  EXPECT_EQ(read_bytes(path("a.h5/keep")), "x");
  EXPECT_TRUE(temp_files().empty());
  EXPECT_EQ(open_hdf5_objects(), 0);
}

// ---------------------------------------------------------------- load errors

TEST_F(CheckpointLoad, MissingFile) { expect_load_error(path("nope.h5"), path("nope.h5") + ": no such file"); }

TEST_F(CheckpointLoad, TextFile) {
  write_bytes(path("a.txt"), "epoch,loss\n1,2.5\n");
  expect_load_error(path("a.txt"), path("a.txt") + ": not an HDF5 file");
  write_bytes(path("empty"), "");
  expect_load_error(path("empty"), path("empty") + ": not an HDF5 file");
}

TEST_F(CheckpointLoad, TruncatedCheckpoint) {
  Checkpoint c = small_checkpoint();
  c.parameters.emplace_back("fc.weight", torch::randn({256, 256}));
  save(path("a.h5"), c);
  const std::string bytes = read_bytes(path("a.h5"));
  write_bytes(path("half.h5"), bytes.substr(0, bytes.size() / 2));
  expect_load_error(path("half.h5"), path("half.h5") + ": truncated or corrupt HDF5 file");
  write_bytes(path("tail.h5"), bytes.substr(0, bytes.size() - 100));
  expect_load_error(path("tail.h5"), path("tail.h5") + ": truncated or corrupt HDF5 file");
}

TEST_F(CheckpointLoad, ForeignHdf5File) {
  hid_t f = H5Fcreate(path("plain.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  ASSERT_GE(H5Fclose(f), 0);
  expect_load_error(path("plain.h5"), path("plain.h5") + ": not an aq checkpoint (no 'format' attribute)");

  f = H5Fcreate(path("xyz.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  write_root_attrs(f, "xyz", 1);
  ASSERT_GE(H5Fclose(f), 0);
  expect_load_error(path("xyz.h5"), path("xyz.h5") + ": not an aq checkpoint (format is 'xyz')");
}

TEST_F(CheckpointLoad, NewerVersion) {
  hid_t f = H5Fcreate(path("v7.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  write_root_attrs(f, "aq-checkpoint", 7);
  ASSERT_GE(H5Fclose(f), 0);
  expect_load_error(path("v7.h5"), path("v7.h5") + ": checkpoint format version 7 is newer than this aq reads (1)");
}

TEST_F(CheckpointLoad, MissingGroupsAreEmpty) {
  // Only the root attributes, as another writer might leave it.
  hid_t f = H5Fcreate(path("bare.h5").c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  write_root_attrs(f, "aq-checkpoint", 1);
  ASSERT_GE(H5Fclose(f), 0);
  Checkpoint r = load(path("bare.h5"));
  EXPECT_TRUE(r.meta.empty() && r.counters.empty() && r.scalars.empty() && r.parameters.empty() && r.buffers.empty() &&
              r.optimizer.empty() && r.rng.empty() && r.metric_columns.empty() && r.metric_rows.empty());
}

TEST_F(CheckpointLoad, AdaptiveStateOfFilesWithoutTheAdaptiveGroup) {
  // Files written before /adaptive existed kept adaptive precision's state
  // in /optimizer beside the momentum buffers.
  Checkpoint c = small_checkpoint();
  c.optimizer = {{"conv.weight.momentum_buffer", torch::ones({2})},
                 {"conv.aq_budget", torch::scalar_tensor(2.5, torch::kDouble)},
                 {"conv.aq_sample_stat", torch::full({4}, -1.0f)}};
  save(path("old.h5"), c);
  hid_t f = H5Fopen(path("old.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  ASSERT_GE(H5Ldelete(f, "/adaptive", H5P_DEFAULT), 0);
  ASSERT_GE(H5Fclose(f), 0);
  const Checkpoint r = load(path("old.h5"));
  ASSERT_EQ(r.optimizer.size(), 1u);
  EXPECT_EQ(r.optimizer[0].first, "conv.weight.momentum_buffer");
  ASSERT_EQ(r.adaptive.size(), 2u);
  EXPECT_EQ(r.adaptive[0].first, "conv.aq_budget");
  EXPECT_EQ(r.adaptive[1].first, "conv.aq_sample_stat");
  EXPECT_TRUE(r.adaptive[1].second.equal(torch::full({4}, -1.0f)));
  // A file with the group keeps what /optimizer holds as it is.
  save(path("new.h5"), c);
  EXPECT_EQ(load(path("new.h5")).optimizer.size(), 3u);
}

TEST_F(CheckpointLoad, UnknownOrMismatchedDtypeIsCorrupt) {
  const std::string corrupt = ": truncated or corrupt HDF5 file (";
  save(path("a.h5"), small_checkpoint());
  set_string_attr(path("a.h5"), "/model/parameters/conv1.weight", "dtype", "float128");
  std::string e = error_of([&] { load(path("a.h5")); });
  EXPECT_EQ(e.rfind(path("a.h5") + corrupt, 0), 0u) << e;
  EXPECT_NE(e.find("float128"), std::string::npos) << e;
  EXPECT_EQ(open_hdf5_objects(), 0);

  save(path("b.h5"), small_checkpoint());
  set_string_attr(path("b.h5"), "/model/parameters/conv1.weight", "dtype", "int64");  // stored as float32
  e = error_of([&] { load(path("b.h5")); });
  EXPECT_EQ(e.rfind(path("b.h5") + corrupt, 0), 0u) << e;
}

// ---------------------------------------------------------------- standard input

TEST_F(CheckpointLoad, StandardInput) {
  Checkpoint c = small_checkpoint();
  save(path("a.h5"), c);
  {
    StdinFrom in(path("a.h5"));
    Checkpoint r = load("-");
    expect_same_list(r.parameters, c.parameters);
    EXPECT_EQ(r.metric_rows, c.metric_rows);
    EXPECT_EQ(r.meta, c.meta);
  }
  EXPECT_TRUE(temp_files().empty());

  const std::string bytes = read_bytes(path("a.h5"));
  write_bytes(path("half.h5"), bytes.substr(0, bytes.size() / 2));
  {
    StdinFrom in(path("half.h5"));
    expect_load_error("-", "standard input: truncated or corrupt HDF5 file");
  }
  write_bytes(path("empty"), "");
  {
    StdinFrom in(path("empty"));
    expect_load_error("-", "standard input: not an HDF5 file (empty input)");
  }
  {
    StdinFrom in("");  // closed
    std::string e = error_of([] { load("-"); });
    EXPECT_EQ(e.rfind("standard input: cannot read (", 0), 0u) << e;
  }
  EXPECT_GE(::fcntl(0, F_GETFD), 0);  // restored
}

// A damaged length in the global heap that holds the variable-length
// strings (/meta, column names) made HDF5 read far past it and crash.
TEST_F(CheckpointLoad, DamagedStringHeapIsAnErrorNotACrash) {
  save(path("a.h5"), small_checkpoint());
  std::string bytes = read_bytes(path("a.h5"));
  const size_t heap = bytes.find("GCOL");
  ASSERT_NE(heap, std::string::npos);
  for (size_t at : {heap + 28, heap + 27, heap + 15}) {  // the first object's length, the collection's size
    std::string bad = bytes;
    bad[at] = static_cast<char>(bad[at] ^ 0xff);
    write_bytes(path("bad.h5"), bad);
    testing::internal::CaptureStderr();
    const std::string e = error_of([&] { load(path("bad.h5")); });
    testing::internal::GetCapturedStderr();
    EXPECT_EQ(e.rfind(path("bad.h5") + ": truncated or corrupt HDF5 file", 0), 0u) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos);
    EXPECT_EQ(open_hdf5_objects(), 0);
  }
}

// A stream that never ends and holds no HDF5 file is given up on early; one
// that goes on after its file is read up to the file's end.
TEST_F(CheckpointLoad, EndlessStreamsAreReadBoundedly) {
  expect_load_error("/dev/zero", "/dev/zero: not an HDF5 file (no signature in its first MiB)");
  Checkpoint c = small_checkpoint();
  save(path("a.h5"), c);
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const std::string bytes = read_bytes(path("a.h5")) + std::string(1 << 16, '\0');
  const pid_t child = ::fork();
  if (child == 0) {  // writes the file, then zeros until the reader goes
    ::close(fds[0]);
    ::signal(SIGPIPE, SIG_DFL);
    if (::write(fds[1], bytes.data(), bytes.size()) < 0) ::_exit(0);
    const std::string zeros(1 << 16, '\0');
    while (::write(fds[1], zeros.data(), zeros.size()) > 0) {
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  const std::string dev = "/dev/fd/" + std::to_string(fds[0]);
  Checkpoint r = load(dev);
  ::close(fds[0]);
  ::waitpid(child, nullptr, 0);
  EXPECT_EQ(r.meta, c.meta);
  expect_same_list(r.parameters, c.parameters);
}

// A write that fails half-way (a full disk; here a file size limit) is one
// line naming the system's reason, leaves no file, and the process exits
// cleanly afterwards (HDF5 crashed at exit closing the failed file again).
TEST_F(CheckpointSave, FailedWriteIsOneLineAndExitIsClean) {
  Checkpoint c = small_checkpoint();
  c.parameters.emplace_back("fc.weight", torch::randn({512, 512}));
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim {};
    lim.rlim_cur = lim.rlim_max = 64 << 10;
    ::setrlimit(RLIMIT_FSIZE, &lim);
    std::string msg = "no error";
    try {
      save(path("a.h5"), c);
    } catch (const std::runtime_error& e) {
      msg = e.what();
    }
    if (::write(fds[1], msg.data(), msg.size()) < 0) ::_exit(3);
    ::close(fds[1]);
    std::exit(0);  // runs HDF5's clean-up at exit, if any
  }
  ::close(fds[1]);
  std::string msg;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
  EXPECT_EQ(msg.rfind("cannot write checkpoint " + path("a.h5") + ": ", 0), 0u) << msg;
  EXPECT_NE(msg.find("File too large"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_TRUE(entries().empty());
}

// Every dataset with data is written with HDF5's Fletcher-32 checksum, which
// is verified on read: one flipped bit of tensor data is an error naming the
// dataset, not a silently different model.
TEST_F(CheckpointLoad, FlippedDataBitIsAChecksumError) {
  Checkpoint c = small_checkpoint();
  torch::Tensor w = torch::arange(1000, torch::kInt32).add(0x5a5a0000);  // bytes easy to find
  c.parameters.emplace_back("fc.weight", w);
  save(path("a.h5"), c);
  {
    hid_t f = H5Fopen(path("a.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    for (const char* ds_name : {"/model/parameters/fc.weight", "/model/parameters/conv1.weight", "/metrics"}) {
      hid_t ds = H5Dopen2(f, ds_name, H5P_DEFAULT);
      hid_t dcpl = H5Dget_create_plist(ds);
      unsigned flags = 0;
      size_t n = 0;
      EXPECT_EQ(H5Pget_nfilters(dcpl), 1) << ds_name;
      EXPECT_EQ(H5Pget_filter2(dcpl, 0, &flags, &n, nullptr, 0, nullptr, nullptr), H5Z_FILTER_FLETCHER32) << ds_name;
      H5Pclose(dcpl);
      H5Dclose(ds);
    }
    H5Fclose(f);
  }
  std::string bytes = read_bytes(path("a.h5"));
  const int32_t v = 0x5a5a0000 + 500;
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(&v), 4));
  ASSERT_NE(at, std::string::npos);
  bytes[at] = static_cast<char>(bytes[at] ^ 1);
  write_bytes(path("flip.h5"), bytes);
  expect_load_error(path("flip.h5"), path("flip.h5") +
                                          ": truncated or corrupt HDF5 file (/model/parameters/fc.weight: checksum "
                                          "mismatch (the data is damaged))");
}

}  // namespace
