#include "uffd/fills.h"

#include <sched.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cerrno>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::uffd {
namespace {
constexpr uint64_t kPage = 4096;
}

// A UFFDIO_COPY whose source is unreadable (address 0) fills nothing whatever the
// destination: it answers ESRCH when the mm is gone, and EFAULT, ENOENT, EEXIST or EAGAIN
// otherwise.
bool mm_alive(int fd, uint64_t dst) {
  uffdio_copy c{};
  c.dst = dst;
  c.src = 0;
  c.len = kPage;
  for (int tries = 0;; ++tries) {
    c.copy = 0;
    if (::ioctl(fd, UFFDIO_COPY, &c) == 0) return true;
    const int err = c.copy < 0 ? static_cast<int>(-c.copy) : errno;
    if (err == EAGAIN && tries < 100) {  // checked before the mm: ask again
      ::sched_yield();
      continue;
    }
    return err != ESRCH && err != ENOSPC;
  }
}

uint64_t fill_quietly(Userfaultfd& uffd, OwedSet& owed, PageServerStats& stats, uint64_t dst,
                      uint64_t n, bool zero, const char* buf, bool& gone, bool wake) {
  for (;;) {
    const long res = zero ? uffd.zeropage(dst, n, wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE)
                          : uffd.copy(dst, buf, n, wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE);
    if (res > 0) {
      const uint64_t got = static_cast<uint64_t>(res);
      ++stats.copy_ioctls;
      (zero ? stats.zero_pages : stats.prefetch_pages) += got / kPage;
      owed.erase(dst, dst + got);
      return got;
    }
    if (res == -EEXIST) {
      ++stats.eexist;
      owed.erase(dst, dst + kPage);
      return 0;
    }
    if (res == -EAGAIN) {  // events pending: the loop reads them first
      ++stats.eagain;
      return 0;
    }
    if (res == -ESRCH || res == -ENOSPC) {
      gone = true;
      return 0;
    }
    if (res == -ENOENT) {
      ++stats.enoent;
      if (n > kPage) {
        n = (n / 2 + kPage - 1) / kPage * kPage;
        continue;
      }
      stats.dropped_pages += owed.erase(dst, dst + kPage);
      return 0;
    }
    fail("UFFDIO_", zero ? "ZEROPAGE" : "COPY", " at ", hex(dst), " answered ", res);
  }
}

void fill_window_part(Userfaultfd& uffd, OwedSet& owed, PageServerStats& stats, uint64_t from,
                      uint64_t to, const char* buf, bool& gone) {
  if (from >= to) return;
  const long res = uffd.copy(from, buf, to - from);
  if (res > 0) {
    ++stats.copy_ioctls;
    stats.fault_pages += static_cast<uint64_t>(res) / kPage;
    owed.erase(from, from + static_cast<uint64_t>(res));
  } else if (res == -EEXIST) {
    ++stats.eexist;
    owed.erase(from, from + kPage);
  } else if (res == -ESRCH || res == -ENOSPC) {
    gone = true;
  } else if (res == -EAGAIN) {
    ++stats.eagain;
  } else if (res == -ENOENT) {  // the window crosses the edge of a VMA (mprotect split it)
    ++stats.enoent;
  } else {
    fail("UFFDIO_COPY at ", hex(from), " answered ", res);
  }
}

void fill_owed_part(Userfaultfd& uffd, OwedSet& owed, const image::PageStoreReader& store,
                    PageServerStats& stats, uint64_t from, uint64_t to, char* buf,
                    uint64_t buf_bytes, bool& gone) {
  to = std::min(to, from + buf_bytes);
  while (from < to) {
    const auto r = owed.next(from);
    if (!r || r->start >= to) return;
    const uint64_t s = std::max(from, r->start), e = std::min(to, r->end);
    const bool zero = r->tag == kTagZero;
    if (!zero) store.read(r->src_of(s), (e - s) / kPage, buf);
    const long res = zero ? uffd.zeropage(s, e - s) : uffd.copy(s, buf, e - s);
    if (res > 0) {
      ++stats.copy_ioctls;
      (zero ? stats.zero_pages : stats.fault_pages) += static_cast<uint64_t>(res) / kPage;
      owed.erase(s, s + static_cast<uint64_t>(res));
      if (static_cast<uint64_t>(res) < e - s) return;
      from = e;
    } else if (res == -EEXIST) {
      ++stats.eexist;
      owed.erase(s, s + kPage);
      return;
    } else if (res == -ESRCH || res == -ENOSPC) {
      gone = true;
      return;
    } else if (res == -EAGAIN) {
      ++stats.eagain;
      return;
    } else if (res == -ENOENT) {  // the window crosses the edge of a VMA (mprotect split it)
      ++stats.enoent;
      return;
    } else {
      fail("UFFDIO_", zero ? "ZEROPAGE" : "COPY", " at ", hex(s), " answered ", res);
    }
  }
}

}  // namespace lazycr::uffd
