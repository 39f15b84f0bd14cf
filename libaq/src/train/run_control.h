// What a training run needs from the process and the file system: the
// signals that end it after a step, and its workspace folder.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <csignal>
#include <string>
#include <vector>

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

// One writer per workspace: an exclusive flock() on <workspace>/.aq-train.lock,
// held while the object lives, with the holder's PID written in the file.
// The kernel releases it when the holder dies, so a lock file left by a
// killed run blocks nothing.  Throws std::runtime_error naming the holder's
// PID when another process holds it.
class WorkspaceLock {
 public:
  WorkspaceLock(const std::string& workspace, const std::string& file);
  ~WorkspaceLock();
  WorkspaceLock(const WorkspaceLock&) = delete;
  WorkspaceLock& operator=(const WorkspaceLock&) = delete;

 private:
  int fd_ = -1;
};

// Removes the temporary files (".<name>.tmp-<pid>-<hex>", as checkpoint
// saves write them) that a process no longer alive left in `workspace`;
// returns their names.
std::vector<std::string> remove_stale_temporaries(const std::string& workspace);

// A progress line on stderr, redrawn at most every 250 ms, fitted to the
// terminal's width and cleared to its end on each redraw.
struct Progress {
  bool on;
  std::chrono::steady_clock::time_point last{};
  // Whether to redraw now (reading the running loss syncs with the device).
  bool due(int64_t batch, int64_t batches);
  // "<prefix> [=====     ] <done>/<total> <suffix>", the bar as wide as the
  // terminal leaves room for (none on a narrow one, the text then cut).
  void show(const std::string& prefix, int64_t done, int64_t total, const std::string& suffix);
  void end();
};

// The terminal's width in columns (80 when stderr is not a terminal).
int terminal_width();

// "45s", "12m05s", "3h07m", "2d04h".
std::string duration(double seconds);

// The current UTC time as 2026-01-31T12:00:00Z.
std::string now_utc();

}  // namespace aq::train::detail
