// The only place in lazycr that calls ptrace(2).
#include "common/ptrace.h"

#include <elf.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iomanip>
#include <optional>
#include <sstream>
#include <utility>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/signals.h"

namespace lazycr {
namespace {

// Bound on rounds of "resume, wait" before we give up on a thread that keeps stopping for
// something else (signals arriving faster than we can give them back).
constexpr int kMaxRounds = 64;

// Kernel-internal restart codes (include/linux/errno.h), seen in rax of an interrupted syscall.
constexpr long kErestartSys = -512;
constexpr long kErestartNoIntr = -513;
constexpr long kErestartNoHand = -514;
constexpr long kErestartRestartBlock = -516;

constexpr uint64_t sigbit(int sig) {
  return 1ull << (sig - 1);
}

// Signals the kernel may force on the thread while it runs an injected call. They stay
// unblocked: force_sig on a blocked signal resets the process-wide handler to SIG_DFL, which
// would silently change the target (e.g. a JIT's SIGSEGV handler, or SIGTRAP for our own trap).
constexpr uint64_t kForcedSignals = sigbit(SIGTRAP) | sigbit(SIGSEGV) | sigbit(SIGBUS) |
                                    sigbit(SIGILL) | sigbit(SIGFPE) | sigbit(SIGSYS);
// Mask while running an injected call: everything else blocked (SIGKILL and SIGSTOP cannot be).
constexpr uint64_t kInjectMask = ~(kForcedSignals | sigbit(SIGKILL) | sigbit(SIGSTOP));

std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

std::string range(uint64_t addr, size_t len) {
  return cat("[", hex(addr), "-", hex(addr + len), ")");
}

std::string signame(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? cat("SIG", abbrev) : cat("signal ", sig);
}

// The exit status of a thread reaped by a wait for its leader, or given up dead (StopInfo::
// exit_status; never a status the kernel reports).
constexpr int kExitStatusLost = -1;

std::string describe_exit(int status) {
  if (status == kExitStatusLost) return "exited";
  if (WIFEXITED(status)) return cat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return cat("exited, killed by ", signame(WTERMSIG(status)));
  return cat("exited (wait status ", hex(static_cast<unsigned>(status)), ")");
}

long xptrace(int request, pid_t tid, uint64_t addr, uint64_t data) {
  return ::ptrace(static_cast<__ptrace_request>(request), tid, reinterpret_cast<void*>(addr),
                  reinterpret_cast<void*>(data));
}
long xptrace(int request, pid_t tid, uint64_t addr, void* data) {
  return ::ptrace(static_cast<__ptrace_request>(request), tid, reinterpret_cast<void*>(addr), data);
}

// Throws "<what> tid N: <why>", adding the usual meaning of ESRCH for requests that need a
// stopped tracee.
[[noreturn]] void fail_request(const char* what, pid_t tid) {
  int err = errno;
  if (err == ESRCH) {
    throw Error(cat(what, " tid ", tid, ": no such process (gone, or not in a ptrace-stop)"), err);
  }
  fail_errno_value(err, cat(what, " tid ", tid));
}

// True if the thread has exited (zombie, or gone): it will never stop again.
bool thread_dead(pid_t tid) {
  auto text = proc::try_read_file(cat("/proc/", tid, "/stat"));
  if (!text) return true;
  auto close = text->rfind(')');
  if (close == std::string::npos || close + 2 >= text->size()) return false;
  char state = (*text)[close + 2];
  return state == 'Z' || state == 'X' || state == 'x';
}

int64_t mono_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// A dead thread whose exit is not reported within this long (a leader whose other threads
// are still exiting, or are traced by someone else) is given up: its link ends when we exit.
constexpr int64_t kDeadReportNs = 5'000'000'000;

// The kernel reports a thread-group leader's exit only once its other threads are released,
// and a traced thread that dies is a zombie until its tracer waits for it: a tracer that waits
// for a dead leader must reap the zombies of its other traced threads first, or it waits for
// ever. Reaps the threads of `tid`'s group that are zombies traced by us (waitpid answers
// ECHILD for the others). Says what is left of the other threads.
enum class Others { kNone, kExiting, kRunning };  // kRunning: a leader that called pthread_exit
Others reap_exited_threads(pid_t tid) {
  std::vector<pid_t> tasks;
  try {
    tasks = proc::list_tasks(tid);
  } catch (const Error&) {
    return Others::kNone;
  }
  Others left = Others::kNone;
  for (pid_t t : tasks) {
    if (t == tid) continue;
    if (!proc::exiting(t)) return Others::kRunning;
    int status;
    if (thread_dead(t) && ::waitpid(t, &status, __WALL | WNOHANG) == t) continue;
    left = Others::kExiting;
  }
  return left;
}

// Is `tid` a thread-group leader whose real parent is this process?
bool our_child_leader(pid_t tid) {
  auto st = proc::try_read_stat(tid);
  if (!st || st->ppid != ::getpid()) return false;
  auto status = proc::try_read_file(cat("/proc/", tid, "/status"));
  return status && status->find(cat("\nTgid:\t", tid, "\n")) != std::string::npos;
}

siginfo_t get_siginfo(pid_t tid) {
  siginfo_t si;
  std::memset(&si, 0, sizeof si);
  if (xptrace(PTRACE_GETSIGINFO, tid, 0, &si) != 0) fail_request("PTRACE_GETSIGINFO", tid);
  return si;
}

}  // namespace

TracedThread TracedThread::seize(pid_t tid, unsigned long options) {
  if (tid <= 0) fail("cannot seize tid ", tid, ": invalid thread id");
  if (xptrace(PTRACE_SEIZE, tid, 0, options) != 0) {
    int err = errno;
    if (err == ESRCH) throw Error(cat("cannot seize tid ", tid, ": no such process"), err);
    if (err == EPERM) {
      pid_t tracer = 0;
      if (auto text = proc::try_read_file(cat("/proc/", tid, "/status"))) {
        try {
          tracer = proc::parse_status(*text).tracer_pid;
        } catch (const Error&) {
        }
      }
      if (tracer > 0) {
        throw Error(cat("cannot seize tid ", tid, ": already traced by pid ", tracer), err);
      }
      throw Error(cat("cannot seize tid ", tid,
                      ": permission denied (credentials, Yama ptrace_scope, a kernel thread, "
                      "or one of our own threads)"),
                  err);
    }
    fail_errno_value(err, cat("cannot seize tid ", tid));
  }
  return TracedThread(tid);
}

TracedThread TracedThread::adopt(pid_t tid) {
  if (tid <= 0) fail("cannot adopt tid ", tid, ": invalid thread id");
  return TracedThread(tid);
}

TracedThread::TracedThread(TracedThread&& o) noexcept
    : tid_(std::exchange(o.tid_, -1)),
      attached_(std::exchange(o.attached_, false)),
      last_stop_signo_(o.last_stop_signo_),
      interrupt_sent_(std::exchange(o.interrupt_sent_, false)),
      injected_(std::exchange(o.injected_, 0)),
      new_tasks_(std::move(o.new_tasks_)) {}

TracedThread& TracedThread::operator=(TracedThread&& o) noexcept {
  if (this != &o) {
    try {
      detach();
    } catch (const Error& e) {
      log::warn(e.what());
    }
    tid_ = std::exchange(o.tid_, -1);
    attached_ = std::exchange(o.attached_, false);
    injected_ = std::exchange(o.injected_, 0);
    last_stop_signo_ = o.last_stop_signo_;
    interrupt_sent_ = std::exchange(o.interrupt_sent_, false);
    new_tasks_ = std::move(o.new_tasks_);
  }
  return *this;
}

TracedThread::~TracedThread() {
  try {
    detach();
  } catch (const Error& e) {
    log::warn(e.what());
  } catch (...) {
  }
}

void TracedThread::resume(int request, int sig, const char* why) {
  if (xptrace(request, tid_, 0, static_cast<uint64_t>(sig)) != 0) {
    int err = errno;
    const char* name = request == PTRACE_SINGLESTEP ? "PTRACE_SINGLESTEP" : "PTRACE_CONT";
    fail_errno_value(err, cat(name, " tid ", tid_, " (", why, ")"));
  }
}

void TracedThread::note_new_task(const StopInfo& s) {
  if (s.event_msg > 0) new_tasks_.push_back(static_cast<pid_t>(s.event_msg));
}

std::vector<pid_t> TracedThread::take_new_tasks() {
  return std::exchange(new_tasks_, {});
}

StopInfo TracedThread::wait_stop() {
  if (!attached_) fail("wait for tid ", tid_, ": not attached");
  return *poll_stop(true);
}

namespace {

// Spin rounds (sched_yield) before the waits for a tracee's stop sleep.
constexpr unsigned kSpinRounds = 16;

// SIGCHLD blocked in this thread while it lives, so that the one every ptrace stop and exit of
// a tracee sends its tracer is queued rather than discarded (its default action is to ignore
// it), and a sleep can end on it.
class ChildSignalWait {
 public:
  ChildSignalWait() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGCHLD);
    ::pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~ChildSignalWait() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  ChildSignalWait(const ChildSignalWait&) = delete;
  ChildSignalWait& operator=(const ChildSignalWait&) = delete;
  // Until a SIGCHLD (any child's: the caller looks again) or `us` microseconds.
  void sleep(unsigned us) {
    timespec ts{0, static_cast<long>(us) * 1000};
    ::sigtimedwait(&set_, nullptr, &ts);
  }

