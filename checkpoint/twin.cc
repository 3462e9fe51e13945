// A live dump's copy-on-write twin (twin.h).
#include "checkpoint/twin.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"

namespace lazycr::checkpoint {
namespace {

bool gone_or_zombie(pid_t pid) {
  auto stat = proc::try_read_file(cat("/proc/", pid, "/stat"));
  if (!stat) return true;
  try {
    char state = proc::parse_stat(*stat).state;
    return state == 'Z' || state == 'X';
  } catch (const Error&) {
    return true;
  }
}

constexpr int kReapTries = 200;  // 100 us apart: the zombie shows up as the tracer lets it go

// wait4 of the twin (exited) in a thread of its running parent, seized for the call.
void reap_in_running_parent(pid_t parent, pid_t twin, pid_t ns_twin) {
  for (int attempt = 0; attempt < kReapTries && proc::exists(twin); attempt++) {
    // A parent that exited meanwhile handed the twin to a reaper (with SIGCHLD), which reaps.
    if (!proc::exists(parent)) {
      ::usleep(100);
      continue;
    }
    for (pid_t tid : proc::list_tasks(parent)) {
      TracedThread t;
      try {
        t = TracedThread::seize(tid, 0);
      } catch (const Error&) {
        continue;  // gone, or traced by someone else now
      }
      if (!t.interrupt_and_wait_for(1000)) {
        t.abandon();  // an uninterruptible sleep: try another thread
        continue;
      }
      long r = t.syscall(find_vdso_syscall_insn(parent), InjectMode::kSingleStep, SYS_wait4,
                         static_cast<uint64_t>(ns_twin), 0, __WCLONE | WNOHANG, 0);
      t.detach();
      if (r == ns_twin || r == -ECHILD) return;
      break;  // not a zombie yet: try again shortly
    }
    ::usleep(100);
  }
}

}  // namespace

std::string twin_refusal(const std::vector<image::MemoryArea>& areas) {
  for (const auto& a : areas) {
    const std::string& f = a.vmflags();
    for (size_t pos = 0; pos + 2 <= f.size(); pos += 3)
      if (f.compare(pos, 2, "um") == 0 || f.compare(pos, 2, "uw") == 0 ||
          f.compare(pos, 2, "ui") == 0)
        return cat("area ", hex(a.start()), " is registered with a userfaultfd");
  }
  return {};
}

std::unique_ptr<Twin> Twin::make(FrozenProcess& fp, std::string& why_not) {
  auto ids = fp.clone_twin(why_not);
  if (!ids) return nullptr;
  TracedThread t = TracedThread::adopt(ids->pid);
  std::unique_ptr<Twin> twin(new Twin(fp.pid(), &fp, *ids, std::move(t)));
  // Its first stop (auto-attached: PTRACE_EVENT_STOP before it runs a single instruction).
  StopInfo s = twin->thread_.wait_stop();
  if (s.kind == StopKind::kExited) {
    twin->ended_ = true;
    fail("the twin of pid ", fp.pid(), " exited at once (", s.exit_status, ")");
  }
  log::debug("pid ", fp.pid(), ": twin ", ids->pid, " (", ids->ns_pid, " in its namespace)");
  return twin;
}

Twin::~Twin() {
  end();
}

void Twin::kill() {
  if (killed_) return;
  killed_ = true;
  ::kill(ids_.pid, SIGKILL);  // our tracee, not reaped yet: the pid cannot have been reused
}

void Twin::end() {
  if (ended_) return;
  ended_ = true;
  try {
    kill();
    for (int i = 0; i < 16 && thread_.attached(); i++)
      if (thread_.wait_stop().kind == StopKind::kExited) break;
    thread_.abandon();
    // Collected by its tracer, the twin is now a zombie for its parent (exit_signal 0: no
    // signal, and only a __WCLONE wait sees it).
    if (frozen_ != nullptr) {
      for (int i = 0; i < kReapTries && !gone_or_zombie(ids_.pid); i++) ::usleep(100);
      for (int i = 0; i < kReapTries; i++) {
        long r = frozen_->reap_child(ids_.ns_pid);
        if (r == ids_.ns_pid || r == -ECHILD) break;
        ::usleep(100);
      }
    } else {
      reap_in_running_parent(parent_, ids_.pid, ids_.ns_pid);
    }
    if (proc::exists(ids_.pid))
      log::warn("the twin ", ids_.pid, " of pid ", parent_, " is still there");
  } catch (const Error& e) {
    log::warn("ending the twin ", ids_.pid, " of pid ", parent_, ": ", e.what());
  }
}

namespace {

// What the watchdog is told of each twin.
struct TwinRecord {
  pid_t parent;
  pid_t pid;
  pid_t ns_pid;
};

}  // namespace

TwinWatchdog::TwinWatchdog() {
  const pid_t lazycr = ::getpid();
  int fds[2];
  // A socket rather than a pipe: a watchdog killed by someone else must not kill lazycr with
  // SIGPIPE (send with MSG_NOSIGNAL).
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0)
    fail_errno("socketpair for the twins' watchdog");
  pid_ = ::fork();
  if (pid_ < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    fail_errno("fork of the twins' watchdog");
  }
  if (pid_ > 0) {
    ::close(fds[0]);
    to_watchdog_ = fds[1];
    return;
  }
  // The watchdog: holds nothing of lazycr's but its end of the socket (lazycr's pipes would
  // keep a reader waiting).
  const int from_lazycr = fds[0];
  if (from_lazycr > 0) ::syscall(SYS_close_range, 0, from_lazycr - 1, 0);
  ::syscall(SYS_close_range, from_lazycr + 1, ~0u, 0);
  sigset_t wake;
  sigemptyset(&wake);
  sigaddset(&wake, SIGUSR1);
  ::sigprocmask(SIG_BLOCK, &wake, nullptr);
  if (::prctl(PR_SET_PDEATHSIG, SIGUSR1) != 0) ::_exit(1);
  if (::getppid() == lazycr) {
    siginfo_t si;
    while (::sigwaitinfo(&wake, &si) < 0 && errno == EINTR) {
    }
  }
  // lazycr is gone: its twins were let go and exit; each parent reaps its own. What lazycr
  // sent is queued (a child it forked later could hold its end open: no waiting).
  TwinRecord rec;
  while (::recv(from_lazycr, &rec, sizeof rec, MSG_DONTWAIT) == static_cast<ssize_t>(sizeof rec)) {
    for (int i = 0; i < 20000 && !gone_or_zombie(rec.pid); i++) ::usleep(100);
    try {
      reap_in_running_parent(rec.parent, rec.pid, rec.ns_pid);
    } catch (...) {
    }
  }
  ::_exit(0);
}

void TwinWatchdog::watch(const Twin& twin) {
  TwinRecord rec{twin.parent(), twin.pid(), twin.ns_pid()};
  if (::send(to_watchdog_, &rec, sizeof rec, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof rec))
    fail_errno("telling the twins' watchdog of twin ", twin.pid());
}

TwinWatchdog::~TwinWatchdog() {
  if (to_watchdog_ >= 0) ::close(to_watchdog_);
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace lazycr::checkpoint
