// A live dump's copy-on-write twin (twin.h).
#include "checkpoint/twin.h"

#include <signal.h>
#include <sys/prctl.h>
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

void Twin::end() {
  if (ended_) return;
  ended_ = true;
  try {
    ::kill(ids_.pid, SIGKILL);  // our tracee, not reaped yet: the pid cannot have been reused
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
      reap_in_running_parent();
    }
    if (proc::exists(ids_.pid))
      log::warn("the twin ", ids_.pid, " of pid ", parent_, " is still there");
  } catch (const Error& e) {
    log::warn("ending the twin ", ids_.pid, " of pid ", parent_, ": ", e.what());
  }
}

void Twin::reap_in_running_parent() {
  for (int attempt = 0; attempt < kReapTries && proc::exists(ids_.pid); attempt++) {
    // A parent that exited meanwhile handed the twin to a reaper (with SIGCHLD), which reaps.
    if (!proc::exists(parent_)) {
      ::usleep(100);
      continue;
    }
    for (pid_t tid : proc::list_tasks(parent_)) {
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
      long r = t.syscall(find_vdso_syscall_insn(parent_), InjectMode::kSingleStep, SYS_wait4,
                         static_cast<uint64_t>(ids_.ns_pid), 0, __WCLONE | WNOHANG, 0);
      t.detach();
      if (r == ids_.ns_pid || r == -ECHILD) return;
      break;  // not a zombie yet: try again shortly
    }
    ::usleep(100);
  }
}

TwinWatchdog::TwinWatchdog(const std::vector<Twin*>& twins) {
  const pid_t lazycr = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) fail_errno("fork of the twins' watchdog");
  if (pid_ > 0) return;
  // The watchdog: holds nothing of lazycr's (its pipes would keep a reader waiting).
  ::syscall(SYS_close_range, 0, ~0u, 0);
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
  // lazycr is gone: its twins were let go and exit; each parent reaps its own.
  for (Twin* t : twins) {
    for (int i = 0; i < 20000 && !gone_or_zombie(t->ids_.pid); i++) ::usleep(100);
    try {
      t->reap_in_running_parent();
    } catch (...) {
    }
  }
  ::_exit(0);
}

TwinWatchdog::~TwinWatchdog() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace lazycr::checkpoint
