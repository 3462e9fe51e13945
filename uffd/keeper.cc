#include "uffd/keeper.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"

namespace lazycr::uffd {

UffdKeeper::UffdKeeper(UniqueFd send_end, UniqueFd recv_end, int parked_fd)
    : send_(std::move(send_end)), recv_(std::move(recv_end)), parked_fd_(parked_fd) {
  struct stat st {};
  if (recv_ && ::fstat(recv_.get(), &st) == 0) inode_ = st.st_ino;
}

bool UffdKeeper::park(int uffd) {
  if (!send_ || released_) return false;
  char byte = 'u';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  h.msg_control = control;
  h.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&h);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &uffd, sizeof(int));
  for (;;) {
    if (::sendmsg(send_.get(), &h, MSG_NOSIGNAL | MSG_DONTWAIT) == 1) return true;
    if (errno == EINTR) continue;
    log::warn("page server: cannot park uffd ", uffd, " in the process (fd ", parked_fd_,
              "): sendmsg: ", std::strerror(errno), "; only the guardian guards it");
    return false;
  }
}

void UffdKeeper::release(const std::vector<pid_t>& holders) {
  if (released_) return;
  released_ = true;
  send_.reset();  // nothing is parked any more; the queue ends with what is there
  for (;;) {
    char byte;
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
    msghdr h{};
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = control;
    h.msg_controllen = sizeof control;
    ssize_t n = ::recvmsg(recv_.get(), &h, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        ::close(fd);
      }
    }
  }
  for (pid_t pid : holders) close_parked_in(pid);
  recv_.reset();
}

void UffdKeeper::close_parked_in(pid_t pid) {
  const std::string link = cat("/proc/", pid, "/fd/", parked_fd_);
  const std::string ours = cat("socket:[", inode_, "]");
  auto is_ours = [&] {
    char buf[64];
    ssize_t n = ::readlink(link.c_str(), buf, sizeof buf);
    return n > 0 && std::string(buf, static_cast<size_t>(n)) == ours;
  };
  if (inode_ == 0 || !is_ours()) return;  // exec'd, closed by the program, or gone
  std::string why = "no thread could be traced";
  std::vector<pid_t> tids;
  try {
    tids = proc::list_tasks(pid);
  } catch (const Error&) {
    return;  // gone
  }
  for (pid_t tid : tids) {
    try {
      TracedThread t = TracedThread::seize(tid);
      t.interrupt_and_wait();
      long r = 0;
      if (is_ours()) {
        r = t.syscall(find_vdso_syscall_insn(pid), InjectMode::kSingleStep, SYS_close,
                      static_cast<uint64_t>(parked_fd_));
      }
      t.detach();
      if (r == 0) return;
      why = cat("close: ", std::strerror(static_cast<int>(-r)));
      break;
    } catch (const Error& e) {
      why = e.what();  // that thread is gone or cannot be traced: try another
    }
  }
  if (is_ours())
    log::info("page server: pid ", pid, " keeps its parked descriptor ", parked_fd_,
              " (an idle socket): ", why);
}

int choose_parked_fd(const std::vector<int>& taken, unsigned long limit) {
  int fd = static_cast<int>(std::min<unsigned long>(limit, 1024)) - 1;
  while (fd > 2 && std::find(taken.begin(), taken.end(), fd) != taken.end()) --fd;
  return fd > 2 ? fd : -1;
}

}  // namespace lazycr::uffd
