#include "restore/restoree.h"

#include "restore/clone3_tid.h"

#include <linux/prctl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "common/clock.h"
#include "common/error.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/signals.h"
#include "common/syscall_batch.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;

constexpr uint64_t kDataOffset = kPageSize;
constexpr uint64_t kBatchOffset = 16;               // the batch loop, after `syscall; int3`
constexpr uint64_t kTrampolineMargin = 1ull << 20;  // kept free on both sides
constexpr uint64_t kSearchFrom = 1ull << 30;

}  // namespace

template <typename F>
long Restoree::timed(ThreadCtl&, F&& f) {
  uint64_t t0 = now_ns();
  long r = f();
  inject_ns_ += now_ns() - t0;
  injected_++;
  return r;
}

void Restoree::seize() {
  ThreadCtl c;
  c.t = TracedThread::seize(sp_.s.pid, kSeizeOptions);
  c.vtid = sp_.s.vpid;
  c.img = &proc_.threads(0);
  threads_.push_back(std::move(c));
  release_child(sp_);
  for (int round = 0;; round++) {
    StopInfo s = leader().t.wait_stop();
    if (s.kind == StopKind::kExited) fail("the new process exited before it stopped itself");
    if (s.kind == StopKind::kSignalStop && s.signo == SIGSTOP) break;
    // Anything else (a stray event stop): let it run on to its SIGSTOP.
    if (round > 16) fail("the new process did not stop itself (last stop: signal ", s.signo, ")");
    leader().t.cont(s.kind == StopKind::kSignalStop ? s.signo : 0);
  }
  // The first injected call resumes from this signal-delivery-stop with signal 0: the
  // SIGSTOP is suppressed and the process never enters a group-stop.
}

void Restoree::fork_child(pid_t vpid, Restoree& child) {
  long got = inject_clone3_with_id(*this, 0, SIGCHLD, vpid);
  if (got < 0 && got > -4096)
    fail_errno_value(static_cast<int>(-got), cat("clone3 of child pid ", vpid));
  auto tids = leader().t.take_new_tasks();
  if (tids.size() != 1) fail("clone3 reported ", tids.size(), " new tasks, expected 1");
  child.adopt_forked(tids[0], vpid, tramp_);
  if (got != vpid) fail("clone3 created child ", got, ", not ", vpid);
}

void Restoree::adopt_forked(pid_t real_pid, pid_t vpid, uint64_t tramp) {
  sp_.s.pid = real_pid;
  sp_.s.vpid = vpid;
  ThreadCtl c;
  c.t = TracedThread::adopt(real_pid);
  c.vtid = vpid;
  c.img = proc_.threads_size() > 0 ? &proc_.threads(0) : nullptr;
  threads_.push_back(std::move(c));
  tramp_ = tramp;
  sp_.s.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, real_pid, 0)));
  if (!sp_.s.pidfd) fail_errno("pidfd_open of the new child ", real_pid);
  for (int round = 0;; round++) {
    StopInfo s = leader().t.wait_stop();
    if (s.kind == StopKind::kEventStop) break;
    if (s.kind == StopKind::kExited) fail("new child ", real_pid, " exited at once");
    if (round > 16) fail("new child ", real_pid, " did not reach its first stop");
    leader().t.cont(s.kind == StopKind::kSignalStop ? s.signo : 0);
  }
}

