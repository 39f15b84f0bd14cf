// Training checkpoints as HDF5 files, through HDF5's C API (layout:
// man/aq-checkpoint.5).
//
// HDF5 is built without thread safety here, so save() and load() must not
// run concurrently from several threads (the library's global state, its
// error stack included, is shared).
#include "aq/checkpoint.h"
#include "files.h"

#include <hdf5.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>
#include <stdexcept>
#include <utility>

namespace aq::ckpt {
namespace {

// ---------------------------------------------------------------- errors

// The innermost message on HDF5's error stack: where the failure was first
// detected, which for I/O failures carries the errno text.  It must be read
// before the next HDF5 call, which clears the stack.
// I/O failures read "file write failed: time = ..., filename = ..., errno =
// 28, error message = 'No space left on device', ..." over several lines:
// only the operation and the system's message are kept.
std::string h5_reason() {
  std::string out;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
        if (e->desc && *e->desc) *static_cast<std::string*>(data) = e->desc;
        return 0;
      },
      &out);
  const std::string key = "error message = '";
  const size_t m = out.find(key);
  if (m != std::string::npos) {
    const size_t end = out.find('\'', m + key.size());
    const size_t colon = out.find(':');
    out = (colon != std::string::npos && colon < m ? out.substr(0, colon) + ": " : std::string()) +
          out.substr(m + key.size(), end == std::string::npos ? std::string::npos : end - m - key.size());
  }
  for (char& ch : out)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return out;
}

// A file whose write failed (a full disk) stays half-closed in HDF5, which
// crashes closing it again when it cleans up at exit.  The process's exit
// frees everything anyway: no clean-up at exit.  (It must precede every
// other HDF5 call, hence a static initialiser of the library.)
const bool kNoCleanupAtExit = [] {
  H5dont_atexit();
  return true;
}();

// An HDF5 call failed.
struct H5Error : std::runtime_error {
  explicit H5Error(const std::string& what) : std::runtime_error(with_reason(what)) {}
  static std::string with_reason(const std::string& what) {
    std::string r = h5_reason();
    return r.empty() ? what : what + " (" + r + ")";
  }
};
// A file that HDF5 reads but whose structure is wrong (load: "corrupt").
struct Corrupt : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A load error whose text is shown as is after the file's name.
struct Problem : std::runtime_error {
  using std::runtime_error::runtime_error;
};

herr_t check(herr_t r, const std::string& what) {
  if (r < 0) throw H5Error(what);
  return r;
}

// ---------------------------------------------------------------- handles

// Owns one hid_t and closes it with the matching H5?close.
class Hid {
 public:
  using Closer = herr_t (*)(hid_t);
  Hid() = default;
  Hid(hid_t id, Closer close, const std::string& what) : id_(id), close_(close) {
    if (id_ < 0) throw H5Error(what);
  }
  Hid(Hid&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)), close_(o.close_) {}
  Hid& operator=(Hid&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
      close_ = o.close_;
    }
    return *this;
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  ~Hid() { reset(); }

  operator hid_t() const { return id_; }  // NOLINT: handles pass straight to the C API
  // Closes now and reports failure (H5Fclose is where buffered data is written).
  void close(const std::string& what) {
    herr_t r = close_(std::exchange(id_, H5I_INVALID_HID));
    check(r, what);
  }

 private:
  void reset() {
    if (id_ >= 0) close_(id_);
    id_ = H5I_INVALID_HID;
  }
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

Hid plist(hid_t cls) { return Hid(H5Pcreate(cls), H5Pclose, "cannot create a property list"); }
Hid type_copy(hid_t t) { return Hid(H5Tcopy(t), H5Tclose, "cannot copy a datatype"); }
Hid scalar_space() { return Hid(H5Screate(H5S_SCALAR), H5Sclose, "cannot create a dataspace"); }
Hid simple_space(const std::vector<hsize_t>& dims) {
  return Hid(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose,
             "cannot create a dataspace");
}

// Variable-length UTF-8 strings, which h5py reads as str.
Hid vlen_string_type() {
  Hid t = type_copy(H5T_C_S1);
  check(H5Tset_size(t, H5T_VARIABLE), "cannot make a string type");
  check(H5Tset_cset(t, H5T_CSET_UTF8), "cannot make a string type");
  return t;
}

// IEEE binary16, little-endian; h5py reads it as numpy float16.
Hid half_type() {
  Hid t = type_copy(H5T_IEEE_F32LE);
  check(H5Tset_fields(t, 15, 10, 5, 0, 10), "cannot make a float16 type");
  check(H5Tset_size(t, 2), "cannot make a float16 type");
  check(H5Tset_ebias(t, 15), "cannot make a float16 type");
  return t;
}

// ---------------------------------------------------------------- dtypes

struct DType {
  c10::ScalarType st;
  const char* name;
  H5T_class_t cls;  // stored class
  size_t size;      // stored bytes per element
  bool is_signed;   // for integers
};

