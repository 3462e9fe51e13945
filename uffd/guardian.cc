#include "uffd/guardian.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace lazycr::uffd {
namespace {

constexpr int kPidfdIdType = 3;  // P_PIDFD (linux/wait.h clashes with glibc's sys/wait.h)

enum Op : uint32_t { kAdd = 1, kPid = 2, kRelease = 3, kFinish = 4 };

struct Msg {
  uint32_t op;
  int32_t pid;
  int32_t parent;
  uint32_t pad;
  uint64_t id;
};

// ---- the guardian process: raw system calls and static storage only -----------------------

constexpr int kMaxEntries = 4096;
struct Entry {
  uint64_t id;
  pid_t pid;
  pid_t parent;
  int uffd;   // -1 once released
  int pidfd;  // -1 if none
  bool used;
};
Entry g_entries[kMaxEntries];
char g_text[8192];
size_t g_text_len;

long sys(long nr, long a = 0, long b = 0, long c = 0, long d = 0) {
  return ::syscall(nr, a, b, c, d);
}

void text(const char* s) {
  while (*s && g_text_len + 1 < sizeof(g_text)) g_text[g_text_len++] = *s++;
}
void text_num(long v) {
  char buf[24];
  int n = 0;
  if (v < 0) {
    text("-");
    v = -v;
  }
  do {
    buf[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v > 0 && n < 23);
  while (n > 0 && g_text_len + 1 < sizeof(g_text)) g_text[g_text_len++] = buf[--n];
}

Entry* entry(uint64_t id) {
  for (Entry& e : g_entries)
    if (e.used && e.id == id) return &e;
  return nullptr;
}

void close_fd(int& fd) {
  if (fd >= 0) sys(SYS_close, fd);
  fd = -1;
}

// Receives one message; returns 1 (got one), 0 (end of file), -1 (nothing now / error).
int receive(int sock, bool wait) {
  Msg m{};
  char control[CMSG_SPACE(2 * sizeof(int))];
  iovec iov{&m, sizeof(m)};
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  h.msg_control = control;
  h.msg_controllen = sizeof(control);
  long n = sys(SYS_recvmsg, sock, reinterpret_cast<long>(&h),
               MSG_CMSG_CLOEXEC | (wait ? 0 : MSG_DONTWAIT));
  if (n == 0) return 0;
  if (n < 0) return -1;
  int fds[2] = {-1, -1};
  int nfds = 0;
  for (cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr; c = CMSG_NXTHDR(&h, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count && nfds < 2; ++i)
      std::memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
  }
  if (n != static_cast<long>(sizeof(m))) {
    for (int& fd : fds) close_fd(fd);
    return 1;
  }
  switch (m.op) {
    case kAdd: {
      Entry* slot = nullptr;
      for (Entry& e : g_entries)
        if (!e.used) {
          slot = &e;
          break;
        }
      if (slot == nullptr || nfds < 1) {  // cannot hold it: the server keeps its own
        for (int& fd : fds) close_fd(fd);
        break;
      }
      *slot = Entry{m.id, m.pid, m.parent, fds[0], nfds > 1 ? fds[1] : -1, true};
      break;
    }
    case kPid: {
      Entry* e = entry(m.id);
      if (e == nullptr) {
        for (int& fd : fds) close_fd(fd);
        break;
      }
      e->pid = m.pid;
      close_fd(e->pidfd);
      e->pidfd = nfds > 0 ? fds[0] : -1;
      break;
    }
    case kRelease: {
      Entry* e = entry(m.id);
      if (e != nullptr) {
        close_fd(e->uffd);
        close_fd(e->pidfd);
        e->used = false;
      }
      for (int& fd : fds) close_fd(fd);
      break;
    }
    case kFinish:
      sys(SYS_exit_group, 0);
      break;
    default:
      for (int& fd : fds) close_fd(fd);
  }
  return 1;
}

// The parent pid of `pid` from /proc/PID/stat, or -1.
pid_t parent_of(pid_t pid) {
  char path[64] = "/proc/";
  size_t n = 6;
  char digits[16];
  int d = 0;
  for (long v = pid; v > 0 && d < 15; v /= 10) digits[d++] = static_cast<char>('0' + v % 10);
  while (d > 0) path[n++] = digits[--d];
  std::memcpy(path + n, "/stat", 6);
  int fd = static_cast<int>(sys(SYS_openat, AT_FDCWD, reinterpret_cast<long>(path), O_RDONLY));
  if (fd < 0) return -1;
  char buf[512];
  long len = sys(SYS_read, fd, reinterpret_cast<long>(buf), sizeof(buf) - 1);
  sys(SYS_close, fd);
  if (len <= 0) return -1;
  buf[len] = 0;
  // "pid (comm) S ppid ...": comm may hold spaces and parentheses; take the last ')'.
  char* close = nullptr;
  for (char* p = buf; *p; ++p)
    if (*p == ')') close = p;
  if (close == nullptr || close[1] != ' ' || close[2] == 0 || close[3] != ' ') return -1;
  long ppid = 0;
  for (char* p = close + 4; *p >= '0' && *p <= '9'; ++p) ppid = ppid * 10 + (*p - '0');
  return static_cast<pid_t>(ppid);
}

bool kill_pid(pid_t pid) {
  if (pid <= 0) return false;
  int fd = static_cast<int>(sys(SYS_pidfd_open, pid, 0));
  if (fd < 0) return false;
  bool ok = sys(SYS_pidfd_send_signal, fd, SIGKILL, 0, 0) == 0;
  sys(SYS_close, fd);
  return ok;
}

pid_t g_extra[kMaxEntries];  // descendants killed by server_died(), for its message
int g_extra_count;

bool known(pid_t pid) {
  for (const Entry& e : g_entries)
    if (e.used && e.pid == pid) return true;
  return false;
}

// Every process of the system with its parent, from one scan of /proc.
constexpr int kMaxProcs = 65536;
pid_t g_pid[kMaxProcs], g_ppid[kMaxProcs];
int g_nprocs;

void scan_procs() {
  g_nprocs = 0;
  int dir = static_cast<int>(
      sys(SYS_openat, AT_FDCWD, reinterpret_cast<long>("/proc"), O_RDONLY | O_DIRECTORY));
  if (dir < 0) return;
  alignas(8) char buf[8192];
  for (;;) {
    long n = sys(SYS_getdents64, dir, reinterpret_cast<long>(buf), sizeof(buf));
    if (n <= 0) break;
    for (long off = 0; off < n;) {
      auto* d = reinterpret_cast<dirent64*>(buf + off);
      off += d->d_reclen;
      long pid = 0;
      const char* p = d->d_name;
      if (*p < '0' || *p > '9') continue;
      for (; *p >= '0' && *p <= '9'; ++p) pid = pid * 10 + (*p - '0');
      if (*p != 0 || g_nprocs >= kMaxProcs) continue;
      g_pid[g_nprocs] = static_cast<pid_t>(pid);
      g_ppid[g_nprocs++] = parent_of(static_cast<pid_t>(pid));
    }
  }
  sys(SYS_close, dir);
}

// Kills every descendant of `root` (not root itself) that is not in the table (those are
// killed by server_died() itself), recursively, as scan_procs() saw them; returns how many.
int kill_descendants(pid_t root) {
  int killed = 0;
  static pid_t queue[4096];
  int head = 0, tail = 0;
  queue[tail++] = root;
  while (head < tail) {
    const pid_t parent = queue[head++];
    for (int i = 0; i < g_nprocs; ++i) {
      if (g_ppid[i] != parent) continue;
      const pid_t pid = g_pid[i];
      if (!known(pid) && kill_pid(pid)) {
        if (g_extra_count < kMaxEntries) g_extra[g_extra_count++] = pid;
        ++killed;
      }
      if (tail < 4096) queue[tail++] = pid;
    }
  }
  return killed;
}

[[noreturn]] void server_died(pid_t server, int log_fd) {
  g_text_len = 0;
  text("lazycr guardian: the page server (pid ");
  text_num(server);
  text(") died before it finished; killed pid");
  int killed = 0;
  // Stopped first (at once, as the kill used to be), so that none of them runs on, forks
  // or exits (its children would be re-parented, out of reach) while /proc is scanned.
  for (Entry& e : g_entries) {
    if (!e.used || e.uffd < 0) continue;
    if (e.pidfd >= 0) sys(SYS_pidfd_send_signal, e.pidfd, SIGSTOP, 0, 0);
  }
  scan_procs();
  // Descendants first: once their parent is dead they are re-parented, out of reach here.
  // A forked child whose pid was never found is one of its parent's descendants; so is a
  // child forked while the server held its uffd alone (the kernel lets the fork go on as the
  // server reads the FORK event, and only then can the server send the child's uffd here):
  // such a child lost its uffd with the server and would read zero pages. The guardian
  // cannot tell them from other descendants; once the server died, every process it guards
  // is killed, and so is whatever they forked.
  for (Entry& e : g_entries) {
    if (!e.used || e.uffd < 0) continue;
    if (e.pid > 0) killed += kill_descendants(e.pid);
    if (e.pid <= 0 && e.parent > 0) killed += kill_descendants(e.parent);
  }
  for (Entry& e : g_entries) {
    if (!e.used || e.uffd < 0) continue;
    bool ok = false;
    if (e.pidfd >= 0) {
      ok = sys(SYS_pidfd_send_signal, e.pidfd, SIGKILL, 0, 0) == 0;
    } else if (e.pid > 0) {
      ok = kill_pid(e.pid);
    }
    if (ok || e.pid > 0) {
      text(" ");
      text_num(e.pid);
      ++killed;
    }
  }
  for (int i = 0; i < g_extra_count; ++i) {
    text(" ");
    text_num(g_extra[i]);
  }
  if (killed == 0) sys(SYS_exit_group, 0);  // nothing was at risk
  text(" rather than let them read zero pages in place of their memory\n");
  sys(SYS_write, log_fd, reinterpret_cast<long>(g_text), static_cast<long>(g_text_len));
  // Keep the uffds until the killed processes are gone (10 s at most): until then their
  // faults wait instead of reading zero pages.
  for (Entry& e : g_entries) {
    if (!e.used || e.uffd < 0 || e.pidfd < 0) continue;
    pollfd p{e.pidfd, POLLIN, 0};
    sys(SYS_poll, reinterpret_cast<long>(&p), 1, 10'000);
  }
  sys(SYS_exit_group, 1);
  __builtin_unreachable();
}

[[noreturn]] void guardian_main(int sock, int server_pidfd, pid_t server, int log_fd) {
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGTSTP, SIGTTIN, SIGTTOU})
    ::sigaction(sig, &ign, nullptr);
  sys(SYS_prctl, PR_SET_NAME, reinterpret_cast<long>("lazycr-guardian"));
  // Its own session and process group: a group kill of the server's (kill -9 -PGID) must not
  // take the guardian with it, nor one of the guardian's take the server.
  sys(SYS_setsid);
  // Keep only the socket, the server's pidfd, the log fd and 0-2: no other uffd copy may
  // outlive the server here unannounced.
  int keep[3] = {sock, server_pidfd, log_fd};
  for (int i = 0; i < 3; ++i)
    for (int j = i + 1; j < 3; ++j)
      if (keep[j] < keep[i]) {
        int t = keep[i];
        keep[i] = keep[j];
        keep[j] = t;
      }
  int lo = 3;
  for (int k : keep) {
    if (k >= lo) {
      if (k > lo) sys(SYS_close_range, lo, k - 1, 0);
      lo = k + 1;
    }
  }
  sys(SYS_close_range, lo, ~0u, 0);
  for (;;) {
    pollfd p[2] = {{sock, POLLIN, 0}, {server_pidfd, POLLIN, 0}};
    long r = sys(SYS_poll, reinterpret_cast<long>(p), 2, -1);
    if (r < 0) continue;  // EINTR
    if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      if (receive(sock, false) == 0) server_died(server, log_fd);
      continue;
    }
    if (p[1].revents & POLLIN) {
      // The server is gone: take what it said last (a FINISH exits), then act.
      while (receive(sock, false) == 1) {
      }
      server_died(server, log_fd);
    }
  }
}

}  // namespace

