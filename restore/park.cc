#include "restore/park.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "common/ptrace.h"
#include "uffd/keeper.h"

namespace lazycr::restore {

ParkedKeeper park_keeper(RemoteProcess& target, const image::Process& proc) {
  // Below the image's own soft limit and the one the process has now (dup3 checks it).
  unsigned long limit = 1024;
  for (const auto& l : proc.rlimits())
    if (l.resource() == RLIMIT_NOFILE && l.cur() < limit) limit = l.cur();
  struct rlimit64 now {};
  if (::syscall(SYS_prlimit64, target.pid(), RLIMIT_NOFILE, nullptr, &now) == 0 &&
      now.rlim_cur < limit)
    limit = now.rlim_cur;
  std::vector<int> taken;
  for (const auto& f : proc.fds()) taken.push_back(f.fd());
  ParkedKeeper k;
  const int parked = uffd::choose_parked_fd(taken, limit);
  if (parked < 0) {
    log::warn("pid ", target.pid(), ": no free descriptor below ", limit,
              " to park the page server's keeper: only the guardian guards its memory");
    return k;
  }
  const int zeros[2] = {-1, -1};
  const uint64_t addr = target.put_data(zeros, sizeof zeros);
  target.inject("socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC) for the keeper", SYS_socketpair,
                AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, addr);
  int sv[2];
  remote_read(target.pid(), addr, sv, sizeof sv);
  long send_end = ::syscall(SYS_pidfd_getfd, target.pidfd(), sv[1], 0);
  int err = errno;
  long recv_end = send_end < 0 ? -1 : ::syscall(SYS_pidfd_getfd, target.pidfd(), sv[0], 0);
  if (recv_end < 0 && send_end >= 0) err = errno;
  k.send_end.reset(static_cast<int>(send_end));
  k.recv_end.reset(static_cast<int>(recv_end));
  long got = -1;
  if (k.recv_end)
    got = target.inject(cat("dup3(", sv[0], ", ", parked, ", O_CLOEXEC) of the keeper"), SYS_dup3,
                        static_cast<uint64_t>(sv[0]), static_cast<uint64_t>(parked), O_CLOEXEC);
  target.inject("close of the keeper's socket", SYS_close, static_cast<uint64_t>(sv[0]));
  target.inject("close of the keeper's socket", SYS_close, static_cast<uint64_t>(sv[1]));
  if (!k.recv_end)
    fail_errno_value(err, cat("pidfd_getfd of the keeper's socket (pid ", target.pid(), ")"));
  k.parked_fd = static_cast<int>(got);
  return k;
}

bool still_parked(pid_t pid, int fd, int recv_end) {
  struct stat st {};
  if (::fstat(recv_end, &st) != 0) return false;
  char buf[64];
  ssize_t n = ::readlink(cat("/proc/", pid, "/fd/", fd).c_str(), buf, sizeof buf);
  return n > 0 && std::string(buf, static_cast<size_t>(n)) == cat("socket:[", st.st_ino, "]");
}

}  // namespace lazycr::restore
