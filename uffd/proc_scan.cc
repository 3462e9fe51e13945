#include "uffd/proc_scan.h"

#include <dirent.h>
#include <linux/kcmp.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "common/proc.h"

namespace lazycr::uffd {

pid_t parent_of(pid_t pid) {
  auto st = proc::try_read_stat(pid);
  return st ? st->ppid : -1;
}

uint64_t boot_ticks() {
  timespec ts{};
  ::clock_gettime(CLOCK_BOOTTIME, &ts);
  const long hz = ::sysconf(_SC_CLK_TCK);
  return static_cast<uint64_t>(ts.tv_sec) * static_cast<uint64_t>(hz) +
         static_cast<uint64_t>(ts.tv_nsec) / (1'000'000'000ull / static_cast<uint64_t>(hz));
}

std::vector<std::pair<pid_t, uint64_t>> children_of(pid_t parent) {
  std::vector<std::pair<pid_t, uint64_t>> out;
  if (parent <= 0) return out;
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr) return out;
  while (dirent* d = ::readdir(dir)) {
    char* end = nullptr;
    long pid = std::strtol(d->d_name, &end, 10);
    if (pid <= 0 || end == d->d_name || *end != 0) continue;
    auto st = proc::try_read_stat(static_cast<pid_t>(pid));
    if (st && st->ppid == parent) out.emplace_back(static_cast<pid_t>(pid), st->start_time);
  }
  ::closedir(dir);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<pid_t> pids_of(const std::vector<std::pair<pid_t, uint64_t>>& v) {
  std::vector<pid_t> out;
  for (const auto& [pid, start] : v) out.push_back(pid);
  return out;
}

bool same_mm(pid_t a, pid_t b) {
  return ::syscall(SYS_kcmp, a, b, KCMP_VM, 0, 0) == 0;
}

std::vector<pid_t> fork_candidates(pid_t parent, uint64_t fork_ticks,
                                   const std::vector<pid_t>& preexisting,
                                   const std::set<pid_t>& seen) {
  std::vector<pid_t> out;
  for (const auto& [c, start] : children_of(parent)) {
    if (seen.count(c) || start + 1 < fork_ticks) continue;
    if (std::binary_search(preexisting.begin(), preexisting.end(), c)) continue;
    if (same_mm(c, parent)) continue;
    out.push_back(c);
  }
  return out;
}

}  // namespace lazycr::uffd