void Restoree::exit_as_zombie(int wait_status) {
  ThreadCtl& c = leader();
  reset_arena();
  inject("prctl(PR_SET_NAME)", SYS_prctl, PR_SET_NAME, push_string(proc_.comm().substr(0, 15)));
  Regs regs = c.t.get_regs();
  regs.orig_rax = ~0ull;
  regs.rip = tramp_;
  if (WIFSIGNALED(wait_status)) {
    const int sig = WTERMSIG(wait_status);
    if (sig == SIGKILL || sig == SIGSTOP)
      ;  // their action cannot be changed (nor blocked)
    else {
      uint64_t act[4] = {0, 0, 0, 0};  // SIG_DFL
      inject(cat("rt_sigaction(", sig, ", SIG_DFL)"), SYS_rt_sigaction, static_cast<uint64_t>(sig),
             put_data(act, sizeof act), 0, 8);
    }
    // No core file: the image's status says whether one was dumped, not where.
    struct rlimit64 none {
      0, 0
    };
    ::syscall(SYS_prlimit64, pid(), RLIMIT_CORE, &none, nullptr);
    regs.rax = SYS_kill;
    regs.rdi = static_cast<uint64_t>(vpid());
    regs.rsi = static_cast<uint64_t>(sig);
    c.t.set_sigmask(0);
  } else {
    regs.rax = SYS_exit_group;
    regs.rdi = static_cast<uint64_t>(WEXITSTATUS(wait_status));
  }
  c.t.set_regs(regs);
  c.t.detach();
  threads_.clear();
  pollfd pf{sp_.s.pidfd.get(), POLLIN, 0};
  int n;
  do {
    n = ::poll(&pf, 1, 10000);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) fail("did not exit as the zombie it was within 10 s");
  committed_ = true;
  exited_ = true;
}

void Restoree::reap_zombie() noexcept {
  if (!exited_ || sp_.s.pid <= 0) return;
  int status;
  while (::waitpid(sp_.s.pid, &status, __WALL) < 0 && errno == EINTR) {
  }
}

void Restoree::map_trampoline(uint64_t addr) {
  uint64_t insn = find_vdso_syscall_insn(pid());
  long r = timed(leader(), [&] {
    return leader().t.syscall(insn, InjectMode::kSingleStep, SYS_mmap, addr, kTrampolineSize,
                              PROT_READ | PROT_WRITE | PROT_EXEC,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                              static_cast<uint64_t>(-1), 0);
  });
  if (r < 0 && r > -4096)
    fail_errno_value(static_cast<int>(-r), cat("mmap of the trampoline at ", hex(addr)));
  if (static_cast<uint64_t>(r) != addr)
    fail("mmap of the trampoline at ", hex(addr), " returned ", hex(static_cast<uint64_t>(r)));
  unsigned char code[kBatchOffset + 128] = {0x0f, 0x05, 0xcc};  // syscall; int3
  static_assert(kBatchOffset + 128 <= kDataOffset);
  if (batch_code().size() > 128) fail("the batch loop does not fit the trampoline");
  std::memcpy(code + kBatchOffset, batch_code().data(), batch_code().size());
  remote_write(pid(), addr, code, sizeof code);
  tramp_ = addr;
}

long Restoree::call(ThreadCtl& c, const std::string& what, long nr, uint64_t a1, uint64_t a2,
                    uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6) {
  if (tramp_ == 0) fail(what, ": no trampoline");
  long r = timed(
      c, [&] { return c.t.syscall(tramp_, InjectMode::kTrapAfter, nr, a1, a2, a3, a4, a5, a6); });
  if (r < 0 && r > -4096) {
    std::string where = &c == &threads_.front() ? std::string() : cat(" in thread ", c.vtid);
    fail_errno_value(static_cast<int>(-r), cat(what, where));
  }
  return r;
}

long Restoree::inject(const std::string& what, long nr, uint64_t a1, uint64_t a2, uint64_t a3,
                      uint64_t a4, uint64_t a5, uint64_t a6) {
  return call(leader(), what, nr, a1, a2, a3, a4, a5, a6);
}

uint64_t Restoree::put_data(const void* data, size_t len) {
  arena_ = 0;
  return push(data, len);
}

uint64_t Restoree::push(const void* data, size_t len) {
  if (tramp_ == 0) fail("no trampoline for syscall arguments");
  uint64_t off = (arena_ + 7) & ~uint64_t{7};
  if (len > kTrampolineSize - kDataOffset - off)
    fail(len, " bytes of syscall arguments do not fit the trampoline");
  remote_write(pid(), tramp_ + kDataOffset + off, data, len);
  arena_ = off + len;
  return tramp_ + kDataOffset + off;
}

