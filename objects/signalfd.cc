// signalfd (SIGNALFD): its signal mask from fdinfo; made again by lazycr (a signalfd reads the
// signals of whichever process reads it, not of its creator).
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "common/error.h"
#include "common/json.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

// SIGKILL and SIGSTOP cannot be in a signalfd's mask (the kernel drops them).
constexpr uint64_t kUnmaskable = (uint64_t{1} << (SIGKILL - 1)) | (uint64_t{1} << (SIGSTOP - 1));

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  f.mutable_signalfd()->set_mask(fdinfo_number(src.fdinfo, "sigmask", 16));
}

void validate(const image::FileDescriptor& f, const std::set<int>&) {
  if (!f.has_signalfd()) fail("has no signalfd state");
  if (f.signalfd().mask() & kUnmaskable)
    fail("signalfd mask ", hex(f.signalfd().mask()), " holds SIGKILL or SIGSTOP");
}

UniqueFd create(const image::FileDescriptor& f, const FdCreateContext&) {
  // The kernel's 8-byte mask as is: glibc's sigaddset() refuses its own signals 32 and 33.
  uint64_t mask = f.signalfd().mask();
  const int flags = SFD_CLOEXEC | (f.flags() & O_NONBLOCK ? SFD_NONBLOCK : 0);
  UniqueFd fd(static_cast<int>(::syscall(SYS_signalfd4, -1, &mask, sizeof mask, flags)));
  if (!fd) fail_errno("signalfd(mask ", hex(mask), ")");
  return fd;
}

}  // namespace

const FdKind kSignalfdKind = {
    image::FileDescriptor::SIGNALFD, "[signalfd]", dump, validate, create, nullptr};

}  // namespace lazycr::objects