 private:
  sigset_t set_;
  sigset_t old_;
};

}  // namespace

std::optional<StopInfo> TracedThread::poll_stop(bool block) {
  // Never one blocking waitpid: a thread killed meanwhile may never be reported (a leader whose
  // traced threads are unreaped zombies). Spin first (a trap usually comes within
  // microseconds), then sleep a little longer each time, each sleep ended by the SIGCHLD of a
  // stop.
  std::optional<ChildSignalWait> child_signal;
  auto lost_exit = [] {
    StopInfo s;
    s.kind = StopKind::kExited;
    s.exit_status = kExitStatusLost;
    return s;
  };
  int status = 0;
  int64_t dead_since = -1;
  for (unsigned round = 0;; ++round) {
    pid_t r = ::waitpid(tid_, &status, __WALL | WNOHANG);
    if (r == tid_) break;
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == ECHILD && thread_dead(tid_)) {
      // Reaped already (by a wait for its leader, reap_exited_threads()): its status is lost.
      attached_ = false;
      return lost_exit();
    }
    if (r < 0) fail_errno("waitpid tid ", tid_);
    if (r != 0) fail("waitpid tid ", tid_, ": returned ", r);
    if (!block) return std::nullopt;
    if (round < kSpinRounds) {
      ::sched_yield();
      continue;
    }
    if (!child_signal) {
      child_signal.emplace();  // a stop from now on is queued: look once more, then sleep
      continue;
    }
    if (thread_dead(tid_)) {
      const Others left = reap_exited_threads(tid_);
      const int64_t now = mono_ns();
      if (dead_since < 0 || left == Others::kRunning) dead_since = now;
      // Dead, its group dying, and still not reportable (its other threads traced by someone
      // else, or stuck exiting): give up.
      if (now - dead_since >= kDeadReportNs) {
        attached_ = false;
        return lost_exit();
      }
    }
    child_signal->sleep(std::min(20u << std::min(round - kSpinRounds, 6u), 1000u));
  }
  StopInfo s;
  if (WIFEXITED(status) || WIFSIGNALED(status)) {
    s.kind = StopKind::kExited;
    s.exit_status = status;
    attached_ = false;  // the kernel has dropped the ptrace link
    return s;
  }
  if (!WIFSTOPPED(status)) fail("waitpid tid ", tid_, ": unexpected status ", hex(status));
  s.signo = WSTOPSIG(status);
  s.event = (status >> 16) & 0xff;
  switch (s.event) {
    case 0:
      s.kind = s.signo == (SIGTRAP | 0x80) ? StopKind::kSyscallTrap : StopKind::kSignalStop;
      break;
    case PTRACE_EVENT_STOP:
      s.kind = StopKind::kEventStop;
      break;
    case PTRACE_EVENT_CLONE:
    case PTRACE_EVENT_FORK:
    case PTRACE_EVENT_VFORK:
      s.kind = StopKind::kCloneEvent;
      s.event_msg = get_event_msg();
      break;
    default:
      s.kind = StopKind::kOtherEvent;
      s.event_msg = get_event_msg();
      break;
  }
  return s;
}

