// How much libaq logs (one logger, to stderr: "aq: LEVEL: message"), for
// programs built on the library.  The logger itself (aq/log.h, spdlog) is
// internal to libaq and its tools and is not installed: spdlog's fmt must
// not meet the fmt LibTorch's headers bring.
#pragma once

namespace aq {

enum class LogLevel { kDebug, kInfo, kWarn, kError, kOff };

// Messages below `level` are dropped (default: kInfo).
void set_log_level(LogLevel level);

}  // namespace aq
