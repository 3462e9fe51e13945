#include "restore/fd_passing.h"

#include <sys/socket.h>
#include <sys/syscall.h>

#include <cstring>

#include "common/error.h"
#include "common/ptrace.h"

namespace lazycr::restore {

void send_fds(int sock, const std::vector<int>& fds) {
  char byte = 'F';
  iovec iov{&byte, 1};
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()), 0);
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  ssize_t n;
  do {
    n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n != 1) fail_errno("sending ", fds.size(), " descriptors to the restored process");
}

// Receives one message of `count` descriptors inside the process; returns their numbers there
// (close-on-exec, lowest free numbers).
std::vector<int> receive_fds(RemoteProcess& r, int sock, size_t count) {
  r.reset_arena();
  char byte = 0;
  uint64_t buf = r.push(&byte, 1);
  iovec iov{reinterpret_cast<void*>(buf), 1};
  uint64_t iov_at = r.push(&iov, sizeof iov);
  const size_t control_len = CMSG_SPACE(sizeof(int) * count);
  std::vector<char> control(control_len, 0);
  uint64_t control_at = r.push(control.data(), control.size());
  msghdr msg{};
  msg.msg_iov = reinterpret_cast<iovec*>(iov_at);
  msg.msg_iovlen = 1;
  msg.msg_control = reinterpret_cast<void*>(control_at);
  msg.msg_controllen = control_len;
  uint64_t msg_at = r.push(&msg, sizeof msg);
  r.inject(cat("recvmsg of ", count, " descriptors"), SYS_recvmsg, static_cast<uint64_t>(sock),
           msg_at, MSG_CMSG_CLOEXEC);
  msghdr got{};
  remote_read(r.pid(), msg_at, &got, sizeof got);
  remote_read(r.pid(), control_at, control.data(), control.size());
  if (got.msg_flags & MSG_CTRUNC)
    fail("recvmsg of ", count, " descriptors: control data truncated");
  msghdr local{};
  local.msg_control = control.data();
  local.msg_controllen = got.msg_controllen;
  cmsghdr* c = CMSG_FIRSTHDR(&local);
  if (c == nullptr || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
      c->cmsg_len != CMSG_LEN(sizeof(int) * count))
    fail("recvmsg of ", count, " descriptors: no SCM_RIGHTS message of that size arrived");
  std::vector<int> fds(count);
  std::memcpy(fds.data(), CMSG_DATA(c), sizeof(int) * count);
  return fds;
}

}  // namespace lazycr::restore