std::vector<long> Restoree::batch(ThreadCtl& c, const std::vector<Call>& calls) {
  const uint64_t table_off = (arena_ + 63) & ~uint64_t{63};
  if (table_off + kBatchEntrySize > kTrampolineSize - kDataOffset)
    fail("no room left in the trampoline for a batch of system calls");
  std::vector<BatchCall> table(calls.size());
  for (size_t i = 0; i < calls.size(); i++) table[i] = {calls[i].nr, calls[i].a};
  uint64_t rounds = 0;
  const uint64_t t0 = now_ns();
  std::vector<long> results =
      run_batch(c.t, pid(), tramp_ + kBatchOffset, tramp_ + kDataOffset + table_off,
                (kTrampolineSize - kDataOffset - table_off) / kBatchEntrySize, table, &rounds);
  inject_ns_ += now_ns() - t0;
  injected_ += rounds;
  batches_ += rounds;
  batched_ += results.size();
  if (results.size() < calls.size() ||
      (!results.empty() && results.back() < 0 && results.back() > -4096)) {
    const size_t failed = results.size() - 1;
    std::string where = &c == &threads_.front() ? std::string() : cat(" in thread ", c.vtid);
    fail_errno_value(static_cast<int>(-results.back()), cat(calls[failed].what, where));
  }
  return results;
}

std::vector<long> Restoree::batch(const std::vector<Call>& calls) {
  return batch(leader(), calls);
}

void Restoree::unmap_trampoline() {
  uint64_t t = tramp_;
  long r = timed(leader(), [&] {
    return leader().t.syscall(t, InjectMode::kSingleStep, SYS_munmap, t, kTrampolineSize);
  });
  if (r != 0) fail_errno_value(static_cast<int>(-r), cat("munmap of the trampoline at ", hex(t)));
  tramp_ = 0;
}

ThreadCtl& Restoree::adopt_new_thread(pid_t vtid, const image::Thread* img) {
  auto tids = leader().t.take_new_tasks();
  if (tids.size() != 1) fail("clone3 reported ", tids.size(), " new tasks, expected 1");
  ThreadCtl c;
  c.t = TracedThread::adopt(tids[0]);
  c.vtid = vtid;
  c.img = img;
  threads_.push_back(std::move(c));
  ThreadCtl& n = threads_.back();
  for (int round = 0;; round++) {
    StopInfo s = n.t.wait_stop();
    if (s.kind == StopKind::kEventStop) break;
    if (s.kind == StopKind::kExited) fail("new thread ", tids[0], " exited at once");
    if (round > 16) fail("new thread ", tids[0], " did not reach its first stop");
    n.t.cont(s.kind == StopKind::kSignalStop ? s.signo : 0);
  }
  return n;
}

Spawned Restoree::commit() {
  committed_ = true;
  threads_.clear();
  return std::move(sp_.s);
}

void Restoree::kill() noexcept {
  if (committed_) return;
  try {
    if (sp_.s.pidfd) send_signal_pidfd(sp_.s.pidfd.get(), SIGKILL);
    if (sp_.s.reaper_pidfd) send_signal_pidfd(sp_.s.reaper_pidfd.get(), SIGKILL);
  } catch (const Error& e) {
    log::warn("restore cleanup: ", e.what());
  }
}

long Restoree::inject_raw(long nr, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4) {
  if (tramp_ == 0) fail("no trampoline");
  return timed(leader(), [&] {
    return leader().t.syscall(tramp_, InjectMode::kTrapAfter, nr, a1, a2, a3, a4);
  });
}