const DType kDTypes[] = {
    {torch::kFloat32, "float32", H5T_FLOAT, 4, true}, {torch::kFloat64, "float64", H5T_FLOAT, 8, true},
    {torch::kFloat16, "float16", H5T_FLOAT, 2, true}, {torch::kBFloat16, "bfloat16", H5T_INTEGER, 2, false},
    {torch::kInt8, "int8", H5T_INTEGER, 1, true},     {torch::kInt16, "int16", H5T_INTEGER, 2, true},
    {torch::kInt32, "int32", H5T_INTEGER, 4, true},   {torch::kInt64, "int64", H5T_INTEGER, 8, true},
    {torch::kUInt8, "uint8", H5T_INTEGER, 1, false},  {torch::kBool, "bool", H5T_INTEGER, 1, false},
};

const DType* find_dtype(c10::ScalarType st) {
  for (const auto& d : kDTypes)
    if (d.st == st) return &d;
  return nullptr;
}
const DType* find_dtype(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

// The type in the file (file = true) or in memory; the two only differ in
// byte order, and this library targets little-endian hosts where they match.
Hid h5_type(const DType& d, bool file) {
  switch (d.st) {
    case torch::kFloat32:
      return type_copy(file ? H5T_IEEE_F32LE : H5T_NATIVE_FLOAT);
    case torch::kFloat64:
      return type_copy(file ? H5T_IEEE_F64LE : H5T_NATIVE_DOUBLE);
    case torch::kFloat16:
      return half_type();
    case torch::kBFloat16:
      return type_copy(file ? H5T_STD_U16LE : H5T_NATIVE_UINT16);
    case torch::kInt8:
      return type_copy(file ? H5T_STD_I8LE : H5T_NATIVE_INT8);
    case torch::kInt16:
      return type_copy(file ? H5T_STD_I16LE : H5T_NATIVE_INT16);
    case torch::kInt32:
      return type_copy(file ? H5T_STD_I32LE : H5T_NATIVE_INT32);
    case torch::kInt64:
      return type_copy(file ? H5T_STD_I64LE : H5T_NATIVE_INT64);
    default:
      return type_copy(file ? H5T_STD_U8LE : H5T_NATIVE_UINT8);  // uint8, bool
  }
}

// ---------------------------------------------------------------- groups

struct TensorGroup {
  const char* path;  // inside the file
  Tensors Checkpoint::*member;
};
const TensorGroup kTensorGroups[] = {
    {"/model/parameters", &Checkpoint::parameters},
    {"/model/buffers", &Checkpoint::buffers},
    {"/optimizer", &Checkpoint::optimizer},
    {"/adaptive", &Checkpoint::adaptive},
    {"/rng", &Checkpoint::rng},
};

// ---------------------------------------------------------------- save

void validate_name(const std::string& where, const std::string& key) {
  if (key.empty()) throw std::invalid_argument("checkpoint: empty name in " + where);
  if (key.find('\0') != std::string::npos)
    throw std::invalid_argument("checkpoint: name in " + where + " contains a NUL byte");
}

// Everything save() can reject is rejected before any file is created.
void validate(const Checkpoint& c) {
  for (const auto& [k, v] : c.meta) {
    validate_name("/meta", k);
    if (v.find('\0') != std::string::npos)
      throw std::invalid_argument("checkpoint: /meta value '" + k + "' contains a NUL byte");
  }
  for (const auto& kv : c.counters) validate_name("/counters", kv.first);
  for (const auto& kv : c.scalars) validate_name("/scalars", kv.first);
  for (const auto& g : kTensorGroups) {
    std::set<std::string> seen;
    for (const auto& [key, t] : c.*g.member) {
      validate_name(g.path, key);
      const std::string full = std::string(g.path) + "/" + key;
      if (key.find('/') != std::string::npos || key == "." || key == "..")
        throw std::invalid_argument("checkpoint: invalid tensor name " + full + " (names cannot contain '/')");
      if (!seen.insert(key).second) throw std::invalid_argument("checkpoint: duplicate tensor " + full);
      if (!t.defined()) throw std::invalid_argument("checkpoint: tensor " + full + " is undefined");
      if (t.layout() != torch::kStrided)
        throw std::invalid_argument("checkpoint: tensor " + full + " is not dense (layout " +
                                    c10::toString(t.layout()) + ")");
      if (t.is_meta()) throw std::invalid_argument("checkpoint: tensor " + full + " has no data (meta device)");
      if (!find_dtype(t.scalar_type()))
        throw std::invalid_argument("checkpoint: tensor " + full + " has dtype " + c10::toString(t.scalar_type()) +
                                    ", which checkpoints do not store (float32/64, float16, bfloat16, "
                                    "int8/16/32/64, uint8, bool)");
    }
  }
  for (const auto& col : c.metric_columns) validate_name("/metrics columns", col);
  if (c.metric_columns.empty() && !c.metric_rows.empty())
    throw std::invalid_argument("checkpoint: metric rows without metric columns");
  for (size_t i = 0; i < c.metric_rows.size(); ++i)
    if (c.metric_rows[i].size() != c.metric_columns.size())
      throw std::invalid_argument("checkpoint: metrics row " + std::to_string(i) + " has " +
                                  std::to_string(c.metric_rows[i].size()) + " values for " +
                                  std::to_string(c.metric_columns.size()) + " columns");
}

Hid create_group(hid_t loc, const char* name) {
  Hid gcpl = plist(H5P_GROUP_CREATE);
  check(H5Pset_link_creation_order(gcpl, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED),
        "cannot set link creation order");
  return Hid(H5Gcreate2(loc, name, H5P_DEFAULT, gcpl, H5P_DEFAULT), H5Gclose,
             std::string("cannot create group ") + name);
}

void write_string_attr(hid_t loc, const std::string& name, const std::string& value) {
  Hid type = vlen_string_type();
  Hid space = scalar_space();
  Hid a(H5Acreate2(loc, name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
        "cannot create attribute " + name);
  const char* p = value.c_str();
  check(H5Awrite(a, type, &p), "cannot write attribute " + name);
}

template <typename T>
void write_number_attr(hid_t loc, const std::string& name, hid_t file_type, hid_t mem_type, T value) {
  Hid space = scalar_space();
  Hid a(H5Acreate2(loc, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
        "cannot create attribute " + name);
  check(H5Awrite(a, mem_type, &value), "cannot write attribute " + name);
}

// Dataset creation properties that make HDF5 keep a Fletcher-32 checksum of
// the data, which it verifies on every read: chunked storage (the filter's
// condition), chunks of up to 64 MiB along the first dimension.  Scalars
// and empty datasets cannot be chunked: default properties.
Hid checksummed(const std::vector<hsize_t>& dims, size_t element_size) {
  Hid dcpl = plist(H5P_DATASET_CREATE);
  if (dims.empty()) return dcpl;
  hsize_t row = element_size;
  for (size_t i = 1; i < dims.size(); ++i) {
    if (dims[i] == 0) return dcpl;
    row *= dims[i];
  }
  if (dims[0] == 0 || row > (hsize_t{1} << 31)) return dcpl;  // a chunk must stay under 4 GiB
  std::vector<hsize_t> chunk = dims;
  chunk[0] = std::max<hsize_t>(1, std::min<hsize_t>(dims[0], (hsize_t{64} << 20) / row));
  check(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()), "cannot set chunking");
  check(H5Pset_fletcher32(dcpl), "cannot set the Fletcher-32 filter");
  return dcpl;
}

// Reads a whole dataset; a checksum that does not match is named as such.
void read_dataset(hid_t ds, hid_t mtype, void* out, const std::string& full) {
  if (H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) >= 0) return;
  const std::string why = h5_reason();
  if (why.find("Fletcher32") != std::string::npos || why.find("checksum") != std::string::npos)
    throw Corrupt(full + ": checksum mismatch (the data is damaged)");
  throw Corrupt(full + ": cannot read" + (why.empty() ? "" : " (" + why + ")"));
}

void write_tensor(hid_t group, const std::string& full, const std::string& key, const torch::Tensor& tensor) {
  const DType& d = *find_dtype(tensor.scalar_type());
  torch::Tensor t = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
  std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
  Hid space = t.dim() == 0 ? scalar_space() : simple_space(dims);
  Hid ftype = h5_type(d, true);
  Hid mtype = h5_type(d, false);
  Hid dcpl = checksummed(t.dim() == 0 ? std::vector<hsize_t>() : dims, d.size);
  Hid ds(H5Dcreate2(group, key.c_str(), ftype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose,
         "cannot create dataset " + full);
  if (t.numel() > 0)
    check(H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()), "cannot write dataset " + full);
  write_string_attr(ds, "dtype", d.name);
}

void write_metrics(hid_t file, const Checkpoint& c) {
  if (c.metric_columns.empty()) return;
  const hsize_t rows = c.metric_rows.size(), cols = c.metric_columns.size();
  std::vector<double> flat;
  flat.reserve(rows * cols);
  for (const auto& r : c.metric_rows) flat.insert(flat.end(), r.begin(), r.end());
  Hid space = simple_space({rows, cols});
  Hid dcpl = checksummed({rows, cols}, 8);
  Hid ds(H5Dcreate2(file, "metrics", H5T_IEEE_F64LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT), H5Dclose,
         "cannot create dataset /metrics");
  if (!flat.empty())
    check(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, flat.data()), "cannot write dataset /metrics");
  Hid type = vlen_string_type();
  Hid cspace = simple_space({cols});
  Hid a(H5Acreate2(ds, "columns", type, cspace, H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
        "cannot create attribute /metrics columns");
  std::vector<const char*> ptrs;
  for (const auto& s : c.metric_columns) ptrs.push_back(s.c_str());
  check(H5Awrite(a, type, ptrs.data()), "cannot write attribute /metrics columns");
}

// Writes the whole file and closes it; throws H5Error (or a torch error from
// copying a tensor to the CPU).
void write_file(const std::string& tmp, const Checkpoint& c) {
  Hid fapl = plist(H5P_FILE_ACCESS);
  // HDF5 1.8's format: readable by every current h5py and h5dump.
  check(H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_V18), "cannot set format bounds");
  // H5Fclose must really close (and so write) the file, or fail.
  check(H5Pset_fclose_degree(fapl, H5F_CLOSE_SEMI), "cannot set close degree");
  Hid fcpl = plist(H5P_FILE_CREATE);
  check(H5Pset_link_creation_order(fcpl, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED),
        "cannot set link creation order");
  Hid file(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, fcpl, fapl), H5Fclose, "cannot create the HDF5 file");
  {
    write_string_attr(file, "format", kFormat);
    write_number_attr<int64_t>(file, "version", H5T_STD_I64LE, H5T_NATIVE_INT64, kVersion);
    {
      Hid g = create_group(file, "meta");
      for (const auto& [k, v] : c.meta) write_string_attr(g, k, v);
    }
    {
      Hid g = create_group(file, "counters");
      for (const auto& [k, v] : c.counters) write_number_attr<int64_t>(g, k, H5T_STD_I64LE, H5T_NATIVE_INT64, v);
    }
    {
      Hid g = create_group(file, "scalars");
      for (const auto& [k, v] : c.scalars) write_number_attr<double>(g, k, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, v);
    }
    Hid model = create_group(file, "model");
    for (const auto& tg : kTensorGroups) {
      Hid g = create_group(file, tg.path);
      for (const auto& [key, t] : c.*tg.member) write_tensor(g, std::string(tg.path) + "/" + key, key, t);
    }
    write_metrics(file, c);
  }
  check(H5Fflush(file, H5F_SCOPE_GLOBAL), "cannot flush the HDF5 file");
  file.close("cannot close the HDF5 file");
}