bool TracedThread::release_if_dead() {
  if (!thread_dead(tid_)) return false;
  if (our_child_leader(tid_)) {
    // Collecting it here would take the exit status this process, its parent, waits for: only
    // reap the traced threads that keep its exit from being reported (a bounded time).
    const int64_t deadline = mono_ns() + kDeadReportNs;
    for (useconds_t pause = 20;
         reap_exited_threads(tid_) == Others::kExiting && mono_ns() < deadline;
         pause = std::min(pause * 2, 1000u))
      ::usleep(pause);
    attached_ = false;
    return true;
  }
  // A traced zombie is ours until we wait for it; collecting it hands it to its real parent.
  // A leader can be collected only after its other threads: those that died traced by us are
  // reaped here, those still exiting are waited for (a bounded time). A leader whose other
  // threads run on (pthread_exit) stays linked until they end or until we exit.
  const int64_t deadline = mono_ns() + kDeadReportNs;
  for (useconds_t pause = 20;; pause = std::min(pause * 2, 1000u)) {
    int status;
    pid_t r = ::waitpid(tid_, &status, __WALL | WNOHANG);
    if (r < 0 && errno == EINTR) continue;
    if (r != 0) break;  // collected, or not ours to collect any more
    if (reap_exited_threads(tid_) != Others::kExiting &&
        ::waitpid(tid_, &status, __WALL | WNOHANG) == 0)
      break;
    if (mono_ns() >= deadline) break;
    ::usleep(pause);
  }
  attached_ = false;
  return true;
}

