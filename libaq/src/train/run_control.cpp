#include "run_control.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
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
}

SignalScope::~SignalScope() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
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

void Progress::show(int64_t epoch, int64_t epochs, int64_t batch, int64_t batches, double loss, double acc, double ips) {
  const int width = 24;
  const int done = static_cast<int>(width * batch / std::max<int64_t>(1, batches));
  std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld loss %.4f acc %.2f%% %.0f img/s ",
               static_cast<long long>(epoch + 1), static_cast<long long>(epochs), std::string(done, '=').c_str(),
               std::string(width - done, ' ').c_str(), static_cast<long long>(batch),
               static_cast<long long>(batches), loss, acc, ips);
  std::fflush(stderr);
}

void Progress::end() {
  if (on) std::fprintf(stderr, "\r\033[K");
}

}  // namespace aq::train::detail