std::string errno_text() { return std::strerror(errno); }

void fsync_path(const std::string& p, int flags, const std::string& what) {
  int fd = ::open(p.c_str(), flags | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(what + ": " + errno_text());
  int r = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (r != 0) throw std::runtime_error(what + ": " + std::strerror(err));
}

// ---------------------------------------------------------------- load

// Where the bytes come from: a regular file opened by name, or an image in
// memory (standard input, pipes).
struct Source {
  bool in_memory = false;
  std::vector<char> image;
  uint64_t size = 0;
};

bool has_signature(const char* p) { return std::memcmp(p, "\x89HDF\r\n\x1a\n", 8) == 0; }

// HDF5 looks for its signature at 0, 512, 1024, 2048, ... (after a user block).
template <typename ReadAt>
bool find_signature(uint64_t size, ReadAt read_at) {
  char buf[8];
  for (uint64_t off = 0; off + 8 <= size; off = off ? off * 2 : 512)
    if (read_at(off, buf) && has_signature(buf)) return true;
  return false;
}

// A stream without an HDF5 signature where one could be by now is not read
// to its end (/dev/zero would never end).
constexpr uint64_t kSignatureSearch = uint64_t{1} << 20;

uint64_t little_endian(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

// Where the HDF5 file that starts (with its signature) at `sig` ends, from
// its superblock, if the bytes read so far tell (0: not yet).
uint64_t declared_end(const std::vector<char>& b, uint64_t sig) {
  const auto* p = reinterpret_cast<const unsigned char*>(b.data()) + sig;
  const uint64_t have = b.size() - sig;
  if (have < 9) return 0;
  const int version = p[8];
  if (version >= 2) {  // signature, version, offset and length sizes, flags, base, extension, end of file
    if (have < 12) return 0;
    const int o = p[9];
    if (o != 4 && o != 8) return 0;
    if (have < 12 + 3 * uint64_t(o)) return 0;
    return sig + little_endian(p + 12 + 2 * o, o);
  }
  const uint64_t fixed = version == 1 ? 28 : 24;  // v0/v1: ..., base, free space, end of file
  if (have < 14) return 0;
  const int o = p[13];
  if (o != 4 && o != 8) return 0;
  if (have < fixed + 3 * uint64_t(o)) return 0;
  return sig + little_endian(p + fixed + 2 * o, o);
}

// Reads a stream up to the end its HDF5 superblock declares (or the stream's
// end, if sooner); gives up on one with no signature in its first MiB.
std::vector<char> read_all(int fd) {
  std::vector<char> out;
  char buf[1 << 16];
  std::optional<uint64_t> sig;  // where the signature is, once found
  uint64_t next_sig = 0, end = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Problem("cannot read (" + errno_text() + ")");
    if (n == 0) return out;
    out.insert(out.end(), buf, buf + n);
    while (!sig && next_sig + 8 <= out.size()) {
      if (has_signature(out.data() + next_sig)) sig = next_sig;
      else next_sig = next_sig ? next_sig * 2 : 512;
    }
    if (!sig && out.size() >= kSignatureSearch) throw Problem("not an HDF5 file (no signature in its first MiB)");
    if (sig && !end) end = declared_end(out, *sig);
    if (end && out.size() >= end) {
      out.resize(end);
      return out;
    }
  }
}

// HDF5 (1.10) copies a variable-length string out of its global heap
// collection by the length the collection records, unchecked: a damaged
// length reads far past the collection and crashes.  Every collection
// ("GCOL", version 1, three zero bytes, its size) is walked first: each
// object must fit in the collection.  ReadAt(offset, n, buffer) reads n
// bytes; false past the end.
template <typename ReadAt>
void check_global_heaps(uint64_t size, ReadAt read_at) {
  constexpr uint64_t kChunk = 1 << 20;
  std::vector<unsigned char> buf(kChunk + 16);
  for (uint64_t at = 0; at < size; at += kChunk) {
    const uint64_t n = std::min<uint64_t>(kChunk + 16, size - at);
    if (!read_at(at, n, buf.data())) throw Corrupt("cannot read");
    const uint64_t last = std::min<uint64_t>(kChunk, n >= 16 ? n - 15 : 0);
    for (uint64_t i = 0; i < last; ++i) {
      const unsigned char* h = buf.data() + i;
      if (h[0] != 'G' || h[1] != 'C' || h[2] != 'O' || h[3] != 'L' || h[4] != 1 || h[5] || h[6] || h[7]) continue;
      const uint64_t start = at + i, coll = little_endian(h + 8, 8);
      const std::string where = "global heap at byte " + std::to_string(start);
      if (coll > size - start) continue;  // past the file's end: HDF5 reports the file truncated
      if (coll < 4096) throw Corrupt(where + " has size " + std::to_string(coll));
      std::vector<unsigned char> c(coll);
      if (!read_at(start, coll, c.data())) throw Corrupt("cannot read " + where);
      // The objects, then the free space (object 0, its header included),
      // fill the collection exactly; HDF5 loops on one whose size disagrees.
      uint64_t o = 16;
      while (o + 16 <= coll) {
        const uint64_t index = little_endian(&c[o], 2), len = little_endian(&c[o + 8], 8);
        if (index == 0) {
          if (len != coll - o) throw Corrupt(where + ": its free space does not end where it does");
          o = coll;
          break;
        }
        if (len > coll - o - 16) throw Corrupt(where + ": object " + std::to_string(index) + " is longer than it");
        o += 16 + (len + 7) / 8 * 8;
      }
      if (o != coll && coll - o >= 16) throw Corrupt(where + ": its objects do not fill it");
    }
  }
}

Source open_source(const std::string& path) {
  Source s;
  if (path == "-") {
    if (::isatty(0)) throw Problem("is a terminal (pipe a checkpoint into it)");
    s.in_memory = true;
    s.image = read_all(0);
  } else {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT || errno == ENOTDIR) throw Problem("no such file");
      throw Problem("cannot open (" + errno_text() + ")");
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const std::string why = errno_text();
      ::close(fd);
      throw Problem("cannot open (" + why + ")");
    }
    if (S_ISDIR(st.st_mode)) {
      ::close(fd);
      throw Problem("is a directory");
    }
    if (S_ISREG(st.st_mode)) {
      s.size = static_cast<uint64_t>(st.st_size);
      bool ok = find_signature(
          s.size, [fd](uint64_t off, char* buf) { return ::pread(fd, buf, 8, static_cast<off_t>(off)) == 8; });
      ::close(fd);
      if (!ok) throw Problem("not an HDF5 file");
      return s;
    }
    // A pipe or device (e.g. /dev/stdin, <(...)): HDF5 needs to seek.
    s.in_memory = true;
    try {
      s.image = read_all(fd);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
  }
  s.size = s.image.size();
  if (s.image.empty()) throw Problem("not an HDF5 file (empty input)");
  if (!find_signature(s.size, [&s](uint64_t off, char* buf) {
        std::memcpy(buf, s.image.data() + off, 8);
        return true;
      }))
    throw Problem("not an HDF5 file");
  return s;
}

