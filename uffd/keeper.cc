#include "uffd/keeper.h"

#include <signal.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "common/error.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"

namespace lazycr::uffd {

namespace {

// A thread that does not reach a ptrace stop within this long is in an uninterruptible sleep
// (or a fault no one answers): the descriptor stays rather than the server waiting on it.
constexpr int kStopTimeoutMs = 2000;
// Threads created while the others are being seized: list again, this many times at most.
constexpr int kSeizeRounds = 8;

// The "Seccomp:" mode of /proc/PID/status (0: none), -1 if unreadable.
int seccomp_mode(pid_t pid) {
  auto text = proc::try_read_file(cat("/proc/", pid, "/status"));
  if (!text) return -1;
  std::istringstream in(*text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("Seccomp:", 0) == 0) return std::atoi(line.c_str() + 8);
  return 0;
}

// A thread that exited (a zombie leader whose other threads run on) or is gone.
bool thread_dead(pid_t tid) {
  auto text = proc::try_read_file(cat("/proc/", tid, "/stat"));
  if (!text) return true;
  const auto close = text->rfind(')');
  if (close == std::string::npos || close + 2 >= text->size()) return true;
  const char state = (*text)[close + 2];
  return state == 'Z' || state == 'X';
}

// Tests (LAZYCR_FAULT_INJECT=keeper-stop-in-injected-close): the server stops itself inside
// the injected close, the thread resumed into it and its trap not yet collected, so that the
// test can SIGKILL the process exactly while every thread of it is traced by the server.
bool stop_in_injected_close() {
  const char* f = ::getenv("LAZYCR_FAULT_INJECT");
  return f != nullptr && std::strcmp(f, "keeper-stop-in-injected-close") == 0;
}

}  // namespace

UffdKeeper::UffdKeeper(UniqueFd send_end, UniqueFd recv_end, int parked_fd)
    : send_(std::move(send_end)), recv_(std::move(recv_end)), parked_fd_(parked_fd) {
  struct stat st {};
  if (recv_ && ::fstat(recv_.get(), &st) == 0) inode_ = st.st_ino;
}

bool UffdKeeper::park(int uffd) {
  if (!send_ || dropped_) return false;
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

void UffdKeeper::drop_parked() {
  if (dropped_) return;
  dropped_ = true;
  send_.reset();  // nothing is parked any more; the queue ends with what is there
  if (!recv_) return;
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
}

UffdKeeper::Released UffdKeeper::close_parked(const std::vector<pid_t>& holders) {
  Released r;
  if (closed_) return r;
  closed_ = true;
  drop_parked();
  for (pid_t pid : holders) {
    std::string why;
    const Outcome o = close_parked_in(pid, why);
    if (o == Outcome::kClosed) ++r.closed;
    if (o != Outcome::kLeft) continue;
    ++r.left;
    log::warn("page server: pid ", pid, " keeps descriptor ", parked_fd_,
              " (lazycr's keeper socket, idle and empty now, O_CLOEXEC): ", why);
  }
  recv_.reset();
  return r;
}

bool UffdKeeper::held_by(pid_t pid, pid_t tid) const {
  char buf[64];
  const std::string link = cat("/proc/", pid, "/task/", tid, "/fd/", parked_fd_);
  ssize_t n = ::readlink(link.c_str(), buf, sizeof buf);
  return n > 0 && std::string(buf, static_cast<size_t>(n)) == cat("socket:[", inode_, "]");
}

UffdKeeper::Outcome UffdKeeper::close_parked_in(pid_t pid, std::string& why) {
  if (inode_ == 0 || parked_fd_ < 0) return Outcome::kAbsent;
  // A seccomp filter must not see (nor kill the process for) a call it never made.
  const unsigned long options = seccomp_mode(pid) > 0 ? PTRACE_O_SUSPEND_SECCOMP : 0;
  // Every thread stopped: none can put something else at that number between our check and
  // the close, and a thread that does not share the descriptor table is found too.
  std::vector<TracedThread> threads;
  auto traced = [&](pid_t tid) {
    return std::any_of(threads.begin(), threads.end(),
                       [&](const TracedThread& t) { return t.tid() == tid; });
  };
  bool closed = false;
  try {
    for (int round = 0;; ++round) {
      bool more = false;
      for (pid_t tid : proc::list_tasks(pid)) {
        if (traced(tid) || thread_dead(tid)) continue;
        more = true;
        TracedThread t;
        try {
          t = TracedThread::seize(tid, options);
        } catch (const Error& e) {
          if (e.sys_errno() == ESRCH || thread_dead(tid)) continue;  // that thread ended
          why = e.what();  // traced by someone else, or not permitted
          return Outcome::kLeft;
        }
        try {
          if (!t.interrupt_and_wait_for(kStopTimeoutMs)) {
            t.abandon();  // the link ends when the server exits
            why = cat("tid ", tid, " did not stop within ", kStopTimeoutMs, " ms");
            return Outcome::kLeft;
          }
        } catch (const Error&) {
          if (!thread_dead(tid)) throw;
          continue;
        }
        threads.push_back(std::move(t));
      }
      if (!more) break;
      if (round + 1 == kSeizeRounds) {
        why = "its threads kept multiplying while being stopped";
        return Outcome::kLeft;
      }
    }
    if (stop_in_injected_close())
      set_injected_call_hook([] {
        static bool stopped = false;  // once: the first injected close
        if (!std::exchange(stopped, true)) ::raise(SIGSTOP);
      });
    for (TracedThread& t : threads) {
      if (!held_by(pid, t.tid())) continue;  // (a table shared with a thread done before)
      const long r = t.syscall(find_vdso_syscall_insn(pid), InjectMode::kSingleStep, SYS_close,
                               static_cast<uint64_t>(parked_fd_));
      if (r != 0) {
        why = cat("close: ", std::strerror(static_cast<int>(-r)));
        return Outcome::kLeft;
      }
      closed = true;
    }
  } catch (const Error& e) {
    // It exited meanwhile (its descriptors go with it): serving ends when the process exits,
    // so this close races with that exit whenever the process ends by itself.
    if (!proc::exists(pid) || proc::exiting(pid)) return Outcome::kAbsent;
    why = e.what();
    return Outcome::kLeft;
  }
  // (The destructors of `threads` detach every thread; one of a stopped job stops again.)
  return closed ? Outcome::kClosed : Outcome::kAbsent;
}

int choose_parked_fd(const std::vector<int>& taken, unsigned long limit) {
  int fd = static_cast<int>(std::min<unsigned long>(limit, 1024)) - 1;
  while (fd > 2 && std::find(taken.begin(), taken.end(), fd) != taken.end()) --fd;
  return fd > 2 ? fd : -1;
}

}  // namespace lazycr::uffd
