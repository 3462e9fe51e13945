// pidfd (PIDFD) of a process of the image: the pid from fdinfo; made again inside its holder
// once the restored tree exists (pidfd_open of the image's pid: the tree has its pids), with
// PIDFD_NONBLOCK if it had it. Refused: a pidfd of a process outside the image, of one gone,
// of a thread (PIDFD_THREAD).
#include <fcntl.h>
#include <sys/syscall.h>

#include "common/error.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  auto pid_text = fdinfo_value(src.fdinfo, "Pid");
  if (!pid_text) fail("this kernel's fdinfo does not name the pidfd's process");
  const int pid = std::stoi(*pid_text);
  if (pid == -1) fail("its process has exited and been reaped");
  if (pid <= 0) fail("its process is outside lazycr's PID namespace");
  if (f.flags() & O_EXCL) fail("a pidfd of a thread (PIDFD_THREAD), which lazycr cannot restore");
  if (!src.tree->count(pid)) fail("it refers to pid ", pid, ", which is not in the dumped tree");
  f.mutable_pidfd()->set_pid(pid);
}

void validate(const image::FileDescriptor& f, const std::set<int>& image_pids) {
  if (!f.has_pidfd()) fail("has no pidfd state");
  if (!image_pids.count(f.pidfd().pid()))
    fail("a pidfd of pid ", f.pidfd().pid(), ", which is not a process of the image");
  if (f.flags() & O_EXCL) fail("a pidfd of a thread (PIDFD_THREAD)");
}

long create_inside(RemoteProcess& p, const image::FileDescriptor& f) {
  return p.call(0, cat("pidfd_open(", f.pidfd().pid(), ") for fd ", f.fd()), SYS_pidfd_open,
                static_cast<uint64_t>(f.pidfd().pid()), f.flags() & O_NONBLOCK);
}

}  // namespace

const FdKind kPidfdKind = {
    image::FileDescriptor::PIDFD, "[pidfd]", dump, validate, nullptr, create_inside};

}  // namespace lazycr::objects
