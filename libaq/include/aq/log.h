// The one logger of libaq and its tools: spdlog, to stderr.  Internal to
// aq's build (not installed: spdlog's fmt must not meet the fmt LibTorch's
// headers bring); programs built on the installed library set its level
// through aq/logging.h.
#pragma once

#include "aq/logging.h"

#include <spdlog/spdlog.h>

namespace aq {

// The shared "aq" logger (created on first use, writes to stderr).
spdlog::logger& log();

}  // namespace aq