Hid open_file(const std::string& path, Source& src) {
  Hid fapl = plist(H5P_FILE_ACCESS);
  check(H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG), "cannot set close degree");
  if (src.in_memory) {
    check(H5Pset_fapl_core(fapl, 1 << 20, 0), "cannot select the in-memory driver");
    check(H5Pset_file_image(fapl, src.image.data(), src.image.size()), "cannot set the file image");
    std::vector<char>().swap(src.image);  // the property list holds a copy
  } else {
#if H5_VERSION_GE(1, 10, 7)
    // Read on file systems without flock() too.
    check(H5Pset_file_locking(fapl, 1, 1), "cannot set file locking");
#endif
  }
  hid_t id = H5Fopen(src.in_memory ? "checkpoint image" : path.c_str(), H5F_ACC_RDONLY, fapl);
  if (id < 0) {
    std::string reason = h5_reason();
    if (reason.find("unable to lock") != std::string::npos)
      throw Problem("cannot open (locked: is another program writing it?)");
    throw H5Error("cannot open");
  }
  return Hid(id, H5Fclose, "");
}

bool has_link(hid_t loc, const char* name) { return check(H5Lexists(loc, name, H5P_DEFAULT), "H5Lexists") > 0; }
bool has_attr(hid_t loc, const char* name) { return check(H5Aexists(loc, name), "H5Aexists") > 0; }

