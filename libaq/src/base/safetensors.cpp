// The safetensors format (aq/safetensors.h), with nlohmann's JSON parser
// for the header.  The file is read into memory (a stream only as far as
// its header says) and every byte range is checked against it before any
// tensor is made, so a corrupt file is an exception naming the file, never
// a read past the end.
#include "aq/safetensors.h"
#include "files.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <stdexcept>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian, as this host must be");

namespace aq::safetensors {
namespace {

using json = nlohmann::json;

struct DType {
  const char* name;
  c10::ScalarType type;
};
constexpr DType kDTypes[] = {{"F64", c10::kDouble}, {"F32", c10::kFloat}, {"F16", c10::kHalf},
                             {"BF16", c10::kBFloat16}, {"I64", c10::kLong}, {"I32", c10::kInt},
                             {"I16", c10::kShort},     {"I8", c10::kChar},  {"U8", c10::kByte},
                             {"BOOL", c10::kBool}};

std::string known_dtypes() {
  std::string s;
  for (const auto& d : kDTypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

// A header larger than this is not a header (the reference reader's limit).
constexpr uint64_t kMaxHeader = 100'000'000;
constexpr int64_t kMaxDims = 64;

std::string errno_text(int e = errno) { return std::strerror(e); }

// A problem with the file's content; load() prefixes the file's name.
struct Bad : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Rejects a key repeated within one object (nlohmann keeps the last one
// silently) and nesting deeper than the format has.
json parse_header(const char* begin, const char* end) {
  std::vector<std::set<std::string>> keys;
  auto check = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > 3) throw Bad("header nests deeper than a safetensors header");
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
      throw Bad("header names '" + parsed.get<std::string>() + "' twice");
    return true;
  };
  try {
    return json::parse(begin, end, check);
  } catch (const json::parse_error& e) {
    throw Bad("header is not valid JSON (at byte " + std::to_string(e.byte) + " of " +
              std::to_string(end - begin) + ")");
  }
}

// Appends up to `n` bytes of `fd` to `out` (fewer at the end of the file).
void read_some(int fd, uint64_t n, std::vector<char>& out) {
  char buf[1 << 16];
  while (n > 0) {
    const ssize_t r = ::read(fd, buf, static_cast<size_t>(std::min<uint64_t>(n, sizeof buf)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw Bad("cannot read (" + errno_text() + ")");
    if (r == 0) return;
    out.insert(out.end(), buf, buf + r);
    n -= static_cast<uint64_t>(r);
  }
}

// The file's bytes.  A regular file is read whole; a stream (standard
// input, a pipe, a device) only as far as its header says, and one byte
// more to tell trailing bytes, so that an endless stream is not read on.
std::vector<char> read_file(int fd) {
  std::vector<char> data;
  struct stat st {};
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    data.reserve(static_cast<size_t>(st.st_size));
    read_some(fd, UINT64_MAX, data);
    return data;
  }
  read_some(fd, 8, data);
  if (data.size() < 8) return data;
  uint64_t n = 0;
  std::memcpy(&n, data.data(), 8);
  if (n > kMaxHeader) return data;
  read_some(fd, n, data);
  if (n == 0 || data.size() < 8 + n || data[8] != '{') return data;
  json header;
  try {
    header = parse_header(data.data() + 8, data.data() + 8 + n);
  } catch (const Bad&) {
    return data;  // parse() says what is wrong
  }
  uint64_t end = 0;
  if (header.is_object())
    for (const auto& item : header.items())
      if (item.key() != "__metadata__" && item.value().is_object() && item.value().contains("data_offsets") &&
          item.value()["data_offsets"].is_array() && item.value()["data_offsets"].size() == 2 &&
          item.value()["data_offsets"][1].is_number_unsigned())
        end = std::max(end, item.value()["data_offsets"][1].get<uint64_t>());
  read_some(fd, end == UINT64_MAX ? end : end + 1, data);
  return data;
}

std::vector<char> read_all(const std::string& path) {
  if (path == "-") return read_file(STDIN_FILENO);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Bad("cannot open (" + errno_text() + ")");
  try {
    auto data = read_file(fd);
    ::close(fd);
    return data;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

uint64_t unsigned_field(const json& v, const std::string& what) {
  if (!v.is_number_unsigned()) throw Bad(what + " is not a non-negative integer");
  return v.get<uint64_t>();
}

torch::Tensor make_tensor(const std::string& name, const json& entry, const char* data, uint64_t data_size,
                          std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  const std::string t = "tensor '" + name + "'";
  if (!entry.is_object()) throw Bad(t + " is not a JSON object");
  for (const auto& item : entry.items())
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets")
      throw Bad(t + " has an unknown field '" + item.key() + "'");
  if (!entry.contains("dtype") || !entry["dtype"].is_string()) throw Bad(t + " has no dtype");
  const std::string dname = entry["dtype"].get<std::string>();
  const DType* dtype = nullptr;
  for (const auto& d : kDTypes)
    if (dname == d.name) dtype = &d;
  if (!dtype) throw Bad(t + " has dtype '" + dname + "', which aq does not read (" + known_dtypes() + ")");
  if (!entry.contains("shape") || !entry["shape"].is_array()) throw Bad(t + " has no shape");
  const json& shape_json = entry["shape"];
  if (static_cast<int64_t>(shape_json.size()) > kMaxDims) throw Bad(t + " has more than 64 dimensions");
  std::vector<int64_t> shape;
  uint64_t numel = 1;
  for (const auto& d : shape_json) {
    const uint64_t n = unsigned_field(d, t + ": a dimension");
    if (n > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(numel, n, &numel))
      throw Bad(t + " has a shape too large");
    shape.push_back(static_cast<int64_t>(n));
  }
  const uint64_t item = c10::elementSize(dtype->type);
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, item, &bytes)) throw Bad(t + " has a shape too large");
  if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() || entry["data_offsets"].size() != 2)
    throw Bad(t + " has no data_offsets [begin, end]");
  const uint64_t begin = unsigned_field(entry["data_offsets"][0], t + ": data_offsets");
  const uint64_t end = unsigned_field(entry["data_offsets"][1], t + ": data_offsets");
  if (begin > end || end > data_size)
    throw Bad(t + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
              "] outside the data's " + std::to_string(data_size) + " bytes (truncated?)");
  if (end - begin != bytes)
    throw Bad(t + " holds " + std::to_string(end - begin) + " bytes, its dtype " + dname + " and shape need " +
              std::to_string(bytes));
  ranges.emplace_back(begin, end);
  const char* src = data + begin;
  if (dtype->type == c10::kBool)
    for (uint64_t i = 0; i < bytes; ++i)
      if (static_cast<unsigned char>(src[i]) > 1) throw Bad(t + " (BOOL) holds a byte that is neither 0 nor 1");
  auto out = torch::empty(shape, torch::TensorOptions().dtype(dtype->type));
  if (bytes > 0) std::memcpy(out.data_ptr(), src, bytes);
  return out;
}

File parse(const std::vector<char>& file) {
  if (file.size() < 8)
    throw Bad("not a safetensors file (" + std::to_string(file.size()) + " bytes, too short for a header)");
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  if (n > kMaxHeader) throw Bad("not a safetensors file (header length " + std::to_string(n) + " is implausible)");
  if (n > file.size() - 8)
    throw Bad("truncated, or not a safetensors file (a header of " + std::to_string(n) + " bytes in a file of " +
              std::to_string(file.size()) + ")");
  const char* h = file.data() + 8;
  if (n == 0 || h[0] != '{') throw Bad("not a safetensors file (its header is not a JSON object)");
  const json header = parse_header(h, h + n);
  if (!header.is_object()) throw Bad("not a safetensors file (its header is not a JSON object)");
  const char* data = h + n;
  const uint64_t data_size = file.size() - 8 - n;
  File out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<std::pair<uint64_t, std::pair<std::string, torch::Tensor>>> tensors;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") {
      if (!item.value().is_object()) throw Bad("__metadata__ is not a JSON object");
      for (const auto& m : item.value().items()) {
        if (!m.value().is_string()) throw Bad("__metadata__ '" + m.key() + "' is not a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (item.key().empty()) throw Bad("a tensor has an empty name");
    auto t = make_tensor(item.key(), item.value(), data, data_size, ranges);
    tensors.push_back({ranges.back().first, {item.key(), std::move(t)}});
  }
  // The ranges must tile the data: no gap, no overlap, nothing after.
  std::sort(ranges.begin(), ranges.end());
  uint64_t at = 0;
  for (const auto& [b, e] : ranges) {
    if (b != at)
      throw Bad(b < at ? "two tensors share bytes " + std::to_string(b) + ".." + std::to_string(at)
                       : "data bytes " + std::to_string(at) + ".." + std::to_string(b) + " belong to no tensor");
    at = e;
  }
  if (at != data_size)
    throw Bad("data bytes " + std::to_string(at) + ".." + std::to_string(data_size) + " belong to no tensor");
  std::stable_sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& t : tensors) out.tensors.push_back(std::move(t.second));
  return out;
}

void write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw std::runtime_error(errno_text());
    p += w, n -= static_cast<size_t>(w);
  }
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

}  // namespace

void save(const std::string& path, const ckpt::Tensors& tensors, const std::map<std::string, std::string>& metadata,
          bool overwrite) {
  // The header, and each tensor's bytes as one contiguous CPU copy.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__") throw std::invalid_argument("safetensors: bad tensor name '" + name + "'");
    if (!names.insert(name).second) throw std::invalid_argument("safetensors: tensor '" + name + "' given twice");
    const DType* dtype = nullptr;
    for (const auto& d : kDTypes)
      if (t.scalar_type() == d.type) dtype = &d;
    if (!dtype)
      throw std::invalid_argument("safetensors: tensor '" + name + "' has dtype " +
                                  std::string(c10::toString(t.scalar_type())) + ", which the format does not hold");
    auto c = t.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = c.numel() * c.element_size();
    header[name] = {{"dtype", dtype->name}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(c));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  const uint64_t n = text.size();
  char len[8];
  std::memcpy(len, &n, 8);

  auto write_to = [&](int fd) {
    write_all(fd, len, 8);
    write_all(fd, text.data(), text.size());
    for (const auto& c : data)
      write_all(fd, static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel() * c.element_size()));
  };
  if (path == "-") {
    try {
      write_to(STDOUT_FILENO);
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(std::string("cannot write to standard output: ") + e.what());
    }
    return;
  }
  auto fail = [&](const std::string& why) { return std::runtime_error("cannot write " + path + ": " + why); };
  if (!overwrite && exists(path)) throw std::runtime_error(path + " exists");
  const auto beside = files::temporary_beside(path);
  if (!beside) throw fail("not a file name");
  const std::string& dir = beside->dir;
  const std::string& tmp = beside->tmp;
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw fail("cannot create a file in " + dir + " (" + errno_text() + ")");
  try {
    write_to(fd);
    if (::fsync(fd) != 0) throw std::runtime_error("cannot sync (" + errno_text() + ")");
  } catch (const std::runtime_error& e) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw fail(e.what());
  }
  if (::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw fail(errno_text(e));
  }
  // link() never replaces: a file that appeared meanwhile is kept.  File
  // systems without hard links have the same guarantee from renameat2.
  int r = overwrite ? ::rename(tmp.c_str(), path.c_str()) : ::link(tmp.c_str(), path.c_str());
  int e = errno;
  if (!overwrite && r != 0 && (e == EPERM || e == EOPNOTSUPP || e == ENOSYS)) {
    r = ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE);
    e = errno;
  }
  if (!overwrite || r != 0) ::unlink(tmp.c_str());
  if (r != 0) {
    if (!overwrite && e == EEXIST) throw std::runtime_error(path + " exists");
    throw fail(errno_text(e));
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // durable rename; a folder that cannot be synced is no error, the file is in place
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

File load(const std::string& path) {
  const std::string name = path == "-" ? "standard input" : path;
  try {
    return parse(read_all(path));
  } catch (const Bad& e) {
    throw std::runtime_error(name + ": " + e.what());
  } catch (const c10::Error& e) {  // allocating a tensor the file describes
    const std::string m = e.what_without_backtrace();
    throw std::runtime_error(name + ": " + m.substr(0, m.find('\n')));
  } catch (const std::bad_alloc&) {
    throw std::runtime_error(name + ": out of host memory reading it");
  }
}

}  // namespace aq::safetensors
