#include "restore/huge_collapse.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/linux_abi.h"
#include "common/proc.h"
#include "restore/clone_dontfork.h"
#include "restore/memory.h"
#include "restore/restoree.h"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace lazycr::restore {
namespace {

constexpr uint64_t kHuge = 2ull << 20;
constexpr uint64_t kPage = 4096;
constexpr size_t kPerHuge = kHuge / kPage;

// Whether every page of the 2 MiB at `addr` is present (not swapped, not unpopulated).
bool fully_present(int pagemap, uint64_t addr) {
  uint64_t e[kPerHuge];
  const off_t at = static_cast<off_t>(addr / kPage * sizeof(uint64_t));
  if (::pread(pagemap, e, sizeof e, at) != static_cast<ssize_t>(sizeof e)) return false;
  for (uint64_t v : e)
    if (!(v & abi::kPmPresent) || (v & abi::kPmFile)) return false;
  return true;
}

}  // namespace

uint64_t anon_huge_bytes(pid_t pid) {
  const auto text = proc::try_read_file(cat("/proc/", pid, "/smaps_rollup"));
  if (!text) return 0;
  const auto at = text->find("\nAnonHugePages:");
  if (at == std::string::npos) return 0;
  return std::strtoull(text->c_str() + at + 16, nullptr, 10) * 1024;
}

CollapseStats collapse_huge_pages(HeldTemplate& t) {
  CollapseStats st;
  Restoree& tpl = t.root;
  UniqueFd pagemap(::open(cat("/proc/", tpl.pid(), "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap) return st;  // nothing known about what is populated: leave it all
  // Ranges [start, end) to collapse, each a run of fully present 2 MiB blocks of one area.
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& a : t.img.processes().front().areas()) {
    if (a.shared() || (a.kind() != image::MemoryArea::ANON && a.kind() != image::MemoryArea::HEAP))
      continue;
    if (has_vmflag(a.vmflags(), "nh") || has_vmflag(a.vmflags(), "dc") ||
        has_vmflag(a.vmflags(), "io") || has_vmflag(a.vmflags(), "pf"))
      continue;
    const uint64_t lo = (a.start() + kHuge - 1) & ~(kHuge - 1);
    const uint64_t hi = a.end() & ~(kHuge - 1);
    for (uint64_t b = lo; b + kHuge <= hi; b += kHuge) {
      if (!fully_present(pagemap.get(), b)) continue;
      st.candidate_bytes += kHuge;
      if (!ranges.empty() && ranges.back().second == b)
        ranges.back().second = b + kHuge;
      else
        ranges.emplace_back(b, b + kHuge);
    }
  }
  for (const auto& [start, end] : ranges) {
    // Raw: a refusal is not an error. The kernel collapses what it can of the range and
    // returns the last failure; EINVAL means no MADV_COLLAPSE at all (or THP disabled).
    long rc = tpl.inject_raw(SYS_madvise, start, end - start, MADV_COLLAPSE);
    if (rc == 0) {
      st.collapsed_bytes += end - start;
      continue;
    }
    st.refused_calls++;
    st.last_errno = static_cast<int>(-rc);
    if (rc == -EINVAL || rc == -EPERM) break;  // it will refuse every range alike
  }
  st.huge_bytes = anon_huge_bytes(tpl.pid());
  return st;
}

}  // namespace lazycr::restore