std::optional<Hid> open_group(hid_t loc, const char* name) {
  if (!has_link(loc, name)) return std::nullopt;
  return Hid(H5Gopen2(loc, name, H5P_DEFAULT), H5Gclose, std::string("cannot open group ") + name);
}

std::vector<std::string> attr_names(hid_t loc) {
  std::vector<std::string> names;
  check(H5Aiterate2(
            loc, H5_INDEX_NAME, H5_ITER_INC, nullptr,
            [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
              try {
                static_cast<std::vector<std::string>*>(data)->emplace_back(name);
                return 0;
              } catch (...) {
                return -1;
              }
            },
            &names),
        "cannot list attributes");
  return names;
}

// Reads a string attribute (scalar or 1-d; variable or fixed length).
std::vector<std::string> read_strings(hid_t loc, const std::string& name, const std::string& where) {
  Hid a(H5Aopen(loc, name.c_str(), H5P_DEFAULT), H5Aclose, "cannot open attribute");
  Hid ftype(H5Aget_type(a), H5Tclose, "cannot read attribute type");
  if (H5Tget_class(ftype) != H5T_STRING) throw Corrupt(where + " is not a string");
  Hid space(H5Aget_space(a), H5Sclose, "cannot read attribute space");
  hssize_t n = H5Sget_simple_extent_npoints(space);
  if (n < 0) throw H5Error("cannot read attribute space");
  std::vector<std::string> out;
  const htri_t vlen = check(H5Tis_variable_str(ftype), "H5Tis_variable_str");
  if (vlen > 0) {
    Hid mtype = vlen_string_type();
    check(H5Tset_cset(mtype, H5Tget_cset(ftype)), "cannot make a string type");
    std::vector<char*> p(static_cast<size_t>(n), nullptr);
    check(H5Aread(a, mtype, p.data()), "cannot read attribute");
    for (char* s : p) out.emplace_back(s ? s : "");
#if H5_VERSION_GE(1, 12, 0)
    H5Treclaim(mtype, space, H5P_DEFAULT, p.data());
#else
    H5Dvlen_reclaim(mtype, space, H5P_DEFAULT, p.data());
#endif
  } else {
    const size_t size = H5Tget_size(ftype);
    if (size == 0) throw H5Error("cannot read attribute type");
    Hid mtype = type_copy(ftype);
    std::vector<char> buf(size * static_cast<size_t>(n));
    check(H5Aread(a, mtype, buf.data()), "cannot read attribute");
    for (hssize_t i = 0; i < n; ++i) {
      const char* s = buf.data() + i * size;
      out.emplace_back(s, strnlen(s, size));
    }
  }
  return out;
}