GuardianClient::~GuardianClient() {
  try {
    finish();
  } catch (const std::exception& e) {
    log::warn("page server guardian: ", e.what());
  }
}

void GuardianClient::start(int log_fd) {
  if (running()) return;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
    fail_errno("page server guardian: socketpair");
  UniqueFd mine(sv[0]), theirs(sv[1]);
  const pid_t server = ::getpid();
  UniqueFd self(static_cast<int>(::syscall(SYS_pidfd_open, server, 0)));
  if (!self) fail_errno("page server guardian: pidfd_open of the server (pid ", server, ")");
  pid_t child = ::fork();
  if (child < 0) fail_errno("page server guardian: fork");
  if (child == 0) guardian_main(theirs.get(), self.get(), server, log_fd);
  pid_ = child;
  pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, child, 0)));
  if (!pidfd_) fail_errno("page server guardian: pidfd_open of the guardian (pid ", child, ")");
  // Until it has its own session, a group kill of the server's takes the guardian too: the
  // server says it is ready only after that (lazycr may return right then).
  for (int i = 0;; i++) {
    const pid_t sid = ::getsid(child);
    if (sid == child) break;
    if (sid < 0) fail_errno("page server guardian (pid ", child, "): getsid");
    if (i >= 100000) fail("page server guardian (pid ", child, ") did not start its session");
    ::sched_yield();
  }
  sock_ = std::move(mine);
}