void TracedThread::send_interrupt() {
  if (!attached_) fail("interrupt tid ", tid_, ": not attached");
  interrupt_sent_ = xptrace(PTRACE_INTERRUPT, tid_, 0, uint64_t{0}) == 0;
}

int TracedThread::interrupt_and_wait() {
  interrupt_until(-1);
  return last_stop_signo_;
}

bool TracedThread::interrupt_and_wait_for(int timeout_ms) {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  const int64_t now = int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  return interrupt_until(now + int64_t{timeout_ms} * 1'000'000);
}

bool TracedThread::interrupt_until(int64_t deadline_ns) {
  if (!attached_) fail("interrupt tid ", tid_, ": not attached");
  auto next_stop = [&]() -> std::optional<StopInfo> {
    if (deadline_ns < 0) return wait_stop();
    ChildSignalWait child_signal;  // before the first look: a stop after it ends the sleep
    for (unsigned pause = 20;; pause = std::min(pause * 2, 10000u)) {
      if (auto s = poll_stop(false)) return s;
      // Killed meanwhile (a leader's exit may never be reported): collected, never waited for.
      if (release_if_dead()) fail("tid ", tid_, " exited while being interrupted");
      if (mono_ns() >= deadline_ns) return std::nullopt;
      child_signal.sleep(pause);
    }
  };
  for (int round = 0; round < kMaxRounds; ++round) {
    if (!std::exchange(interrupt_sent_, false) &&
        xptrace(PTRACE_INTERRUPT, tid_, 0, uint64_t{0}) != 0)
      fail_request("PTRACE_INTERRUPT", tid_);
    std::optional<StopInfo> got = next_stop();
    if (!got) return false;
    const StopInfo& s = *got;
    switch (s.kind) {
      case StopKind::kEventStop:
        // Our interrupt, or a group-stop (signo SIGSTOP & co.): registers are readable.
        last_stop_signo_ = s.signo;
        return true;
      case StopKind::kExited:
        fail("tid ", tid_, " ", describe_exit(s.exit_status), " while being interrupted");
      case StopKind::kSignalStop:
        // Another signal got there first. This stop consumed our interrupt (any trap clears a
        // pending PTRACE_INTERRUPT); give the signal back and interrupt again.
        resume(PTRACE_CONT, s.signo, "giving back a signal met while interrupting");
        break;
      case StopKind::kCloneEvent:
        note_new_task(s);
        resume(PTRACE_CONT, 0, "resuming from a clone event while interrupting");
        break;
      case StopKind::kSyscallTrap:
      case StopKind::kOtherEvent:
        resume(PTRACE_CONT, 0, "resuming from an event while interrupting");
        break;
    }
  }
  fail("interrupt tid ", tid_, ": no PTRACE_EVENT_STOP after ", kMaxRounds,
       " rounds (signals keep arriving)");
}

void TracedThread::cont(int sig) {
  if (!attached_) fail("PTRACE_CONT tid ", tid_, ": not attached");
  resume(PTRACE_CONT, sig, "cont");
}

void TracedThread::detach() {
  if (!attached_) return;
  if (xptrace(PTRACE_DETACH, tid_, 0, uint64_t{0}) == 0) {
    attached_ = false;
    return;
  }
  if (errno != ESRCH) fail_errno("PTRACE_DETACH tid ", tid_);
  // ESRCH: the thread is running (the kernel detaches only a stopped tracee), or it is dead.
  for (int round = 0; round < kMaxRounds; ++round) {
    // A dead thread never stops again; waiting for it could block for good (a killed leader
    // is reported only after its other threads are reaped).
    if (release_if_dead()) return;
    if (xptrace(PTRACE_INTERRUPT, tid_, 0, uint64_t{0}) != 0) {
      if (errno == ESRCH || errno == EIO) {  // gone (and reaped, or being released)
        attached_ = false;
        return;
      }
      fail_errno("PTRACE_INTERRUPT tid ", tid_, " (to detach)");
    }
    std::optional<StopInfo> got;
    for (useconds_t pause = 20; !(got = poll_stop(false)); pause = std::min(pause * 2, 10000u)) {
      if (release_if_dead()) return;
      ::usleep(pause);
    }
    const StopInfo& s = *got;
    if (s.kind == StopKind::kExited) return;
    if (s.kind == StopKind::kCloneEvent) note_new_task(s);
    int sig = s.kind == StopKind::kSignalStop ? s.signo : 0;  // pass a met signal on
    if (xptrace(PTRACE_DETACH, tid_, 0, static_cast<uint64_t>(sig)) == 0) {
      attached_ = false;
      return;
    }
    if (errno != ESRCH) fail_errno("PTRACE_DETACH tid ", tid_);
  }
  fail("PTRACE_DETACH tid ", tid_, ": thread did not stop within ", kMaxRounds, " rounds");
}

