#include "uffd/uffd.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>

#include "common/error.h"

namespace lazycr::uffd {
namespace {

std::string range_text(uint64_t start, uint64_t len) {
  std::ostringstream out;
  out << "0x" << std::hex << start << "+0x" << len;
  return out.str();
}

std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

// The errnos of a fill ioctl that are answers, not failures (see Userfaultfd::copy).
bool is_fill_answer(int err) {
  return err == EEXIST || err == EAGAIN || err == ESRCH || err == ENOSPC || err == ENOENT;
}

// UFFDIO_COPY and UFFDIO_ZEROPAGE report through a field of their argument: the bytes done, or
// a negative errno. The ioctl itself fails (EAGAIN) on a partial fill, and some errors
// (ESRCH, EINVAL) come back before the field is written.
long fill_result(int rc, int64_t field, uint64_t len, const char* what, int fd, uint64_t start) {
  if (rc == 0) return static_cast<long>(len);
  int err = errno;
  if (field > 0) return static_cast<long>(field);  // partial: that much was filled
  if (field < 0) err = static_cast<int>(-field);
  if (err == EINTR) err = EAGAIN;  // nothing done; let the caller retry like any EAGAIN
  if (is_fill_answer(err)) return -err;
  fail_errno_value(err, cat(what, " ", range_text(start, len), " on uffd ", fd));
}

}  // namespace

Userfaultfd Userfaultfd::create() {
  long fd = ::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd >= 0) return Userfaultfd(static_cast<int>(fd));
  const int sys_err = errno;

  UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (!dev) {
    const int dev_err = errno;
    fail_errno_value(sys_err, cat("cannot create a userfaultfd: /dev/userfaultfd: ",
                                  std::strerror(dev_err), "; userfaultfd(2)"));
  }
  int ufd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
  if (ufd < 0) {
    const int dev_err = errno;
    fail_errno_value(sys_err, cat("cannot create a userfaultfd: USERFAULTFD_IOC_NEW: ",
                                  std::strerror(dev_err), "; userfaultfd(2)"));
  }
  return Userfaultfd(ufd);
}

Userfaultfd Userfaultfd::adopt(int fd) {
  if (fd < 0) fail("cannot adopt uffd: invalid fd ", fd);
  return Userfaultfd(fd);
}

uint64_t Userfaultfd::api(uint64_t features) {
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd(), UFFDIO_API, &api) != 0) {
    int err = errno;
    fail_errno_value(err, cat("UFFDIO_API with features ", hex(features), " on uffd ", fd(),
                              err == EINVAL  ? " (feature not offered, or API already done)"
                              : err == EPERM ? " (EVENT_FORK needs CAP_SYS_PTRACE)"
                                             : ""));
  }
  features_ = features;
  ioctls_ = api.ioctls;
  return api.features;
}

uint64_t Userfaultfd::register_range(uint64_t start, uint64_t len, uint64_t mode) {
  uffdio_register reg{};
  reg.range.start = start;
  reg.range.len = len;
  reg.mode = mode;
  if (::ioctl(fd(), UFFDIO_REGISTER, &reg) != 0) {
    fail_errno("UFFDIO_REGISTER ", range_text(start, len), " mode ", hex(mode), " on uffd ", fd());
  }
  return reg.ioctls;
}

void Userfaultfd::unregister(uint64_t start, uint64_t len) {
  uffdio_range range{start, len};
  if (::ioctl(fd(), UFFDIO_UNREGISTER, &range) != 0) {
    fail_errno("UFFDIO_UNREGISTER ", range_text(start, len), " on uffd ", fd());
  }
}

long Userfaultfd::copy(uint64_t dst, const void* src, uint64_t len, uint64_t flags) {
  uffdio_copy c{};
  c.dst = dst;
  c.src = reinterpret_cast<uint64_t>(src);
  c.len = len;
  c.mode = flags;
  int rc = ::ioctl(fd(), UFFDIO_COPY, &c);
  return fill_result(rc, c.copy, len, "UFFDIO_COPY", fd(), dst);
}

long Userfaultfd::zeropage(uint64_t start, uint64_t len, uint64_t flags) {
  uffdio_zeropage z{};
  z.range.start = start;
  z.range.len = len;
  z.mode = flags;
  int rc = ::ioctl(fd(), UFFDIO_ZEROPAGE, &z);
  return fill_result(rc, z.zeropage, len, "UFFDIO_ZEROPAGE", fd(), start);
}

void Userfaultfd::wake(uint64_t start, uint64_t len) {
  uffdio_range range{start, len};
  if (::ioctl(fd(), UFFDIO_WAKE, &range) != 0) {
    fail_errno("UFFDIO_WAKE ", range_text(start, len), " on uffd ", fd());
  }
}

size_t Userfaultfd::read_events(std::vector<uffd_msg>& out) {
  constexpr size_t kBatch = 64;
  // A blocking fd (adopted) must not be read unless poll says a message is there; the kernel
  // then returns what is pending without waiting for more.
  int fl = ::fcntl(fd(), F_GETFL);
  if (fl < 0) fail_errno("fcntl F_GETFL on uffd ", fd());
  const bool blocking = !(fl & O_NONBLOCK);
  size_t got = 0;
  for (;;) {
    if (blocking) {
      pollfd p{fd(), POLLIN, 0};
      int r = ::poll(&p, 1, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail_errno("poll uffd ", fd());
      if (r == 0 || !(p.revents & POLLIN)) return got;
    }
    const size_t old = out.size();
    out.resize(old + kBatch);
    ssize_t n = ::read(fd(), out.data() + old, kBatch * sizeof(uffd_msg));
    if (n < 0) {
      int err = errno;
      out.resize(old);
      if (err == EINTR) continue;
      if (err == EAGAIN) return got;
      fail_errno_value(err, cat("read uffd ", fd()));
    }
    const size_t msgs = static_cast<size_t>(n) / sizeof(uffd_msg);
    out.resize(old + msgs);
    got += msgs;
    if (msgs < kBatch) return got;
  }
}

}  // namespace lazycr::uffd
