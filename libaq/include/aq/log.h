// The one logger of libaq and its tools: spdlog, to stderr.
#pragma once

#include <spdlog/spdlog.h>

namespace aq {

// The shared "aq" logger (created on first use, writes to stderr).
spdlog::logger& log();

}  // namespace aq
