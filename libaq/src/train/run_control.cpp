#include "run_control.h"

#include <fcntl.h>
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