std::string read_string(hid_t loc, const std::string& name, const std::string& where) {
  auto v = read_strings(loc, name, where);
  if (v.size() != 1) throw Corrupt(where + " is not a single string");
  return v[0];
}

// Reads a scalar numeric attribute as T (int64 or double).
template <typename T>
T read_number(hid_t loc, const std::string& name, hid_t mem_type, bool allow_float, const std::string& where) {
  Hid a(H5Aopen(loc, name.c_str(), H5P_DEFAULT), H5Aclose, "cannot open attribute");
  Hid ftype(H5Aget_type(a), H5Tclose, "cannot read attribute type");
  H5T_class_t cls = H5Tget_class(ftype);
  if (cls != H5T_INTEGER && !(allow_float && cls == H5T_FLOAT))
    throw Corrupt(where + " is not " + (allow_float ? "a number" : "an integer"));
  Hid space(H5Aget_space(a), H5Sclose, "cannot read attribute space");
  if (H5Sget_simple_extent_npoints(space) != 1) throw Corrupt(where + " is not a single value");
  T v{};
  check(H5Aread(a, mem_type, &v), "cannot read attribute");
  return v;
}

std::string describe(const H5T_class_t cls, size_t size, bool is_signed) {
  std::string s = std::to_string(size) + "-byte ";
  if (cls == H5T_FLOAT) return s + "float";
  if (cls == H5T_INTEGER) return s + (is_signed ? "signed" : "unsigned") + " integer";
  return "non-numeric HDF5 type";
}

