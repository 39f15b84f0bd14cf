// What every aq tool shares: the common options (device, threads, seed,
// verbosity), logging to stderr, and the one place where errors turn into a
// message and an exit status.
//
// Exit status, for every tool: 0 success, 1 runtime failure (bad input file,
// out of memory, ...), 2 usage error (unknown option, bad value).
#pragma once

#include <CLI/CLI.hpp>
#include <c10/core/Device.h>

#include <functional>
#include <string>

namespace aq::cli {

enum Exit : int { kOk = 0, kRuntime = 1, kUsage = 2 };

struct Common {
  std::string device = "auto";  // auto: cuda if a GPU is visible, else cpu
  int threads = 0;              // 0: LibTorch's default
  int verbosity = 0;            // -v raises, -q lowers
  uint64_t seed = 0;
  bool seed_given = false;
};

// CLI11's PositiveNumber and NonNegativeNumber (same names in --help),
// with errors that read "--epochs: must be positive, not -1" instead of
// CLI11's range message, which spells out DBL_MAX in full.
extern const CLI::Validator Positive;
extern const CLI::Validator NonNegative;

// Adds --device, --threads, --seed, -v and -q to `app` (or a subcommand).
void add_common(CLI::App& app, Common& common);

// Applies the common options: log level, threads, seed.  Returns the device
// (throws std::invalid_argument for an unknown or unavailable one).
c10::Device apply_common(const Common& common);

// Parses argv, runs body, and maps what it throws to one line on stderr
// prefixed with the tool's name, and to the exit status above.
int run(CLI::App& app, int argc, char** argv, const std::function<int()>& body);

}  // namespace aq::cli
