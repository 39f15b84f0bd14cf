#include "aq/dist.h"

#include <cerrno>
#include <cstdlib>
#include <stdexcept>

namespace aq::dist {

namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// A whole non-negative number, or throws naming the variable.
int64_t number(const Getenv& get, const char* name) {
  const char* v = get(name);
  if (!v || !*v) bad(std::string(name) + " is not set");
  errno = 0;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  if (errno || *end || n < 0) bad(std::string(name) + " must be a whole number, not '" + v + "'");
  return n;
}

}  // namespace

std::vector<std::string> expand_nodelist(const std::string& list) {
  std::vector<std::string> hosts;
  const auto malformed = [&] { bad("SLURM_JOB_NODELIST '" + list + "' is not a host list"); };
  size_t i = 0;
  while (i < list.size()) {
    // One host expression: a prefix, then [ranges] groups, up to a comma at depth 0.
    std::vector<std::string> names{""};
    size_t start = i;
    while (i < list.size() && list[i] != ',') {
      if (list[i] == '[') {
        const size_t close = list.find(']', i);
        if (close == std::string::npos) malformed();
        std::vector<std::string> parts;
        std::string body = list.substr(i + 1, close - i - 1);
        size_t p = 0;
        while (p <= body.size()) {
          size_t comma = body.find(',', p);
          if (comma == std::string::npos) comma = body.size();
          const std::string r = body.substr(p, comma - p);
          const size_t dash = r.find('-');
          const std::string a = r.substr(0, dash), b = dash == std::string::npos ? a : r.substr(dash + 1);
          if (a.empty() || b.empty() || a.find_first_not_of("0123456789") != std::string::npos ||
              b.find_first_not_of("0123456789") != std::string::npos || a.size() > 9 || b.size() > 9)
            malformed();
          const long lo = std::stol(a), hi = std::stol(b);
          if (hi < lo || hi - lo > 100000) malformed();
          for (long n = lo; n <= hi; ++n) {
            std::string s = std::to_string(n);
            if (s.size() < a.size()) s.insert(0, a.size() - s.size(), '0');
            parts.push_back(s);
          }
          p = comma + 1;
        }
        std::vector<std::string> grown;
        for (const auto& n : names)
          for (const auto& s : parts) grown.push_back(n + s);
        names.swap(grown);
        i = close + 1;
      } else if (list[i] == ']') {
        malformed();
      } else {
        for (auto& n : names) n += list[i];
        ++i;
      }
    }
    if (i == start) malformed();  // an empty item
    for (auto& n : names) hosts.push_back(std::move(n));
    if (i < list.size()) {
      ++i;  // the comma
      if (i == list.size()) malformed();
    }
  }
  if (hosts.empty()) malformed();
  return hosts;
}

std::optional<Env> read_env(const Getenv& given) {
  const Getenv get = given ? given : Getenv([](const char* n) -> const char* { return std::getenv(n); });
  auto set = [&](const char* n) { return get(n) != nullptr; };
  Env e;
  if (set("RANK") || set("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = number(get, "RANK");
    e.world_size = number(get, "WORLD_SIZE");
    e.local_rank = set("LOCAL_RANK") ? number(get, "LOCAL_RANK") : e.rank;
    const char* addr = get("MASTER_ADDR");
    if (!addr || !*addr) bad("MASTER_ADDR is not set (torchrun sets it; give it with RANK and WORLD_SIZE)");
    e.master_addr = addr;
    if (!set("MASTER_PORT")) bad("MASTER_PORT is not set (torchrun sets it; give it with RANK and WORLD_SIZE)");
    const int64_t port = number(get, "MASTER_PORT");
    if (port < 1 || port > 65535) bad("MASTER_PORT must be in 1..65535, not " + std::to_string(port));
    e.master_port = static_cast<int>(port);
  } else if (set("SLURM_PROCID") && set("SLURM_NTASKS")) {
    e.world_size = number(get, "SLURM_NTASKS");
    if (e.world_size <= 1) return std::nullopt;  // a one-task job step: as without a launcher
    e.launcher = "slurm";
    e.rank = number(get, "SLURM_PROCID");
    e.local_rank = set("SLURM_LOCALID") ? number(get, "SLURM_LOCALID") : 0;
    if (const char* addr = get("MASTER_ADDR"); addr && *addr) {
      e.master_addr = addr;
    } else {
      const char* list = get("SLURM_JOB_NODELIST");
      if (!list || !*list) list = get("SLURM_NODELIST");
      if (!list || !*list) bad("SLURM_JOB_NODELIST is not set: cannot find the master host (or set MASTER_ADDR)");
      e.master_addr = expand_nodelist(list).front();
    }
    if (set("MASTER_PORT")) {
      const int64_t port = number(get, "MASTER_PORT");
      if (port < 1 || port > 65535) bad("MASTER_PORT must be in 1..65535, not " + std::to_string(port));
      e.master_port = static_cast<int>(port);
    } else if (set("SLURM_JOB_ID")) {
      // One port per job, so that jobs sharing a node do not collide.
      e.master_port = static_cast<int>(20000 + number(get, "SLURM_JOB_ID") % 20000);
    }
  } else {
    return std::nullopt;
  }
  if (e.world_size < 1) bad("WORLD_SIZE must be at least 1");
  if (e.rank >= e.world_size)
    bad("rank " + std::to_string(e.rank) + " is not below the world size " + std::to_string(e.world_size));
  return e;
}

}  // namespace aq::dist
