#include "aq/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

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

void set_log_level(LogLevel level) {
  static constexpr spdlog::level::level_enum kLevels[] = {spdlog::level::debug, spdlog::level::info,
                                                           spdlog::level::warn, spdlog::level::err,
                                                           spdlog::level::off};
  log().set_level(kLevels[static_cast<int>(level)]);
}

}  // namespace aq
