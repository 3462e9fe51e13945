#include "restore/clone_dontfork.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "restore/memory.h"

namespace lazycr::restore {

void check_dontfork_area(const image::MemoryArea& a) {
  if (!has_vmflag(a.vmflags(), "dc")) return;
  const bool anon = a.kind() == image::MemoryArea::ANON || a.kind() == image::MemoryArea::HEAP;
  if (a.shared() || !anon || a.growsdown())
    fail("area ", hex(a.start()), "-", hex(a.end()), " ", a.name(),
         " is MADV_DONTFORK and not private anonymous memory: clones cannot be given it");
}

void copy_dontfork_areas(Restoree& tpl, Restoree& c, const image::Process& p) {
  UniqueFd from, to;
  std::vector<char> buf;
  for (const auto& a : p.areas()) {
    if (!has_vmflag(a.vmflags(), "dc")) continue;
    const uint64_t len = a.end() - a.start();
    const std::string where = cat("MADV_DONTFORK area ", hex(a.start()), "-", hex(a.end()));
    long got =
        c.inject(cat("mmap of ", where), SYS_mmap, a.start(), len, a.prot(),
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, static_cast<uint64_t>(-1), 0);
    if (static_cast<uint64_t>(got) != a.start())
      fail("mmap of ", where, " in the clone gave ", hex(static_cast<uint64_t>(got)));
    if (!from) {
      from.reset(::open(cat("/proc/", tpl.pid(), "/mem").c_str(), O_RDONLY | O_CLOEXEC));
      to.reset(::open(cat("/proc/", c.pid(), "/mem").c_str(), O_RDWR | O_CLOEXEC));
      if (!from || !to) fail_errno("opening /proc/PID/mem of the template and of the clone");
      buf.resize(1 << 20);
    }
    // Chunks of zeros are left unwritten: the new area reads zero there already.
    for (uint64_t at = a.start(); at < a.end(); at += buf.size()) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), a.end() - at));
      if (::pread(from.get(), buf.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
        fail_errno("reading ", where, " of the template at ", hex(at));
      if (std::all_of(buf.begin(), buf.begin() + static_cast<long>(n),
                      [](char x) { return x == 0; }))
        continue;
      if (::pwrite(to.get(), buf.data(), n, static_cast<off_t>(at)) != static_cast<ssize_t>(n))
        fail_errno("writing ", where, " of the clone at ", hex(at));
    }
    c.inject(cat("MADV_DONTFORK of ", where), SYS_madvise, a.start(), len, MADV_DONTFORK);
    if (has_vmflag(a.vmflags(), "hg"))
      c.inject(cat("MADV_HUGEPAGE of ", where), SYS_madvise, a.start(), len, MADV_HUGEPAGE);
    if (has_vmflag(a.vmflags(), "nh"))
      c.inject(cat("MADV_NOHUGEPAGE of ", where), SYS_madvise, a.start(), len, MADV_NOHUGEPAGE);
  }
}

}  // namespace lazycr::restore
