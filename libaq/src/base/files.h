// Files written whole or not at all: the checkpoint and safetensors writers
// write a temporary file beside the target and rename or link it over the
// target once it is complete and synced.
#pragma once

#include <optional>
#include <string>

namespace aq::files {

struct Beside {
  std::string dir;  // the target's folder ("." for a bare name)
  std::string tmp;  // ".NAME.tmp-PID-RANDOM" in that folder
};
// nullopt: `path` names no file (empty, ".", "..", or a folder's path).
std::optional<Beside> temporary_beside(const std::string& path);

}  // namespace aq::files