torch::Tensor read_tensor(hid_t group, const std::string& key, const std::string& full, uint64_t file_size) {
  Hid ds(H5Dopen2(group, key.c_str(), H5P_DEFAULT), H5Dclose, "cannot open dataset");
  Hid ftype(H5Dget_type(ds), H5Tclose, "cannot read dataset type");
  const H5T_class_t cls = H5Tget_class(ftype);
  const size_t size = H5Tget_size(ftype);
  const bool is_signed = cls == H5T_INTEGER && H5Tget_sign(ftype) == H5T_SGN_2;

  const DType* d = nullptr;
  if (has_attr(ds, "dtype")) {
    const std::string name = read_string(ds, "dtype", full + " attribute dtype");
    d = find_dtype(name);
    if (!d) throw Corrupt(full + ": unknown dtype '" + name + "'");
  } else {  // a dataset added by another program: its HDF5 type decides
    for (const auto& c : kDTypes)
      if (c.cls == cls && c.size == size && (cls == H5T_FLOAT || c.is_signed == is_signed) &&
          c.st != torch::kBFloat16 && c.st != torch::kBool)
        d = &c;
    if (!d) throw Corrupt(full + ": no dtype attribute and an unsupported " + describe(cls, size, is_signed));
  }
  if (cls != d->cls || size != d->size || (cls == H5T_INTEGER && is_signed != d->is_signed))
    throw Corrupt(full + ": dtype " + d->name + " stored as " + describe(cls, size, is_signed));

  Hid space(H5Dget_space(ds), H5Sclose, "cannot read dataset space");
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 0) throw H5Error("cannot read dataset space");
  if (H5Sget_simple_extent_type(space) == H5S_NULL) throw Corrupt(full + ": no dataspace");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0) check(H5Sget_simple_extent_dims(space, dims.data(), nullptr), "cannot read dataset shape");
  std::vector<int64_t> shape;
  uint64_t numel = 1;
  for (hsize_t n : dims) {
    if (n > static_cast<hsize_t>(INT64_MAX) || (n && numel > UINT64_MAX / 16 / n))
      throw Corrupt(full + ": impossible shape");
    shape.push_back(static_cast<int64_t>(n));
    numel *= n;
  }
  // Contiguous data lies in the file, so it cannot be larger than the file:
  // guards the allocation below against a damaged shape.
  Hid dcpl(H5Dget_create_plist(ds), H5Pclose, "cannot read dataset properties");
  bool stored_raw = H5Pget_layout(dcpl) == H5D_CONTIGUOUS;  // as many bytes in the file as in memory, or more
  if (H5Pget_layout(dcpl) == H5D_CHUNKED) {
    stored_raw = true;
    const int n = H5Pget_nfilters(dcpl);
    for (int i = 0; i < n; ++i) {
      unsigned flags = 0;
      size_t nvalues = 0;
      if (H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &nvalues, nullptr, 0, nullptr, nullptr) !=
          H5Z_FILTER_FLETCHER32)
        stored_raw = false;  // compressed: may be smaller in the file
    }
  }
  if (stored_raw && numel * size > file_size) throw Corrupt(full + ": shape larger than the file");

  const c10::ScalarType st = d->st == torch::kBool ? torch::kUInt8 : d->st;
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(st));
  if (numel > 0) {
    Hid mtype = h5_type(*d, false);
    read_dataset(ds, mtype, t.data_ptr(), full);
  }
  return d->st == torch::kBool ? t.ne(0) : t;
}

void read_tensors(hid_t file, const char* path, Tensors& out, uint64_t file_size) {
  // "/model/parameters" -> open "model", then "parameters"; a missing group is empty.
  std::string rest = path + 1;
  std::optional<Hid> g;
  hid_t loc = file;
  for (size_t pos; !rest.empty(); rest = pos == std::string::npos ? "" : rest.substr(pos + 1)) {
    pos = rest.find('/');
    g = open_group(loc, rest.substr(0, pos).c_str());
    if (!g) return;
    loc = *g;
  }
  H5G_info_t info;
  check(H5Gget_info(loc, &info), "cannot read group");
  Hid gcpl(H5Gget_create_plist(loc), H5Pclose, "cannot read group properties");
  unsigned order = 0;
  check(H5Pget_link_creation_order(gcpl, &order), "cannot read group properties");
  const H5_index_t index = (order & H5P_CRT_ORDER_TRACKED) ? H5_INDEX_CRT_ORDER : H5_INDEX_NAME;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    ssize_t n = H5Lget_name_by_idx(loc, ".", index, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (n < 0) throw H5Error("cannot read link name");
    std::string key(static_cast<size_t>(n), '\0');
    if (H5Lget_name_by_idx(loc, ".", index, H5_ITER_INC, i, key.data(), key.size() + 1, H5P_DEFAULT) < 0)
      throw H5Error("cannot read link name");
    const std::string full = std::string(path) + "/" + key;
    out.emplace_back(key, read_tensor(loc, key, full, file_size));
  }
}