Regs TracedThread::get_regs() const {
  Regs regs;
  std::memset(&regs, 0, sizeof regs);
  iovec iov{&regs, sizeof regs};
  if (xptrace(PTRACE_GETREGSET, tid_, NT_PRSTATUS, &iov) != 0) {
    fail_request("PTRACE_GETREGSET NT_PRSTATUS", tid_);
  }
  if (iov.iov_len != sizeof regs) {
    fail("PTRACE_GETREGSET NT_PRSTATUS tid ", tid_, ": got ", iov.iov_len, " bytes, want ",
         sizeof regs);
  }
  return regs;
}

void TracedThread::set_regs(const Regs& regs) {
  Regs copy = regs;
  iovec iov{&copy, sizeof copy};
  if (xptrace(PTRACE_SETREGSET, tid_, NT_PRSTATUS, &iov) != 0) {
    fail_request("PTRACE_SETREGSET NT_PRSTATUS", tid_);
  }
}

std::vector<uint8_t> TracedThread::get_xstate() const {
  // The kernel fills at most its xstate size (832 bytes here, several KiB with AMX) and
  // reports it in iov_len.
  std::vector<uint8_t> buf(64 * 1024);
  iovec iov{buf.data(), buf.size()};
  if (xptrace(PTRACE_GETREGSET, tid_, NT_X86_XSTATE, &iov) != 0) {
    fail_request("PTRACE_GETREGSET NT_X86_XSTATE", tid_);
  }
  if (iov.iov_len == 0 || iov.iov_len > buf.size()) {
    fail("PTRACE_GETREGSET NT_X86_XSTATE tid ", tid_, ": bad size ", iov.iov_len);
  }
  buf.resize(iov.iov_len);
  buf.shrink_to_fit();
  return buf;
}

void TracedThread::set_xstate(const std::vector<uint8_t>& xstate) {
  // The kernel wants exactly its full xstate size here; EFAULT otherwise.
  std::vector<uint8_t> copy = xstate;
  iovec iov{copy.data(), copy.size()};
  if (xptrace(PTRACE_SETREGSET, tid_, NT_X86_XSTATE, &iov) != 0) {
    int err = errno;
    fail_errno_value(
        err, cat("PTRACE_SETREGSET NT_X86_XSTATE tid ", tid_, " (", xstate.size(), " bytes)"));
  }
}

uint64_t TracedThread::get_sigmask() const {
  uint64_t mask = 0;
  if (xptrace(PTRACE_GETSIGMASK, tid_, sizeof mask, &mask) != 0) {
    fail_request("PTRACE_GETSIGMASK", tid_);
  }
  return mask;
}

void TracedThread::set_sigmask(uint64_t mask) {
  if (xptrace(PTRACE_SETSIGMASK, tid_, sizeof mask, &mask) != 0) {
    fail_request("PTRACE_SETSIGMASK", tid_);
  }
}

abi::ptrace_rseq_configuration TracedThread::get_rseq() const {
  abi::ptrace_rseq_configuration conf;
  std::memset(&conf, 0, sizeof conf);
  long n = xptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid_, sizeof conf, &conf);
  if (n < 0) fail_request("PTRACE_GET_RSEQ_CONFIGURATION", tid_);
  if (static_cast<size_t>(n) > sizeof conf) {
    fail("PTRACE_GET_RSEQ_CONFIGURATION tid ", tid_, ": kernel wrote ", n,
         " bytes, want <= ", sizeof conf);
  }
  return conf;
}

void TracedThread::set_options(unsigned long options) {
  if (xptrace(PTRACE_SETOPTIONS, tid_, 0, options) != 0) fail_request("PTRACE_SETOPTIONS", tid_);
}

