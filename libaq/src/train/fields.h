// What the trainer and the model loader read from a checkpoint, with errors
// that name the file.
#pragma once

#include "aq/checkpoint.h"

#include <torch/types.h>

#include <stdexcept>
#include <string>

namespace aq::train::detail {

inline std::string shape(const torch::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? "," : "") + std::to_string(t.size(i));
  return s + "]";
}

inline int64_t counter(const ckpt::Checkpoint& c, const std::string& key, const std::string& source) {
  auto it = c.counters.find(key);
  if (it == c.counters.end()) throw std::runtime_error(source + ": checkpoint has no '" + key + "' counter");
  return it->second;
}
inline std::string meta(const ckpt::Checkpoint& c, const std::string& key, const std::string& source) {
  auto it = c.meta.find(key);
  if (it == c.meta.end()) throw std::runtime_error(source + ": checkpoint has no '" + key + "' in /meta");
  return it->second;
}

}  // namespace aq::train::detail
