#include "run_control.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string>

namespace aq::train::detail {

namespace {
std::atomic<int> g_signal{0};
extern "C" void on_signal(int s) { g_signal.store(s); }
}  // namespace

std::atomic<int>& signal_flag() { return g_signal; }

SignalScope::SignalScope() {
  g_signal.store(0);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  sigaction(SIGINT, &sa, &old_int_);
  sigaction(SIGTERM, &sa, &old_term_);
  sigaction(SIGUSR1, &sa, &old_usr1_);  // SLURM's --signal=USR1@T: time left to checkpoint
}

SignalScope::~SignalScope() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
}

// POSIX calls, not std::filesystem: LibTorch exports its own copies of some
// std::filesystem functions, which the dynamic linker may bind instead.
void make_folders(const std::string& path, bool create) {
  std::string parent = !path.empty() && path[0] == '/' ? "/" : ".";
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (prefix.empty()) continue;
    struct stat st {};
    const auto cannot_create = [&] {
      return std::runtime_error("--workspace " + path + ": cannot create " + prefix + ": " + std::strerror(errno));
    };
    if (::stat(prefix.c_str(), &st) == 0) {
      if (!S_ISDIR(st.st_mode)) throw std::runtime_error("--workspace " + path + ": " + prefix + " is not a folder");
    } else if (!create) {  // the rest would be made inside parent
      if (errno != ENOENT || ::access(parent.c_str(), W_OK | X_OK) != 0) throw cannot_create();
      return;
    } else if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
      throw cannot_create();
    }
    parent = prefix;
  }
  const std::string dir = path.empty() ? "." : path;
  if (!create && ::access(dir.c_str(), W_OK | X_OK) != 0)
    throw std::runtime_error("--workspace " + path + ": cannot write there: " + std::strerror(errno));
}

void check_writable(const std::string& workspace, const std::string& probe) {
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw std::runtime_error("--workspace " + workspace + ": cannot write there: " + std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

WorkspaceLock::WorkspaceLock(const std::string& workspace, const std::string& file) {
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd_ < 0)
    throw std::runtime_error("--workspace " + workspace + ": cannot create " + file + ": " + std::strerror(errno));
  while (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    const int err = errno;
    std::string holder;
    char buf[32] = {};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    if (n > 0) holder = std::string(buf, static_cast<size_t>(n)).substr(0, std::string(buf).find('\n'));
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      throw std::runtime_error("--workspace " + workspace + " is in use by another aq-train (PID " +
                               (holder.empty() ? std::string("unknown") : holder) + ", holding " + file +
                               "): two runs would overwrite each other's checkpoints");
    throw std::runtime_error("--workspace " + workspace + ": cannot lock " + file + ": " + std::strerror(err));
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error("--workspace " + workspace + ": cannot write " + file + ": " + std::strerror(err));
  }
}

WorkspaceLock::~WorkspaceLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the lock; the file stays (removing it would race the next run)
}

std::vector<std::string> remove_stale_temporaries(const std::string& workspace) {
  std::vector<std::string> removed;
  const std::string dir = workspace.empty() ? "." : workspace;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return removed;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    const size_t tag = name.rfind(".tmp-");
    if (name.size() < 2 || name[0] != '.' || tag == std::string::npos) continue;
    const size_t dash = name.find('-', tag + 5);
    if (dash == std::string::npos || dash == tag + 5 || dash + 1 >= name.size()) continue;
    const std::string pid_text = name.substr(tag + 5, dash - tag - 5), hex = name.substr(dash + 1);
    if (pid_text.find_first_not_of("0123456789") != std::string::npos || pid_text.size() > 9 ||
        hex.find_first_not_of("0123456789abcdef") != std::string::npos)
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid <= 0 || pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
    const std::string path = dir + "/" + name;
    if (::unlink(path.c_str()) == 0) removed.push_back(path);
  }
  ::closedir(d);
  return removed;
}

bool Progress::due(int64_t batch, int64_t batches) {
  if (!on) return false;
  auto now = std::chrono::steady_clock::now();
  if (batch != batches && now - last < std::chrono::milliseconds(250)) return false;
  last = now;
  return true;
}

void Progress::show(const std::string& prefix, int64_t done, int64_t total, const std::string& suffix) {
  const int columns = terminal_width() - 1;  // the last column would wrap on some terminals
  const std::string count = std::to_string(done) + "/" + std::to_string(total);
  std::string line;
  const int room = columns - static_cast<int>(prefix.size() + count.size() + suffix.size()) - 5;
  if (room >= 10) {
    const int bar = std::min(room, 40);
    const int full = static_cast<int>(bar * done / std::max<int64_t>(1, total));
    line = prefix + " [" + std::string(full, '=') + std::string(bar - full, ' ') + "] " + count + " " + suffix;
  } else {
    line = prefix + " " + count + " " + suffix;
  }
  if (static_cast<int>(line.size()) > columns) line.resize(std::max(columns, 0));
  std::fprintf(stderr, "\r%s\033[K", line.c_str());
  std::fflush(stderr);
}

int terminal_width() {
  struct winsize ws {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

std::string duration(double s) {
  if (!(s >= 0) || s > 1e9) return "?";
  const auto t = static_cast<long long>(s + 0.5);
  char buf[32];
  if (t < 60)
    std::snprintf(buf, sizeof buf, "%llds", t);
  else if (t < 3600)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
  else if (t < 86400)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", t / 3600, t / 60 % 60);
  else
    std::snprintf(buf, sizeof buf, "%lldd%02lldh", t / 86400, t / 3600 % 24);
  return buf;
}

std::string now_utc() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::tm tm {};
  ::gmtime_r(&t, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void Progress::end() {
  if (on) std::fprintf(stderr, "\r\033[K");
}

}  // namespace aq::train::detail