Checkpoint read_checkpoint(hid_t file, uint64_t file_size) {
  if (!has_attr(file, "format")) throw Problem("not an aq checkpoint (no 'format' attribute)");
  std::vector<std::string> format;
  try {
    format = read_strings(file, "format", "attribute format");
  } catch (const Corrupt&) {
    throw Problem("not an aq checkpoint (format is not a string)");
  }
  if (format.size() != 1 || format[0] != kFormat) {
    std::string f = format.empty() ? "" : format[0].substr(0, 40);
    throw Problem("not an aq checkpoint (format is '" + f + "')");
  }
  if (!has_attr(file, "version")) throw Corrupt("no 'version' attribute");
  const auto version = read_number<int64_t>(file, "version", H5T_NATIVE_INT64, false, "attribute version");
  if (version > kVersion)
    throw Problem("checkpoint format version " + std::to_string(version) + " is newer than this aq reads (" +
                  std::to_string(kVersion) + ")");
  if (version < 1) throw Corrupt("format version " + std::to_string(version));

  Checkpoint c;
  if (auto g = open_group(file, "meta"))
    for (const auto& k : attr_names(*g)) c.meta[k] = read_string(*g, k, "/meta attribute " + k);
  if (auto g = open_group(file, "counters"))
    for (const auto& k : attr_names(*g))
      c.counters[k] = read_number<int64_t>(*g, k, H5T_NATIVE_INT64, false, "/counters attribute " + k);
  if (auto g = open_group(file, "scalars"))
    for (const auto& k : attr_names(*g))
      c.scalars[k] = read_number<double>(*g, k, H5T_NATIVE_DOUBLE, true, "/scalars attribute " + k);
  for (const auto& tg : kTensorGroups) read_tensors(file, tg.path, c.*tg.member, file_size);
  if (!has_link(file, "adaptive")) {
    // Files written before /adaptive kept the adaptive state in /optimizer.
    Tensors optimizer;
    for (auto& [name, t] : c.optimizer)
      (name.find(".aq_") != std::string::npos ? c.adaptive : optimizer).emplace_back(name, std::move(t));
    c.optimizer = std::move(optimizer);
  }

  if (has_link(file, "metrics")) {
    Hid ds(H5Dopen2(file, "metrics", H5P_DEFAULT), H5Dclose, "cannot open /metrics");
    Hid space(H5Dget_space(ds), H5Sclose, "cannot read /metrics space");
    if (H5Sget_simple_extent_ndims(space) != 2) throw Corrupt("/metrics is not 2-dimensional");
    hsize_t dims[2];
    check(H5Sget_simple_extent_dims(space, dims, nullptr), "cannot read /metrics shape");
    if (!has_attr(ds, "columns")) throw Corrupt("/metrics has no 'columns' attribute");
    c.metric_columns = read_strings(ds, "columns", "/metrics attribute columns");
    if (c.metric_columns.size() != dims[1])
      throw Corrupt("/metrics has " + std::to_string(dims[1]) + " columns but " +
                    std::to_string(c.metric_columns.size()) + " column names");
    if (dims[0] * dims[1] * 8 > file_size) throw Corrupt("/metrics larger than the file");
    std::vector<double> flat(dims[0] * dims[1]);
    if (!flat.empty())
      read_dataset(ds, H5T_NATIVE_DOUBLE, flat.data(), "/metrics");
    for (hsize_t r = 0; r < dims[0]; ++r)
      c.metric_rows.emplace_back(flat.begin() + r * dims[1], flat.begin() + (r + 1) * dims[1]);
  }
  return c;
}

}  // namespace

void save(const std::string& path, const Checkpoint& c) {
  validate(c);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  auto fail = [&](const std::string& why) {
    return std::runtime_error("cannot write checkpoint " + path + ": " + why);
  };

  const auto beside = files::temporary_beside(path);
  if (!beside) throw fail("not a file name");
  const std::string& dir = beside->dir;
  const std::string& tmp = beside->tmp;

  // Create the temporary file ourselves: errno says why (missing folder, ...).
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw fail("cannot create a file in " + dir + " (" + errno_text() + ")");
  ::close(fd);
  try {
    write_file(tmp, c);
    fsync_path(tmp, O_RDONLY, "cannot sync the temporary file");
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw std::runtime_error("cannot rename the temporary file over it (" + errno_text() + ")");
  } catch (const std::exception& e) {
    ::unlink(tmp.c_str());
    throw fail(e.what());
  }
  // Make the rename itself durable.  The new checkpoint is in place by now,
  // so a file system that cannot sync folders is not an error.
  try {
    fsync_path(dir, O_RDONLY | O_DIRECTORY, "");
  } catch (const std::runtime_error&) {
  }
}

Checkpoint load(const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const std::string name = path == "-" ? "standard input" : path;
  try {
    Source src = open_source(path);
    const uint64_t size = src.size;
    if (src.in_memory) {
      check_global_heaps(size, [&](uint64_t off, uint64_t n, unsigned char* out) {
        if (off + n > src.image.size()) return false;
        std::memcpy(out, src.image.data() + off, n);
        return true;
      });
    } else {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) throw Problem("cannot open (" + errno_text() + ")");
      try {
        check_global_heaps(size, [fd](uint64_t off, uint64_t n, unsigned char* out) {
          uint64_t done = 0;
          while (done < n) {
            const ssize_t r = ::pread(fd, out + done, n - done, static_cast<off_t>(off + done));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return false;
            done += static_cast<uint64_t>(r);
          }
          return true;
        });
      } catch (...) {
        ::close(fd);
        throw;
      }
      ::close(fd);
    }
    Hid file = open_file(path, src);
    return read_checkpoint(file, size);
  } catch (const Problem& e) {
    throw std::runtime_error(name + ": " + e.what());
  } catch (const Corrupt& e) {
    throw std::runtime_error(name + ": truncated or corrupt HDF5 file (" + e.what() + ")");
  } catch (const H5Error&) {
    throw std::runtime_error(name + ": truncated or corrupt HDF5 file");
  } catch (const c10::Error& e) {  // allocating a tensor the file describes
    throw std::runtime_error(name + ": truncated or corrupt HDF5 file (" + e.what_without_backtrace() + ")");
  }
}

}  // namespace aq::ckpt