std::optional<std::vector<sock_filter>> TracedThread::seccomp_filter(unsigned index) const {
  // BPF_MAXINSNS bounds one program; the first call asks for the length only.
  long n = xptrace(PTRACE_SECCOMP_GET_FILTER, tid_, index, nullptr);
  if (n < 0 && errno == ENOENT) return std::nullopt;
  if (n < 0) fail_request("PTRACE_SECCOMP_GET_FILTER", tid_);
  if (n == 0 || n > BPF_MAXINSNS)
    fail("PTRACE_SECCOMP_GET_FILTER tid ", tid_, " filter ", index, ": ", n,
         " instructions (want 1..", BPF_MAXINSNS, ")");
  std::vector<sock_filter> prog(static_cast<size_t>(n));
  long got = xptrace(PTRACE_SECCOMP_GET_FILTER, tid_, index, prog.data());
  if (got < 0) fail_request("PTRACE_SECCOMP_GET_FILTER", tid_);
  if (got != n)
    fail("PTRACE_SECCOMP_GET_FILTER tid ", tid_, " filter ", index, ": length changed from ", n,
         " to ", got);
  return prog;
}

uint64_t TracedThread::seccomp_filter_flags(unsigned index) const {
  abi::seccomp_metadata md{index, 0};
  if (xptrace(PTRACE_GET_SECCOMP_METADATA, tid_, sizeof md, &md) < 0)
    fail_request("PTRACE_GET_SECCOMP_METADATA", tid_);
  return md.flags;
}

std::vector<siginfo_t> TracedThread::peek_siginfo(bool shared) const {
  constexpr int kBatch = 32;
  // RLIMIT_SIGPENDING bounds a queue; this only guards against a kernel surprise.
  constexpr size_t kMaxQueued = 1u << 20;
  std::vector<siginfo_t> out;
  siginfo_t batch[kBatch];
  for (;;) {
    __ptrace_peeksiginfo_args args;
    args.off = out.size();
    args.flags = shared ? PTRACE_PEEKSIGINFO_SHARED : 0;
    args.nr = kBatch;
    long n = ::ptrace(PTRACE_PEEKSIGINFO, tid_, &args, batch);
    if (n < 0) fail_request(shared ? "PTRACE_PEEKSIGINFO (shared)" : "PTRACE_PEEKSIGINFO", tid_);
    if (n == 0) break;
    if (n > kBatch) fail("PTRACE_PEEKSIGINFO tid ", tid_, ": returned ", n, " > ", kBatch);
    out.insert(out.end(), batch, batch + n);
    if (out.size() > kMaxQueued) fail("PTRACE_PEEKSIGINFO tid ", tid_, ": more than ", kMaxQueued);
  }
  return out;
}

unsigned long TracedThread::get_event_msg() const {
  unsigned long msg = 0;
  if (xptrace(PTRACE_GETEVENTMSG, tid_, 0, &msg) != 0) fail_request("PTRACE_GETEVENTMSG", tid_);
  return msg;
}

static std::function<void()>& injected_call_hook() {
  static std::function<void()> hook;
  return hook;
}

void set_injected_call_hook(std::function<void()> hook) {
  injected_call_hook() = std::move(hook);
}

// Injection. The thread sits in a ptrace-stop (normally the PTRACE_EVENT_STOP of
// interrupt_and_wait(), possibly inside an interrupted syscall: then rax holds a -ERESTART*
// code and orig_rax the syscall number). orig_rax = -1 makes the kernel skip its restart logic
// on our registers when the thread leaves the stop. Putting the saved registers back at the end
// puts the interrupted syscall back too: when the caller resumes the thread, the kernel
// restarts it exactly as it would have without us (restart_block is untouched by our call).
long TracedThread::syscall(uint64_t insn, InjectMode mode, long nr, uint64_t a1, uint64_t a2,
                           uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6) {
  const bool step = mode == InjectMode::kSingleStep;
  // Single-stepping `syscall` traps after it returns (rip past its 2 bytes); `syscall; int3`
  // traps after the int3 (rip past 3 bytes).
  return inject(insn, step, insn + (step ? 2 : 3), nr, a1, a2, a3, a4, a5, a6);
}

long TracedThread::syscall_trap_at(uint64_t insn, uint64_t trap_rip, long nr, uint64_t a1,
                                   uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5,
                                   uint64_t a6) {
  return inject(insn, false, trap_rip, nr, a1, a2, a3, a4, a5, a6);
}

