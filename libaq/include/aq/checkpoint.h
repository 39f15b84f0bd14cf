// Training checkpoints as HDF5 files (layout: man/aq-checkpoint.5).
//
// A checkpoint holds the model's parameters and buffers by their LibTorch
// names (the same for an exact and a converted model), the optimizer's
// state, counters (epoch, step, ...), random-generator states, text metadata
// (architecture, dataset, quantization config, command line, versions) and
// the metrics history.  Files are readable by h5dump and h5py.
//
// save() is atomic: it writes a temporary file in the destination folder,
// flushes and syncs it, and renames it over the destination, so a crash or
// kill never leaves a half-written checkpoint in place of a good one.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace aq::ckpt {

inline constexpr const char* kFormat = "aq-checkpoint";
inline constexpr int64_t kVersion = 1;

// An ordered list of named tensors (insertion order is kept in the file).
using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct Checkpoint {
  std::map<std::string, std::string> meta;    // /meta attributes (strings)
  std::map<std::string, int64_t> counters;    // /counters attributes
  std::map<std::string, double> scalars;      // /scalars attributes (lr, ...)
  Tensors parameters;                         // /model/parameters/<name>
  Tensors buffers;                            // /model/buffers/<name>
  Tensors optimizer;                          // /optimizer/<key>
  Tensors adaptive;                           // /adaptive/<key>: adaptive precision's state
  Tensors rng;                                // /rng/<key> (uint8 states)
  std::vector<std::string> metric_columns;    // /metrics: float64 [rows, columns]
  std::vector<std::vector<double>> metric_rows;
};

// Writes `c` to `path` atomically.  Tensors may live on any device and be
// any of float32/64, float16, bfloat16, int8/16/32/64, uint8, bool.
// Throws std::runtime_error naming the file on failure; the destination is
// then untouched.
void save(const std::string& path, const Checkpoint& c);

// Reads a checkpoint ("-": from standard input).  Throws std::runtime_error
// with one line naming the file and what is wrong: missing, not HDF5,
// truncated, not an aq checkpoint (foreign HDF5), newer format version.
// Tensors come back on the CPU in their stored dtype.
Checkpoint load(const std::string& path);

}  // namespace aq::ckpt
