#include "uffd/huge_collapse.h"

#include <limits.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "common/log.h"

namespace lazycr::uffd {

void collapse_huge_areas(pid_t pid, int pidfd, const std::vector<LazyArea>& areas) {
  constexpr uint64_t kHuge = 2 * 1024 * 1024;
  constexpr int kMadvCollapse = 25;  // MADV_COLLAPSE (Linux 6.1), not in every libc's headers
  std::vector<iovec> blocks;
  for (const LazyArea& a : areas) {
    const uint64_t from = (a.start + kHuge - 1) & ~(kHuge - 1), to = a.end & ~(kHuge - 1);
    if (from < to) blocks.push_back({reinterpret_cast<void*>(from), to - from});
  }
  uint64_t asked = 0;
  for (size_t i = 0; i < blocks.size(); i += IOV_MAX) {
    const size_t n = std::min<size_t>(IOV_MAX, blocks.size() - i);
    for (size_t k = i; k < i + n; k++) asked += blocks[k].iov_len;
    if (::syscall(SYS_process_madvise, pidfd, &blocks[i], n, kMadvCollapse, 0) < 0) {
      log::debug("page server: pid ", pid,
                 ": MADV_COLLAPSE of its huge-page areas: ", std::strerror(errno),
                 " (left in 4 KiB pages)");
      return;
    }
  }
  if (asked > 0)
    log::debug("page server: pid ", pid, ": ", asked >> 20, " MiB of huge-page areas collapsed");
}

}  // namespace lazycr::uffd