long TracedThread::inject(uint64_t insn, bool step, uint64_t trap_rip, long nr, uint64_t a1,
                          uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6) {
  if (!attached_) fail("inject syscall ", nr, " into tid ", tid_, ": not attached");
  const Regs saved = get_regs();
  const uint64_t saved_mask = get_sigmask();

  Regs regs = saved;
  regs.rax = static_cast<uint64_t>(nr);
  regs.rdi = a1;
  regs.rsi = a2;
  regs.rdx = a3;
  regs.r10 = a4;
  regs.r8 = a5;
  regs.r9 = a6;
  regs.rip = insn;
  regs.orig_rax = ~0ull;
  set_sigmask(kInjectMask);
  set_regs(regs);

  const int request = step ? PTRACE_SINGLESTEP : PTRACE_CONT;

  auto what = [&] { return cat("injected syscall ", nr, " at ", hex(insn), " in tid ", tid_); };
  // Puts the thread back as we found it; used on failure too.
  auto restore = [&] {
    set_regs(saved);
    set_sigmask(saved_mask);
  };

  std::vector<int> deferred;  // asynchronous signals met on the way, to send again
  std::string failure;
  long result = 0;
  bool done = false;
  for (int round = 0; round < kMaxRounds && !done && failure.empty(); ++round) {
    resume(request, 0, "injected syscall");
    if (injected_call_hook()) injected_call_hook()();
    StopInfo s = wait_stop();
    switch (s.kind) {
      case StopKind::kExited:
        fail(what(), ": thread ", describe_exit(s.exit_status));
      case StopKind::kSignalStop: {
        siginfo_t si = get_siginfo(tid_);
        const bool from_kernel = si.si_code > 0;  // not kill/tgkill/sigqueue
        if (s.signo == SIGTRAP && from_kernel) {
          Regs after = get_regs();
          if (after.rip == trap_rip) {
            result = static_cast<long>(after.rax);
            done = true;
          } else {
            failure = cat("SIGTRAP (si_code ", si.si_code, ") at rip ", hex(after.rip),
                          ", expected ", hex(trap_rip));
          }
        } else if (from_kernel && (kForcedSignals & sigbit(s.signo))) {
          // A fault (bad insn address, no `syscall` there) or seccomp's SIGSYS, caused by us.
          failure = cat("raised ", signame(s.signo), " (si_code ", si.si_code, ", si_addr ",
                        hex(reinterpret_cast<uint64_t>(si.si_addr)), ")");
        } else {
          // Asynchronous (SIGSTOP, which cannot be blocked, or one of the forced set sent by
          // kill): suppress it now and send it again once the thread is restored, so it ends
          // up pending instead of being delivered into our injected registers.
          deferred.push_back(s.signo);
        }
        break;
      }
      case StopKind::kCloneEvent:
        // An injected clone under PTRACE_O_TRACECLONE stops the parent mid-call.
        note_new_task(s);
        break;
      case StopKind::kEventStop:    // a stray PTRACE_INTERRUPT trap or a group-stop
      case StopKind::kSyscallTrap:  // only if someone left syscall tracing on
      case StopKind::kOtherEvent:   // e.g. PTRACE_EVENT_EXIT: the next wait reports the exit
        break;
    }
  }
  restore();
  if (!deferred.empty()) {
    pid_t tgid = proc::read_status(tid_).tgid;
    for (int sig : deferred) {
      // SIGSTOP is a process-wide stop: send it to the process, the rest to the thread.
      bool ok = sig == SIGSTOP ? send_signal(tgid, sig) : send_thread_signal(tgid, tid_, sig);
      if (!ok) fail_errno(what(), ": re-sending ", signame(sig), " met on the way");
    }
  }
  if (!failure.empty()) fail(what(), ": ", failure);
  if (!done) fail(what(), ": no trap after ", kMaxRounds, " stops");
  ++injected_;
  return result;
}

void remote_read(pid_t pid, uint64_t addr, void* buf, size_t len) {
  if (pid <= 0) fail("remote read from pid ", pid, ": invalid pid");
  size_t done = 0;
  while (done < len) {
    iovec local{static_cast<char*>(buf) + done, len - done};
    iovec remote{reinterpret_cast<void*>(addr + done), len - done};
    ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      fail_errno("process_vm_readv pid ", pid, " ", range(addr, len), " at ", hex(addr + done));
    }
    if (n == 0) {
      fail("process_vm_readv pid ", pid, " ", range(addr, len), ": no progress at ",
           hex(addr + done));
    }
    done += static_cast<size_t>(n);
  }
}

void remote_write(pid_t pid, uint64_t addr, const void* buf, size_t len) {
  if (pid <= 0) fail("remote write to pid ", pid, ": invalid pid");
  size_t done = 0;
  while (done < len) {
    iovec local{const_cast<char*>(static_cast<const char*>(buf)) + done, len - done};
    iovec remote{reinterpret_cast<void*>(addr + done), len - done};
    ssize_t n = ::process_vm_writev(pid, &local, 1, &remote, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      fail_errno("process_vm_writev pid ", pid, " ", range(addr, len), " at ", hex(addr + done));
    }
    if (n == 0) {
      fail("process_vm_writev pid ", pid, " ", range(addr, len), ": no progress at ",
           hex(addr + done));
    }
    done += static_cast<size_t>(n);
  }
}

