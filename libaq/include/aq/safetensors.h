// Named tensors in the safetensors format (Hugging Face's; what Python's
// `safetensors` package reads and writes): an 8-byte little-endian header
// length, a JSON header (each tensor's dtype, shape and byte range in the
// data, and an optional "__metadata__" object of strings), then the raw
// little-endian tensor data, one contiguous C-order block per tensor.
//
// Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
#pragma once

#include "aq/checkpoint.h"

#include <map>
#include <string>

namespace aq::safetensors {

struct File {
  std::map<std::string, std::string> metadata;  // the header's "__metadata__"
  ckpt::Tensors tensors;                        // in the order of their data
};

// Writes the tensors (any device; contiguous copies are taken) and metadata
// to `path` atomically (a temporary file in the destination folder, synced
// and renamed), or to standard output for "-".  Without `overwrite` an
// existing `path` is never replaced: std::runtime_error "PATH exists", also
// when it appears while writing.  Throws std::invalid_argument for an empty
// or repeated name or an unsupported dtype, std::runtime_error naming the
// file for I/O failures (the destination is then untouched).
void save(const std::string& path, const ckpt::Tensors& tensors, const std::map<std::string, std::string>& metadata,
          bool overwrite = false);

// Reads a safetensors file ("-": standard input).  Everything is checked
// before a tensor is made: header size and JSON syntax, repeated names,
// dtypes, shapes, and byte ranges (each the size its dtype and shape say,
// inside the file, together covering the data exactly, without overlap).
// Throws std::runtime_error with one line naming the file and the first
// problem.  Tensors come back on the CPU in their stored dtype.
File load(const std::string& path);

}  // namespace aq::safetensors
