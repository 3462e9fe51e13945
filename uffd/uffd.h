// A narrow wrapper over one userfaultfd (uffd) file descriptor: creation, UFFDIO_API,
// register/unregister, the fill ioctls and event reads. It knows nothing of processes or images.
//
// Errors: set-up calls (create, api, register_range, unregister, wake, read_events) throw
// lazycr::Error naming the ioctl, the range and the fd, with sys_errno() set. The fill calls
// (copy, zeropage) instead return the errno the page server branches on (see copy()).
#pragma once

#include <linux/userfaultfd.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/fd.h"
#include "common/linux_abi.h"

namespace lazycr::uffd {

class Userfaultfd {
 public:
  Userfaultfd() = default;
  Userfaultfd(Userfaultfd&&) noexcept = default;
  Userfaultfd& operator=(Userfaultfd&&) noexcept = default;
  Userfaultfd(const Userfaultfd&) = delete;
  Userfaultfd& operator=(const Userfaultfd&) = delete;

  // A new uffd for the calling process's mm, O_CLOEXEC | O_NONBLOCK: userfaultfd(2), and if
  // that is refused, /dev/userfaultfd + USERFAULTFD_IOC_NEW. Never UFFD_USER_MODE_ONLY (kernel
  // accesses to lazy pages must fault in, not fail with EFAULT).
  static Userfaultfd create();
  // Takes ownership of an existing uffd, e.g. one pulled out of a restored process with
  // pidfd_getfd, or the fd announced by a UFFD_EVENT_FORK message. Its file status flags are
  // left alone (they are shared with the other process's copy); read_events() copes with a
  // blocking fd.
  static Userfaultfd adopt(int fd);

  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }
  // Closes the uffd: threads blocked on its faults are woken and the areas are no longer
  // handled (they read zero pages from then on).
  void reset() { fd_.reset(); }

  // UFFDIO_API (once per uffd) enabling exactly `features` (UFFD_FEATURE_*). Returns every
  // feature the kernel offers. Throws if a requested feature is not offered (EINVAL) or not
  // permitted (EPERM: EVENT_FORK needs CAP_SYS_PTRACE).
  uint64_t api(uint64_t features);
  uint64_t features() const { return features_; }  // enabled by api()
  uint64_t ioctls() const { return ioctls_; }      // api-level ioctls, from api()

  // UFFDIO_REGISTER of [start, start + len) (page aligned) with mode UFFDIO_REGISTER_MODE_*.
  // Returns the ioctls allowed on the range (bit 1 << _UFFDIO_COPY, ...).
  uint64_t register_range(uint64_t start, uint64_t len,
                          uint64_t mode = UFFDIO_REGISTER_MODE_MISSING);
  void unregister(uint64_t start, uint64_t len);

  // UFFDIO_COPY of len bytes (page multiple) from our src to dst in the uffd's mm; flags are
  // UFFDIO_COPY_MODE_*. Returns the bytes copied (len, or fewer when the kernel stopped part
  // way: the rest was not copied), or a negative errno the page server branches on:
  //   -EEXIST  the first page is already present (someone filled it; the faulting thread is
  //            not woken by a failed copy: wake() it),
  //   -EAGAIN  layout events (fork, remap, remove, unmap) are pending: read them, then retry,
  //   -ESRCH   the mm is gone (process exited); -ENOSPC on older kernels,
  //   -ENOENT  no registered area there any more.
  // Other errors (EINVAL for a bad range, EFAULT for a bad src, ENOMEM, ...) throw.
  long copy(uint64_t dst, const void* src, uint64_t len, uint64_t flags = 0);
  // UFFDIO_ZEROPAGE: same contract as copy(); flags are UFFDIO_ZEROPAGE_MODE_*.
  long zeropage(uint64_t start, uint64_t len, uint64_t flags = 0);
  // UFFDIO_WAKE: wakes threads waiting on faults in the range.
  void wake(uint64_t start, uint64_t len);

  // Appends every message available now (without blocking) to `out`; returns how many were
  // appended (0 when none is pending). A UFFD_EVENT_FORK message installs the child's uffd in
  // this process at read time: adopt msg.arg.fork.ufd. Allocates only when `out` lacks
  // capacity; a reader in the same process as a thread that forks must reserve it first (glibc
  // holds the malloc locks across a fork that waits for its FORK event to be read).
  size_t read_events(std::vector<uffd_msg>& out);

 private:
  explicit Userfaultfd(int fd) : fd_(fd) {}
  UniqueFd fd_;
  uint64_t features_ = 0;
  uint64_t ioctls_ = 0;
};

}  // namespace lazycr::uffd