namespace {

constexpr auto kReaperWait = std::chrono::seconds(30);

// Collects every thread of `pid` that is a zombie still traced by us (not ours: ECHILD).
void collect_traced_zombies(pid_t pid) noexcept {
  std::vector<pid_t> tids;
  try {
    tids = proc::list_tasks(pid);
  } catch (const Error&) {
    // gone: only the leader's wait below can matter
  }
  for (pid_t tid : tids) {
    int status;
    while (::waitpid(tid, &status, __WALL | WNOHANG) < 0 && errno == EINTR) {
    }
  }
  int status;
  while (::waitpid(pid, &status, __WALL | WNOHANG) < 0 && errno == EINTR) {
  }
}

}  // namespace

void Restoree::destroy() noexcept {
  kill();
  reap_traced();
  // Our child: the process itself, or the reaper. (A child of the tree whose parent is
  // alive is not ours: ECHILD.)
  pid_t child = sp_.s.reaper > 0 ? sp_.s.reaper : sp_.s.pid;
  if (child <= 0) return;
  // The reaper (--pidns) ends only once every process of its namespace is reaped, and a
  // zombie we still trace (a thread whose exit reap_traced() gave up on) is ours to collect
  // first: one blocking wait for the reaper would wait for ever. Collected here as we go.
  const auto deadline = std::chrono::steady_clock::now() + kReaperWait;
  for (useconds_t pause = 20;; pause = std::min(pause * 2, 10'000u)) {
    int status;
    pid_t r = ::waitpid(child, &status, __WALL | WNOHANG);
    if (r == child || (r < 0 && errno != EINTR)) return;
    if (child != sp_.s.pid) collect_traced_zombies(sp_.s.pid);
    if (std::chrono::steady_clock::now() > deadline) {
      log::warn("restore cleanup: pid ", child, " did not end within ",
                std::chrono::duration_cast<std::chrono::seconds>(kReaperWait).count(),
                " s after SIGKILL; its ptrace links end when lazycr exits");
      return;
    }
    ::usleep(pause);
  }
}

void Restoree::reap_traced() noexcept {
  sp_.go.reset();
  sp_.s.reaper_ctl.reset();
  // Auto-attached tasks not adopted yet (a failure right after an injected clone3): a
  // thread dies with the process, a forked child must be killed (it is stopped and traced
  // by us: its pid cannot be reused meanwhile).
  std::vector<pid_t> unadopted;
  if (!threads_.empty()) unadopted = threads_.front().t.take_new_tasks();
  for (pid_t tid : unadopted) {
    if (!committed_) ::syscall(SYS_tgkill, tid, tid, SIGKILL);
    ThreadCtl c;
    c.t = TracedThread::adopt(tid);
    threads_.push_back(std::move(c));
  }
  // Other threads first: the leader's exit is reported only once they are gone.
  for (size_t i = threads_.size(); i-- > 0;) {
    TracedThread& t = threads_[i].t;
    for (int round = 0; t.attached() && round < 1000; round++) {
      try {
        t.wait_stop();
      } catch (const Error&) {
        break;  // ECHILD: already reaped
      }
    }
  }
  threads_.clear();
}

uint64_t choose_trampoline(const std::vector<proc::MapsEntry>& now,
                           const std::vector<image::Process>& procs) {
  std::vector<std::pair<uint64_t, uint64_t>> used;
  for (const auto& m : now)
    if (m.end <= kTaskSize) used.push_back({m.start, m.end});
  for (const auto& p : procs)
    for (const auto& a : p.areas())
      if (a.kind() != image::MemoryArea::VSYSCALL) used.push_back({a.start(), a.end()});
  std::sort(used.begin(), used.end());
  uint64_t candidate = kSearchFrom;
  for (const auto& [s, e] : used) {
    if (e + kTrampolineMargin <= candidate) continue;
    if (candidate + kTrampolineSize + kTrampolineMargin <= s) return candidate;
    candidate = std::max(candidate, e + kTrampolineMargin);
  }
  if (candidate + kTrampolineSize + kTrampolineMargin <= kTaskSize) return candidate;
  fail("no free address for the trampoline in the address spaces of the tree");
}

}  // namespace lazycr::restore