void GuardianClient::send(uint32_t op, uint64_t id, pid_t pid, pid_t parent, const int* fds,
                          int nfds) {
  if (!running()) return;
  Msg m{op, pid, parent, 0, id};
  iovec iov{&m, sizeof(m)};
  msghdr h{};
  h.msg_iov = &iov;
  h.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))];
  if (nfds > 0) {
    h.msg_control = control;
    h.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
    cmsghdr* c = CMSG_FIRSTHDR(&h);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    std::memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock_.get(), &h, MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(sizeof(m))) return;
    if (n < 0 && errno == EINTR) continue;
    // The guardian is gone: the server goes on without its safety net.
    log::warn("page server: the guardian (pid ", pid_,
              ") is gone (sendmsg: ", n < 0 ? std::strerror(errno) : "short",
              "); serving without it");
    sock_.reset();
    return;
  }
}

void GuardianClient::add(uint64_t id, pid_t pid, pid_t parent, int uffd, int pidfd) {
  int fds[2] = {uffd, pidfd};
  send(kAdd, id, pid, parent, fds, pidfd >= 0 ? 2 : 1);
}

void GuardianClient::set_pid(uint64_t id, pid_t pid, int pidfd) {
  send(kPid, id, pid, 0, &pidfd, pidfd >= 0 ? 1 : 0);
}

void GuardianClient::release(uint64_t id) {
  send(kRelease, id, 0, 0, nullptr, 0);
}

void GuardianClient::finish() {
  if (!pidfd_) return;
  send(kFinish, 0, 0, 0, nullptr, 0);
  sock_.reset();
  siginfo_t info{};
  while (::waitid(static_cast<idtype_t>(kPidfdIdType), static_cast<id_t>(pidfd_.get()), &info,
                  WEXITED) != 0) {
    if (errno != EINTR) break;  // ECHILD: someone else reaped it
  }
  pidfd_.reset();
}

void GuardianClient::abandon() {
  sock_.reset();
  pidfd_.reset();
}

}  // namespace lazycr::uffd
