// What a training run needs from the process and the file system: the
// signals that end it after a step, and its workspace folder.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <csignal>
#include <string>

namespace aq::train::detail {

// The signal that asked the run to stop (0: none).
std::atomic<int>& signal_flag();

// While in scope, SIGINT, SIGTERM and SIGUSR1 set signal_flag(), which the loop reads
// after each step; a second one (SA_RESETHAND) kills as usual.
class SignalScope {
 public:
  SignalScope();
  ~SignalScope();
  SignalScope(const SignalScope&) = delete;
  SignalScope& operator=(const SignalScope&) = delete;

 private:
  struct sigaction old_int_ {}, old_term_ {}, old_usr1_ {};
};

// mkdir -p PATH.  With create false nothing is made: it only checks, before
// the slow part of setup (datasets, checkpoints), what creating would meet:
// a prefix that is not a folder, a missing folder whose parent takes no new
// entries, or an existing workspace that takes no files.
void make_folders(const std::string& path, bool create = true);

// Checkpoints are first written at the end of an epoch: a workspace that
// takes no files (a read-only file system, even for root) fails now
// instead.  `probe` is a file name to create and remove there.
void check_writable(const std::string& workspace, const std::string& probe);

// A progress line on stderr, redrawn at most every 250 ms.
struct Progress {
  bool on;
  std::chrono::steady_clock::time_point last{};
  // Whether to redraw now (reading the running loss syncs with the device).
  bool due(int64_t batch, int64_t batches);
  void show(int64_t epoch, int64_t epochs, int64_t batch, int64_t batches, double loss, double acc, double ips);
  void end();
};

}  // namespace aq::train::detail