void remote_poke(pid_t pid, uint64_t addr, const void* buf, size_t len) {
  if (pid <= 0) fail("remote poke into pid ", pid, ": invalid pid");
  std::string path = cat("/proc/", pid, "/mem");
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) fail_errno("open ", path);
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd.get(), static_cast<const char*>(buf) + done, len - done,
                         static_cast<off_t>(addr + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno("write ", path, " ", range(addr, len), " at ", hex(addr + done));
    if (n == 0) fail("write ", path, " ", range(addr, len), ": no progress at ", hex(addr + done));
    done += static_cast<size_t>(n);
  }
}

// Dump-side fix-up (DESIGN.md section 4), for registers that will be set on a restored thread.
//
// -ERESTARTSYS / -ERESTARTNOINTR / -ERESTARTNOHAND: rewind to the `syscall` instruction with
// the number back in rax, so the restored thread simply issues the call again. (No handler
// runs at the restore point, which is exactly when the kernel itself restarts these codes.)
//
// -ERESTART_RESTARTBLOCK: the kernel would rewind with rax = __NR_restart_syscall, which calls
// current->restart_block.fn. That block (deadline, clock, user pointer) lives in the kernel's
// task struct; it is not dumped, and in a restored thread restart_syscall would run
// do_no_restart_syscall and return -EINTR: an error the program never gets without a signal
// handler running (script(1) polls with a timeout, all signals blocked, and exits on it).
// The calls known to use the block are re-issued from the start instead, with the arguments
// still in the registers, which is what the kernel does for them when no handler runs, except
// for the deadline:
// - poll with a timeout, futex waits with a timeout: the wait starts over, overrunning the
//   original deadline by at most the time already waited (an overrun poll(2) and futex(2)
//   allow; an early EINTR or timeout they do not). A futex wait re-checks the value first.
// - nanosleep, relative clock_nanosleep: the kernel wrote the remaining time to `rem` when it
//   interrupted the sleep; when `rem` is the request itself (glibc's sleep()) the restored
//   thread sleeps exactly what was left, otherwise the whole request again.
// Any other user of the block returns -EINTR (CRIU's restore ends that way too).
//
// orig_rax = -1 in every case: the registers now describe "not in a syscall", so the kernel
// does not apply its own restart logic on top when the restored thread leaves its stop.
bool fixup_interrupted_syscall(Regs& regs) {
  if (static_cast<long>(regs.orig_rax) < 0) return false;
  auto rewind = [&regs] {
    regs.rip -= 2;  // `syscall` and `int 0x80` are both 2 bytes
    regs.rax = regs.orig_rax;
    regs.orig_rax = ~0ull;
  };
  switch (static_cast<long>(regs.rax)) {
    case kErestartSys:
    case kErestartNoIntr:
    case kErestartNoHand:
      rewind();
      return true;
    case kErestartRestartBlock:
      switch (static_cast<long>(regs.orig_rax)) {
        case SYS_poll:
        case SYS_futex:
        case SYS_nanosleep:
        case SYS_clock_nanosleep:
          rewind();
          return true;
        default:
          regs.rax = static_cast<uint64_t>(-static_cast<long>(EINTR));
          regs.orig_rax = ~0ull;
          return true;
      }
    default:
      return false;
  }
}

uint64_t find_vdso_syscall_insn(pid_t pid) {
  std::string path = cat("/proc/", pid, "/maps");
  std::vector<proc::MapsEntry> maps;
  try {
    maps = proc::parse_maps(proc::read_file(path));
  } catch (const Error& e) {
    fail("finding the vdso of pid ", pid, ": ", e.what());
  }
  for (const auto& m : maps) {
    if (m.path != "[vdso]") continue;
    size_t len = m.end - m.start;
    if (len == 0 || len > (1u << 20)) {
      fail("[vdso] of pid ", pid, " has implausible size ", len, " ", range(m.start, len));
    }
    std::vector<uint8_t> text(len);
    remote_read(pid, m.start, text.data(), len);
    for (size_t i = 0; i + 1 < len; ++i) {
      // The CPU decodes from rip: any 0f 05 is a `syscall` when jumped to.
      if (text[i] == 0x0f && text[i + 1] == 0x05) return m.start + i;
    }
    fail("no syscall instruction (0f 05) in the [vdso] of pid ", pid, " ", range(m.start, len));
  }
  fail("pid ", pid, " has no [vdso] mapping in ", path);
}

}  // namespace lazycr
