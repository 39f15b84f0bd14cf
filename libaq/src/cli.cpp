#include "aq/cli.h"

#include "aq/log.h"
#include "aq/train.h"

#include <c10/util/Exception.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>
#include <iostream>
#include <new>
#include <stdexcept>

namespace aq {

spdlog::logger& log() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::stderr_color_mt("aq");
    l->set_pattern("%n: %^%l%$: %v");
    l->set_level(spdlog::level::info);
    return l;
  }();
  return *logger;
}

namespace cli {

namespace {
CLI::Validator number_at_least(bool strict) {
  return CLI::Validator(
      [strict](std::string& text) -> std::string {
        double v = 0;
        if (!CLI::detail::lexical_cast(text, v)) return "must be a number, not " + text;
        if (std::isnan(v) || (strict ? v <= 0 : v < 0))
          return std::string("must be ") + (strict ? "positive" : "zero or more") + ", not " + text;
        return std::string();
      },
      strict ? "POSITIVE" : "NONNEGATIVE");
}
}  // namespace

const CLI::Validator Positive = number_at_least(true);
const CLI::Validator NonNegative = number_at_least(false);

void add_common(CLI::App& app, Common& c) {
  app.add_option("--device", c.device, "Device: auto, cpu, cuda or cuda:N (auto: cuda if a GPU is visible)")
      ->capture_default_str()
      ->group("Common options");
  app.add_option("--threads", c.threads, "CPU threads for LibTorch (0: its default)")
      ->check(NonNegative)
      ->capture_default_str()
      ->group("Common options");
  app.add_option_function<uint64_t>(
         "--seed", [&c](const uint64_t& s) { c.seed = s, c.seed_given = true; },
         "Seed of LibTorch's generators (default: nondeterministic)")
      ->group("Common options");
  app.add_flag_callback("-v,--verbose", [&c] { ++c.verbosity; }, "More log output on stderr")
      ->group("Common options");
  app.add_flag_callback("-q,--quiet", [&c] { --c.verbosity; }, "Errors only on stderr")
      ->group("Common options");
}

c10::Device apply_common(const Common& c) {
  log().set_level(c.verbosity > 0 ? spdlog::level::debug
                  : c.verbosity < 0 ? spdlog::level::err
                                    : spdlog::level::info);
  if (c.threads > 0) torch::set_num_threads(c.threads);
  if (c.seed_given) torch::manual_seed(c.seed);
  c10::Device d("cpu");
  try {
    d = c.device == "auto" ? c10::Device(torch::cuda::is_available() ? "cuda" : "cpu") : c10::Device(c.device);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + c.device + "' (use auto, cpu, cuda or cuda:N)");
  }
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) throw std::runtime_error("--device " + c.device + ": no CUDA device is visible");
    if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
      throw std::runtime_error("--device " + c.device + ": only " + std::to_string(torch::cuda::device_count()) +
                               " CUDA device(s)");
    log().debug("CUDA allocator: expandable segments {}", train::use_expandable_segments() ? "on" : "off");
  } else if (!d.is_cpu()) {
    throw std::invalid_argument("unsupported device '" + c.device + "'");
  }
  return d;
}

namespace {

// The first line of a LibTorch message (they append C++ stack traces).
std::string first_line(const char* what) {
  std::string s(what);
  auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

}  // namespace

int run(CLI::App& app, int argc, char** argv, const std::function<int()>& body) {
  const std::string name = std::filesystem::path(argv[0]).filename().string();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);  // --help: stdout, status 0
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << name << ": " << e.what() << "\nTry '" << name << " --help'.\n";
    return kUsage;
  }
  try {
    return body();
  } catch (const std::invalid_argument& e) {
    std::cerr << name << ": " << first_line(e.what()) << "\nTry '" << name << " --help'.\n";
    return kUsage;
  } catch (const c10::OutOfMemoryError& e) {
    std::cerr << name << ": out of memory: " << first_line(e.what_without_backtrace()) << "\n";
  } catch (const c10::Error& e) {
    std::cerr << name << ": " << first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::bad_alloc&) {
    std::cerr << name << ": out of host memory\n";
  } catch (const std::exception& e) {
    std::cerr << name << ": " << first_line(e.what()) << "\n";
  }
  return kRuntime;
}

}  // namespace cli
}  // namespace aq
