#include "files.h"

#include <unistd.h>

#include <cstdio>
#include <random>

namespace aq::files {

std::optional<Beside> temporary_beside(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") return std::nullopt;
  std::random_device rd;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%08x%08x", rd(), rd());
  Beside b;
  b.dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  b.tmp = (slash == std::string::npos ? "" : path.substr(0, slash + 1)) + "." + base + ".tmp-" +
          std::to_string(::getpid()) + "-" + hex;
  return b;
}

}  // namespace aq::files
