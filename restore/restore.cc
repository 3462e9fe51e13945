// The restore sequence (DESIGN.md section 5), for one process with any number of threads.
//
// Everything that must happen inside the new process is a system call injected through a
// small trampoline page (`syscall; int3`) with common/ptrace.h. Differences from DESIGN.md
// section 5, and why:
// - The child is seized *before* it stops itself. A child that stops first is in a group-stop
//   that PTRACE_DETACH re-enters at the end (the process would stay stopped, and only a
//   SIGCONT, visible to the program, would let it go). Seized first, its SIGSTOP is a
//   signal-delivery-stop that the first injected call suppresses.
// - Pending signals are queued from inside the process (rt_sigqueueinfo/rt_tgsigqueueinfo
//   injected in the target thread), where the kernel accepts every si_code; from outside it
//   refuses si_code >= 0 (SI_USER, kernel codes) and SI_TKILL.
// - The vdso is moved by unmapping everything but the trampoline and calling
//   arch_prctl(ARCH_MAP_VDSO_64) with the image's [vvar] address (two calls), then checked.
// - rseq: registering from the trampoline makes the kernel clear rseq->rseq_cs on the way
//   back to user space (the trampoline is in no critical section). The image's value is
//   written back before the final registers, so a thread dumped inside a critical section
//   is still aborted to its handler as it would have been.
// - Calls are batched: a loop in the trampoline runs a table of system calls and traps once
//   (one ptrace round trip per step instead of one per call; 5,000 areas: 7,582 -> 19).
// - Identical maps need more than mmap at the right place: VMA flags mmap does not set (e.g.
//   VM_NOHUGEPAGE of MAP_STACK thread stacks) are re-applied from the image's VmFlags, and
//   neighbouring areas the original's kernel kept apart (separate anon_vmas) are kept apart
//   (AddressSpace::find_split_runs()).
//
// Steps (names for --fault-inject): see kSteps.
#include "restore/restore.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/prctl.h>
#include <linux/sched.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "common/signals.h"
#include "image-format/image_dir.h"
#include "restore/internal.h"
#include "restore/memory.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;

// Every step a restore goes through, in order; --fault-inject=NAME fails at the start of that
// step ("thread-created": after the first extra thread exists).
[[maybe_unused]] constexpr const char* kSteps[] = {
    "validate",      "create",           "seize",          "pin",       "trampoline",
    "rseq",          "close-fds",        "unmap",          "vdso",      "map-areas",
    "uffd",          "server",           "fill",           "protect",   "mm",
    "after-shaping", "process-state",    "sigactions",     "fds",       "session",
    "thread-state",  "threads",          "thread-created", "signals",   "rlimits",
    "credentials",   "unmap-trampoline", "server-ready",   "registers", "detach"};

constexpr uint64_t kTaskSize = image::kUserSpaceEnd - kPageSize;  // TASK_SIZE on x86_64
// The trampoline mapping: code in its first page, then an arena for syscall arguments and
// batch tables.
constexpr uint64_t kTrampolineSize = 1ull << 20;
constexpr uint64_t kDataOffset = kPageSize;
constexpr uint64_t kBatchOffset = 16;  // the batch loop, after `syscall; int3`
constexpr size_t kBatchEntry = 64;     // nr, six arguments, result

// The batch loop (x86-64), entered like an injected `syscall; int3` whose int3 is at +2:
//   jmp start; int3;
//   start: rbx = rdi (table), r12 = rsi (count), r13 = 0
//   loop:  while r13 < r12: load rax, rdi, rsi, rdx, r10, r8, r9 from [rbx]; syscall;
//          [rbx+56] = rax; stop if rax >= -4095; rbx += 64; r13++
//   rax = r13 (entries done); jmp to the int3
// One ptrace round trip runs any number of calls; a failed call stops the batch.
constexpr unsigned char kBatchCode[] = {
    0xeb, 0x01, 0xcc, 0x48, 0x89, 0xfb, 0x49, 0x89, 0xf4, 0x4d, 0x31, 0xed, 0x4d, 0x39, 0xe5,
    0x73, 0x32, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b,
    0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30, 0x0f,
    0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x09, 0x48, 0x83,
    0xc3, 0x40, 0x49, 0xff, 0xc5, 0xeb, 0xc9, 0x4c, 0x89, 0xe8, 0xeb, 0xba};
constexpr uint64_t kTrampolineMargin = 1ull << 20;  // kept free on both sides
constexpr uint64_t kSearchFrom = 1ull << 30;
constexpr size_t kKernelSigactionSize = 32;                // handler, flags, restorer, mask
constexpr uint64_t kRseqFlagUnregister = 1;                // RSEQ_FLAG_UNREGISTER
constexpr int kSsAutoDisarm = static_cast<int>(1u << 31);  // SS_AUTODISARM (Linux 4.7)
constexpr unsigned long kThreadFlags =
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;

uint64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Runs named steps: adds "restore: <step> for <who>: " to any error, and fails on purpose at
// the step named by --fault-inject.
class Steps {
 public:
  explicit Steps(std::string fault) : fault_(std::move(fault)) {}

  template <typename F>
  void run(const char* step, const std::string& who, F&& f) {
    const uint64_t t0 = now_ns();
    try {
      check(step);
      f();
    } catch (const Error& e) {
      throw Error(cat("restore: ", step, " for ", who, ": ", e.what()), e.sys_errno());
    }
    log::debug("restore: ", step, " for ", who, ": ", (now_ns() - t0) / 1000, " us");
  }
  // Fails if `name` is the injected fault (for faults in the middle of a step).
  void check(const char* name) const {
    if (fault_ == name) throw Error(cat("injected fault (--fault-inject=", name, ")"), EIO);
  }

 private:
  std::string fault_;
};

Regs to_regs(const image::X86Regs& p) {
  Regs r;
  std::memset(&r, 0, sizeof r);
  r.r15 = p.r15();
  r.r14 = p.r14();
  r.r13 = p.r13();
  r.r12 = p.r12();
  r.rbp = p.rbp();
  r.rbx = p.rbx();
  r.r11 = p.r11();
  r.r10 = p.r10();
  r.r9 = p.r9();
  r.r8 = p.r8();
  r.rax = p.rax();
  r.rcx = p.rcx();
  r.rdx = p.rdx();
  r.rsi = p.rsi();
  r.rdi = p.rdi();
  r.orig_rax = p.orig_rax();
  r.rip = p.rip();
  r.cs = p.cs();
  r.eflags = p.eflags();
  r.rsp = p.rsp();
  r.ss = p.ss();
  r.fs_base = p.fs_base();
  r.gs_base = p.gs_base();
  r.ds = p.ds();
  r.es = p.es();
  r.fs = p.fs();
  r.gs = p.gs();
  return r;
}

// One system call for Restoree::batch().
struct Call {
  long nr;
  std::array<uint64_t, 6> a;
  std::string what;  // for the error message
};

Call make_call(std::string what, long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0,
               uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) {
  return Call{nr, {a1, a2, a3, a4, a5, a6}, std::move(what)};
}

// One thread of the process being built.
struct ThreadCtl {
  TracedThread t;
  pid_t vtid = 0;  // in the process's PID namespace (the image's tid)
  const image::Thread* img = nullptr;
};

// The process under construction. Unless commit() is called, the destructor kills it (and its
// reaper) and reaps everything, so that a failed restore leaves nothing behind.
class Restoree final : public RemoteProcess {
 public:
  Restoree(const RestoreOptions&, const image::Process& proc) : proc_(proc) {}
  ~Restoree() override {
    if (!committed_) destroy();
  }
  Restoree(const Restoree&) = delete;
  Restoree& operator=(const Restoree&) = delete;

  SpawnState& spawn() { return sp_; }
  pid_t pid() const override { return sp_.s.pid; }
  pid_t vpid() const { return sp_.s.vpid; }
  int pidfd() const override { return sp_.s.pidfd.get(); }
  ThreadCtl& leader() { return threads_.front(); }
  std::vector<ThreadCtl>& threads() { return threads_; }
  uint64_t trampoline() const { return tramp_; }

  // Seizes the new process, lets it stop itself and waits for that stop.
  void seize() {
    ThreadCtl c;
    c.t = TracedThread::seize(sp_.s.pid, PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL);
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

  // First system call, before the trampoline exists: single-step a `syscall` of the vdso.
  void map_trampoline(uint64_t addr) {
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
    unsigned char code[kBatchOffset + sizeof kBatchCode] = {0x0f, 0x05, 0xcc};  // syscall; int3
    std::memcpy(code + kBatchOffset, kBatchCode, sizeof kBatchCode);
    remote_write(pid(), addr, code, sizeof code);
    tramp_ = addr;
  }

  // Runs a system call in thread `c` through the trampoline; throws "<what>: <errno>".
  long call(ThreadCtl& c, const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
            uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) {
    if (tramp_ == 0) fail(what, ": no trampoline");
    long r = timed(
        c, [&] { return c.t.syscall(tramp_, InjectMode::kTrapAfter, nr, a1, a2, a3, a4, a5, a6); });
    if (r < 0 && r > -4096) {
      std::string where = &c == &threads_.front() ? std::string() : cat(" in thread ", c.vtid);
      fail_errno_value(static_cast<int>(-r), cat(what, where));
    }
    return r;
  }

  long inject(const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0,
              uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) override {
    return call(leader(), what, nr, a1, a2, a3, a4, a5, a6);
  }

  // The argument arena: put_data() starts it over (arguments of one call); push() appends
  // (arguments of the calls of one batch).
  uint64_t put_data(const void* data, size_t len) override {
    arena_ = 0;
    return push(data, len);
  }
  uint64_t put_string(const std::string& s) { return put_data(s.c_str(), s.size() + 1); }
  void reset_arena() { arena_ = 0; }
  uint64_t push(const void* data, size_t len) {
    if (tramp_ == 0) fail("no trampoline for syscall arguments");
    uint64_t off = (arena_ + 7) & ~uint64_t{7};
    if (len > kTrampolineSize - kDataOffset - off)
      fail(len, " bytes of syscall arguments do not fit the trampoline");
    remote_write(pid(), tramp_ + kDataOffset + off, data, len);
    arena_ = off + len;
    return tramp_ + kDataOffset + off;
  }
  uint64_t push_string(const std::string& s) { return push(s.c_str(), s.size() + 1); }

  // Runs `calls` in order in thread `c` with the batch loop, as many per ptrace round trip as
  // the arena (after what push() put there) holds. Stops at the first failing call and throws
  // "<its what>: <errno>". Returns every result.
  std::vector<long> batch(ThreadCtl& c, const std::vector<Call>& calls) {
    std::vector<long> results;
    results.reserve(calls.size());
    const uint64_t table_off = (arena_ + 63) & ~uint64_t{63};
    if (table_off + kBatchEntry > kTrampolineSize - kDataOffset)
      fail("no room left in the trampoline for a batch of system calls");
    const size_t per_round = (kTrampolineSize - kDataOffset - table_off) / kBatchEntry;
    const uint64_t table = tramp_ + kDataOffset + table_off;
    std::vector<uint64_t> words;
    for (size_t i = 0; i < calls.size();) {
      size_t n = std::min(per_round, calls.size() - i);
      words.assign(n * 8, 0);
      for (size_t k = 0; k < n; k++) {
        const Call& call = calls[i + k];
        words[k * 8] = static_cast<uint64_t>(call.nr);
        for (int j = 0; j < 6; j++) words[k * 8 + 1 + j] = call.a[j];
      }
      remote_write(pid(), table, words.data(), words.size() * 8);
      long done = timed(c, [&] {
        return c.t.syscall(tramp_ + kBatchOffset, InjectMode::kTrapAfter, 0, table, n);
      });
      batches_++;
      batched_ += static_cast<uint64_t>(std::min<long>(done + 1, static_cast<long>(n)));
      if (done < 0 || static_cast<size_t>(done) > n)
        fail("the batch of system calls returned ", done, " for ", n, " calls");
      remote_read(pid(), table, words.data(), words.size() * 8);
      for (size_t k = 0; k < static_cast<size_t>(done); k++)
        results.push_back(static_cast<long>(words[k * 8 + 7]));
      if (static_cast<size_t>(done) < n) {
        long err = static_cast<long>(words[done * 8 + 7]);
        std::string where = &c == &threads_.front() ? std::string() : cat(" in thread ", c.vtid);
        fail_errno_value(static_cast<int>(-err), cat(calls[i + done].what, where));
      }
      i += n;
    }
    return results;
  }
  std::vector<long> batch(const std::vector<Call>& calls) { return batch(leader(), calls); }

  // The last injected call: munmap of the trampoline, single-stepped (its int3 is gone when
  // the call returns).
  void unmap_trampoline() {
    uint64_t t = tramp_;
    long r = timed(leader(), [&] {
      return leader().t.syscall(t, InjectMode::kSingleStep, SYS_munmap, t, kTrampolineSize);
    });
    if (r != 0) fail_errno_value(static_cast<int>(-r), cat("munmap of the trampoline at ", hex(t)));
    tramp_ = 0;
  }

  // Adopts the thread created by the clone3 just injected in the leader and waits for its
  // first stop (before its first instruction).
  ThreadCtl& adopt_new_thread(pid_t vtid, const image::Thread* img) {
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

  // ptrace round trips (single calls and batches)
  uint64_t injected() const { return injected_; }
  // system calls that ran inside the process
  uint64_t target_calls() const { return injected_ - batches_ + batched_; }
  uint64_t inject_ns() const { return inject_ns_; }

  // Everything runs: nothing to kill any more.
  Spawned commit() {
    committed_ = true;
    threads_.clear();
    return std::move(sp_.s);
  }

 private:
  template <typename F>
  long timed(ThreadCtl&, F&& f) {
    uint64_t t0 = now_ns();
    long r = f();
    inject_ns_ += now_ns() - t0;
    injected_++;
    return r;
  }

  // Kills the process (and its namespace) and reaps every task we created or trace. Tasks we
  // trace stay zombies until we wait for them, so each one is waited for.
  void destroy() noexcept {
    try {
      if (sp_.s.pidfd) send_signal_pidfd(sp_.s.pidfd.get(), SIGKILL);
      if (sp_.s.reaper_pidfd) send_signal_pidfd(sp_.s.reaper_pidfd.get(), SIGKILL);
    } catch (const Error& e) {
      log::warn("restore cleanup: ", e.what());
    }
    sp_.go.reset();
    sp_.s.reaper_ctl.reset();
    // Auto-attached threads not adopted yet (a failure right after an injected clone3).
    std::vector<pid_t> unadopted;
    if (!threads_.empty()) unadopted = threads_.front().t.take_new_tasks();
    for (pid_t tid : unadopted) {
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
    // Our child: the process itself, or the reaper.
    pid_t child = sp_.s.reaper > 0 ? sp_.s.reaper : sp_.s.pid;
    if (child > 0) {
      int status;
      while (::waitpid(child, &status, __WALL) < 0 && errno == EINTR) {
      }
    }
  }

  const image::Process& proc_;
  SpawnState sp_;
  std::vector<ThreadCtl> threads_;
  uint64_t tramp_ = 0;
  uint64_t arena_ = 0;
  uint64_t injected_ = 0;
  uint64_t batches_ = 0;
  uint64_t batched_ = 0;
  uint64_t inject_ns_ = 0;
  bool committed_ = false;
};

// Pins the calling thread to the CPU it runs on; puts the old mask back on destruction.
class PinSelf {
 public:
  PinSelf() {
    if (::sched_getaffinity(0, sizeof saved_, &saved_) != 0) fail_errno("sched_getaffinity");
    int cpu = ::sched_getcpu();
    if (cpu < 0) fail_errno("sched_getcpu");
    CPU_ZERO(&pinned_);
    CPU_SET(cpu, &pinned_);
    if (::sched_setaffinity(0, sizeof pinned_, &pinned_) != 0) fail_errno("sched_setaffinity");
    active_ = true;
  }
  ~PinSelf() {
    if (active_) ::sched_setaffinity(0, sizeof saved_, &saved_);
  }
  const cpu_set_t& saved() const { return saved_; }
  const cpu_set_t& pinned() const { return pinned_; }

 private:
  cpu_set_t saved_, pinned_;
  bool active_ = false;
};

// A free address for the trampoline: outside every area of both layouts, with a margin.
uint64_t choose_trampoline(const std::vector<proc::MapsEntry>& now, const image::Process& p) {
  std::vector<std::pair<uint64_t, uint64_t>> used;
  for (const auto& m : now)
    if (m.end <= kTaskSize) used.push_back({m.start, m.end});
  for (const auto& a : p.areas())
    if (a.kind() != MemoryArea::VSYSCALL) used.push_back({a.start(), a.end()});
  std::sort(used.begin(), used.end());
  uint64_t candidate = kSearchFrom;
  for (const auto& [s, e] : used) {
    if (e + kTrampolineMargin <= candidate) continue;
    if (candidate + kTrampolineSize + kTrampolineMargin <= s) return candidate;
    candidate = std::max(candidate, e + kTrampolineMargin);
  }
  if (candidate + kTrampolineSize + kTrampolineMargin <= kTaskSize) return candidate;
  fail("no free address for the trampoline in either address space");
}

// The areas the kernel provides ([vvar], [vvar_vclock], [vdso]); moved as one block.
bool is_vdso_block(const MemoryArea& a) {
  return a.kind() == MemoryArea::VDSO || a.kind() == MemoryArea::VVAR ||
         a.kind() == MemoryArea::VVAR_VCLOCK;
}

std::string area_name(const MemoryArea& a) {
  return cat(hex(a.start()), "-", hex(a.end()), a.name().empty() ? "" : " ", a.name());
}

// The memory step: map every area, let the strategy fill them, set final protections. Every
// step runs as a few batches (one ptrace round trip per batch, not per call).
class AddressSpace {
 public:
  AddressSpace(Restoree& r, const image::Process& p, MemoryStrategy& strategy, int first_free_fd)
      : r_(r), p_(p), strategy_(strategy), first_free_fd_(first_free_fd) {
    for (const auto& a : p_.areas())
      if (!is_vdso_block(a) && a.kind() != MemoryArea::VSYSCALL) areas_.push_back(&a);
    find_split_runs();
  }

  // Protection while shaping: the strategy's, plus read/write for areas that must be touched
  // to stay apart from a neighbour (see find_split_runs()).
  uint32_t shaping_prot(size_t i) const {
    uint32_t prot = strategy_.shaping_prot(*areas_[i]);
    return in_run_[i] ? prot | PROT_READ | PROT_WRITE : prot;
  }

  void map_areas() {
    open_files();
    // Memfds get their size, every area its mapping and, if it had one, its name.
    r_.reset_arena();
    std::vector<Call> calls;
    for (const auto& [key, size] : memfd_sizes_)
      calls.push_back(make_call(cat("ftruncate of ", key), SYS_ftruncate, files_.at(key), size));
    std::vector<size_t> mmap_index;  // calls[] index of each area's mmap
    for (size_t i = 0; i < areas_.size(); i++) {
      const MemoryArea* a = areas_[i];
      mmap_index.push_back(calls.size());
      calls.push_back(mmap_call(*a, shaping_prot(i)));
      if (starts_with(a->name(), "[anon:") && ends_with(a->name(), "]")) {
        uint64_t name = r_.push_string(a->name().substr(6, a->name().size() - 7));
        calls.push_back(make_call(cat("naming area ", area_name(*a)), SYS_prctl, PR_SET_VMA,
                                  PR_SET_VMA_ANON_NAME, a->start(), a->end() - a->start(), name));
      }
      if (marker_[i].set >= 0)
        calls.push_back(make_call(cat("madvise marking area ", area_name(*a)), SYS_madvise,
                                  a->start(), a->end() - a->start(),
                                  static_cast<uint64_t>(marker_[i].set)));
    }
    std::vector<long> res = r_.batch(calls);
    for (size_t i = 0; i < areas_.size(); i++)
      if (static_cast<uint64_t>(res[mmap_index[i]]) != areas_[i]->start())
        fail("mmap of area ", area_name(*areas_[i]), " landed at ",
             hex(static_cast<uint64_t>(res[mmap_index[i]])));
    touch_runs();
    // The descriptors opened for mapping are no longer needed.
    if (!files_.empty())
      r_.inject(cat("close_range(", first_free_fd_, ", ~0) of the mapping descriptors"),
                SYS_close_range, static_cast<uint64_t>(first_free_fd_), ~0u, 0);
    files_.clear();
    for (const MemoryArea* a : areas_) strategy_.prepare_area(r_, *a);
  }

  // Final protections, and the VMA flags that plain mmap does not give, from the image's
  // VmFlags: they change behaviour (fork, core dumps, THP, locking) and keep the kernel from
  // merging areas the original kept apart. mlock comes last, over final pages.
  void protect() {
    struct Advice {
      const char* flag;
      int advice;
    };
    static const Advice kAdvice[] = {{"hg", MADV_HUGEPAGE},   {"nh", MADV_NOHUGEPAGE},
                                     {"dd", MADV_DONTDUMP},   {"dc", MADV_DONTFORK},
                                     {"wf", MADV_WIPEONFORK}, {"sr", MADV_SEQUENTIAL},
                                     {"rr", MADV_RANDOM},     {"mg", MADV_MERGEABLE}};
    std::vector<Call> calls;
    for (size_t i = 0; i < areas_.size(); i++) {
      const MemoryArea* a = areas_[i];
      uint64_t len = a->end() - a->start();
      if (shaping_prot(i) != a->prot())
        calls.push_back(make_call(cat("mprotect of area ", area_name(*a), " to ", a->prot()),
                                  SYS_mprotect, a->start(), len, a->prot()));
      if (marker_[i].clear >= 0)
        calls.push_back(make_call(cat("madvise unmarking area ", area_name(*a)), SYS_madvise,
                                  a->start(), len, static_cast<uint64_t>(marker_[i].clear)));
      std::set<std::string> flags = vmflag_set(*a);
      for (const auto& adv : kAdvice)
        if (flags.count(adv.flag))
          calls.push_back(make_call(cat("madvise(", adv.flag, ") of area ", area_name(*a)),
                                    SYS_madvise, a->start(), len,
                                    static_cast<uint64_t>(adv.advice)));
      if (flags.count("lo") || flags.count("lf"))
        calls.push_back(make_call(cat("mlock2 of area ", area_name(*a)), SYS_mlock2, a->start(),
                                  len, flags.count("lf") ? MLOCK_ONFAULT : 0));
    }
    r_.reset_arena();
    r_.batch(calls);
  }

 private:
  static std::set<std::string> vmflag_set(const MemoryArea& a) {
    std::set<std::string> out;
    std::istringstream in(a.vmflags());
    std::string f;
    while (in >> f) out.insert(f);
    return out;
  }

  // One open per distinct file (and access mode) and one memfd per shared object.
  void open_files() {
    r_.reset_arena();
    std::vector<Call> calls;
    std::vector<std::string> keys;
    for (const MemoryArea* a : areas_) {
      std::string key;
      uint64_t path_addr = 0;
      switch (a->kind()) {
        case MemoryArea::PRIVATE_FILE:
        case MemoryArea::SHARED_FILE: {
          int mode = file_mode(*a);
          key = file_key(a->file().path(), mode);
          if (files_.count(key)) continue;
          path_addr = r_.push_string(a->file().path());
          calls.push_back(make_call(cat("open ", a->file().path()), SYS_openat,
                                    static_cast<uint64_t>(AT_FDCWD), path_addr,
                                    static_cast<uint64_t>(mode | O_CLOEXEC), 0));
          break;
        }
        case MemoryArea::SHARED_ANON: {
          if (!starts_with(a->name(), "/memfd:")) continue;
          key = memfd_key(*a);
          if (files_.count(key)) continue;
          std::string name = a->name().substr(7);
          if (ends_with(name, " (deleted)")) name.resize(name.size() - 10);
          path_addr = r_.push_string(name);
          calls.push_back(
              make_call(cat("memfd_create(", name, ")"), SYS_memfd_create, path_addr, MFD_CLOEXEC));
          memfd_sizes_[key] = a->file().size();
          break;
        }
        default:
          continue;
      }
      files_[key] = 0;
      keys.push_back(key);
    }
    if (calls.empty()) return;
    std::vector<long> fds = r_.batch(calls);
    for (size_t i = 0; i < keys.size(); i++) files_[keys[i]] = static_cast<uint64_t>(fds[i]);
  }

  // Adjacent private areas that the image lists apart although their attributes would let the
  // kernel merge them: the original's kernel kept them apart because each had its own
  // anon_vma (their pages came to be while they were not neighbours). Mapped as they are,
  // the restore would get one merged area. So every other area of such a run is marked with
  // a VMA flag it does not have (MADV_DONTFORK or MADV_DONTDUMP) while pages are faulted in:
  // the kernel then gives each area its own anon_vma (it shares one only between compatible
  // neighbours), and once the marks are cleared, areas with different anon_vmas stay apart.
  // Every area of a run gets a page faulted in (touch_runs()) so that it has an anon_vma.
  void find_split_runs() {
    in_run_.assign(areas_.size(), false);
    marker_.assign(areas_.size(), Marker{});
    bool mark = false;
    for (size_t i = 1; i < areas_.size(); i++) {
      if (!mergeable(*areas_[i - 1], *areas_[i])) {
        mark = false;
        continue;
      }
      in_run_[i - 1] = in_run_[i] = true;
      mark = !mark;
      if (!mark) continue;
      std::set<std::string> flags = vmflag_set(*areas_[i]);
      if (!flags.count("dc"))
        marker_[i] = {MADV_DONTFORK, MADV_DOFORK};
      else if (!flags.count("dd"))
        marker_[i] = {MADV_DONTDUMP, MADV_DODUMP};
      else
        log::info("area ", area_name(*areas_[i]), " may merge with the area before it");
    }
  }

  static bool mergeable(const MemoryArea& a, const MemoryArea& b) {
    if (a.end() != b.start() || a.shared() || b.shared() || a.prot() != b.prot() ||
        a.vmflags() != b.vmflags() || a.growsdown() || b.growsdown() || a.name() != b.name())
      return false;
    auto anon = [](const MemoryArea& m) {
      return m.kind() == MemoryArea::ANON || m.kind() == MemoryArea::HEAP;
    };
    if (anon(a) && anon(b)) return true;
    return a.kind() == MemoryArea::PRIVATE_FILE && b.kind() == MemoryArea::PRIVATE_FILE &&
           a.file().dev() == b.file().dev() && a.file().inode() == b.file().inode() &&
           b.pgoff() == a.pgoff() + (a.end() - a.start());
  }

  // Faults one page into every area of a run (writing what a fresh area reads there: zeros for
  // anonymous memory, the file's bytes for a file) and drops it again with MADV_DONTNEED,
  // which leaves the area's anon_vma in place. The fill comes after.
  void touch_runs() {
    std::vector<Call> calls;
    std::vector<char> page(kPageSize, 0);
    for (size_t i = 0; i < areas_.size(); i++) {
      if (!in_run_[i]) continue;
      const MemoryArea& a = *areas_[i];
      if (a.kind() == MemoryArea::PRIVATE_FILE) {
        remote_read(r_.pid(), a.start(), page.data(), kPageSize);
      } else {
        std::fill(page.begin(), page.end(), 0);
      }
      remote_write(r_.pid(), a.start(), page.data(), kPageSize);
      calls.push_back(make_call(cat("madvise(MADV_DONTNEED) of a page of area ", area_name(a)),
                                SYS_madvise, a.start(), kPageSize, MADV_DONTNEED));
    }
    if (calls.empty()) return;
    r_.reset_arena();
    r_.batch(calls);
  }

  Call mmap_call(const MemoryArea& a, uint32_t prot) {
    uint64_t len = a.end() - a.start();
    uint64_t flags = MAP_FIXED_NOREPLACE | (a.shared() ? MAP_SHARED : MAP_PRIVATE);
    if (a.growsdown()) flags |= MAP_GROWSDOWN;
    if (vmflag_set(a).count("nr")) flags |= MAP_NORESERVE;
    uint64_t fd = static_cast<uint64_t>(-1);
    uint64_t off = 0;
    switch (a.kind()) {
      case MemoryArea::ANON:
      case MemoryArea::HEAP:
      case MemoryArea::STACK:
        flags |= MAP_ANONYMOUS;
        break;
      case MemoryArea::SHARED_ANON:
        if (starts_with(a.name(), "/memfd:")) {
          fd = files_.at(memfd_key(a));
          off = a.pgoff();
        } else {
          flags |= MAP_ANONYMOUS;
        }
        break;
      case MemoryArea::PRIVATE_FILE:
      case MemoryArea::SHARED_FILE:
        fd = files_.at(file_key(a.file().path(), file_mode(a)));
        off = a.pgoff();
        break;
      default:
        fail("area ", area_name(a), ": cannot map kind ", MemoryArea::Kind_Name(a.kind()));
    }
    return make_call(cat("mmap of area ", area_name(a)), SYS_mmap, a.start(), len, prot, flags, fd,
                     off);
  }

  // A private mapping needs read access only; a shared one the access it may use: VM_MAYWRITE
  // ("mw") comes from a descriptor open for writing.
  static int file_mode(const MemoryArea& a) {
    if (a.kind() != MemoryArea::SHARED_FILE) return O_RDONLY;
    bool may_write = a.vmflags().find("mw") != std::string::npos || (a.prot() & PROT_WRITE);
    return may_write ? O_RDWR : O_RDONLY;
  }
  static std::string file_key(const std::string& path, int mode) {
    return cat(mode == O_RDWR ? "rw:" : "ro:", path);
  }
  // Areas of the same memfd share one (the same object mapped twice stays one object).
  static std::string memfd_key(const MemoryArea& a) {
    return cat("memfd:", a.file().dev(), ":", a.file().inode());
  }

  Restoree& r_;
  const image::Process& p_;
  MemoryStrategy& strategy_;
  int first_free_fd_;
  struct Marker {
    int set = -1, clear = -1;  // madvise advice, -1: none
  };
  std::vector<const MemoryArea*> areas_;
  std::vector<bool> in_run_;                     // part of a run of areas that must stay apart
  std::vector<Marker> marker_;                   // the temporary mark of every other area of a run
  std::map<std::string, uint64_t> files_;        // key -> fd in the process
  std::map<std::string, uint64_t> memfd_sizes_;  // memfd key -> size
};

// Per-thread state each thread sets for itself: one batch run in that thread.
void restore_thread_state(Restoree& r, ThreadCtl& c) {
  const image::Thread& th = *c.img;
  r.reset_arena();
  std::vector<Call> calls;
  calls.push_back(make_call("prctl(PR_SET_NAME)", SYS_prctl, PR_SET_NAME,
                            r.push_string(th.comm().substr(0, 15))));
  calls.push_back(make_call("set_tid_address", SYS_set_tid_address, th.clear_child_tid()));
  if (th.robust_list() != 0)
    calls.push_back(make_call(cat("set_robust_list(", hex(th.robust_list()), ")"),
                              SYS_set_robust_list, th.robust_list(), th.robust_list_len()));
  const auto& rs = th.rseq();
  if (rs.rseq_abi_pointer() != 0)
    calls.push_back(make_call(cat("rseq registration at ", hex(rs.rseq_abi_pointer())), SYS_rseq,
                              rs.rseq_abi_pointer(), rs.rseq_abi_size(), 0, rs.signature()));
  const auto& ss = th.sigaltstack();
  if (!(ss.flags() & SS_DISABLE) && ss.sp() != 0) {
    stack_t st;
    std::memset(&st, 0, sizeof st);
    st.ss_sp = reinterpret_cast<void*>(ss.sp());
    st.ss_size = ss.size();
    st.ss_flags = ss.flags() & kSsAutoDisarm;  // SS_ONSTACK is a state, not a setting
    calls.push_back(make_call(cat("sigaltstack(", hex(ss.sp()), ", ", ss.size(), ")"),
                              SYS_sigaltstack, r.push(&st, sizeof st), 0));
  }
  r.batch(c, calls);
}

// Process-wide settings: personality, umask, cwd, dumpable, THP and no_new_privs (the last
// is per thread but inherited: set before any other thread exists).
void restore_process_state(Restoree& r, const image::Process& p) {
  r.reset_arena();
  std::vector<Call> calls;
  calls.push_back(make_call(cat("prctl(PR_SET_DUMPABLE, ", p.dumpable() ? 1 : 0, ")"), SYS_prctl,
                            PR_SET_DUMPABLE, p.dumpable() ? 1 : 0));
  if (p.thp_disable() != 0)
    calls.push_back(make_call("prctl(PR_SET_THP_DISABLE, 1)", SYS_prctl, PR_SET_THP_DISABLE, 1));
  if (p.creds().no_new_privs())
    calls.push_back(make_call("prctl(PR_SET_NO_NEW_PRIVS, 1)", SYS_prctl, PR_SET_NO_NEW_PRIVS, 1));
  unsigned long ours = static_cast<unsigned long>(::personality(0xffffffff));
  if (p.personality() != ours)
    calls.push_back(make_call(cat("personality(", hex(p.personality()), ")"), SYS_personality,
                              p.personality()));
  calls.push_back(make_call(cat("umask(0", std::oct, p.umask(), ")"), SYS_umask, p.umask()));
  calls.push_back(make_call(cat("chdir(", p.cwd(), ")"), SYS_chdir, r.push_string(p.cwd())));
  r.batch(calls);
}

void restore_sigactions(Restoree& r, const image::Process& p) {
  std::vector<uint64_t> table(64 * 4, 0);
  std::vector<int> to_set;
  for (const auto& a : p.sigactions()) {
    uint64_t* k = &table[(a.signo() - 1) * 4];
    k[0] = a.handler();
    k[1] = a.flags();
    k[2] = a.restorer();
    k[3] = a.mask();
    // The new process inherited our actions: only the ones that differ need a call.
    uint64_t mine[4] = {0, 0, 0, 0};
    if (::syscall(SYS_rt_sigaction, a.signo(), nullptr, mine, 8) != 0 ||
        std::memcmp(mine, k, sizeof mine) != 0)
      to_set.push_back(a.signo());
  }
  if (to_set.empty()) return;
  r.reset_arena();
  uint64_t base = r.push(table.data(), table.size() * 8);
  std::vector<Call> calls;
  for (int sig : to_set)
    calls.push_back(make_call(cat("rt_sigaction(", sig, ")"), SYS_rt_sigaction,
                              static_cast<uint64_t>(sig), base + (sig - 1) * kKernelSigactionSize,
                              0, 8));
  r.batch(calls);
}

bool is_tty_target(const image::FileDescriptor& f) {
  return f.kind() == image::FileDescriptor::CHARDEV &&
         (starts_with(f.target(), "/dev/pts/") || starts_with(f.target(), "/dev/tty") ||
          f.target() == "/dev/console");
}

// File descriptors at their numbers with flags and positions, in one batch. With --shell-job,
// fds 0-2 that pointed to a terminal or to something lazycr cannot restore keep lazycr's own
// (inherited). An open takes the lowest free number, which is known here (the process's fd
// table is read first), so each open is followed in the same batch by the dup3 + close that
// moves it where it belongs; the numbers the opens got are checked afterwards.
void restore_fds(Restoree& r, const image::Process& p, bool shell_job) {
  std::map<int, const image::FileDescriptor*> by_fd;
  for (const auto& f : p.fds()) by_fd[f.fd()] = &f;
  std::vector<int> listed = proc::list_fds(r.pid());
  std::set<int> open(listed.begin(), listed.end());
  std::vector<Call> calls;
  if (shell_job) {
    for (int fd = 0; fd <= 2; fd++) {
      auto it = by_fd.find(fd);
      if (it == by_fd.end()) {
        if (open.erase(fd))
          calls.push_back(make_call(cat("close(", fd, ")"), SYS_close, static_cast<uint64_t>(fd)));
        continue;
      }
      const auto& f = *it->second;
      if (f.restorable() && !is_tty_target(f)) continue;  // restored below, over ours
      if (!open.count(fd)) fail("fd ", fd, ": lazycr has no fd ", fd, " to give (--shell-job)");
      // Ours stays; only the close-on-exec flag is the image's.
      calls.push_back(make_call(cat("fcntl(", fd, ", F_SETFD)"), SYS_fcntl,
                                static_cast<uint64_t>(fd), F_SETFD, f.cloexec() ? FD_CLOEXEC : 0));
      by_fd.erase(it);
    }
  }
  r.reset_arena();
  std::vector<std::pair<size_t, int>> opens;  // calls[] index, expected result
  for (const auto& [num, fp] : by_fd) {
    const auto& f = *fp;
    if (!f.restorable()) fail("fd ", num, " (", f.target(), ") cannot be restored");
    std::string path = f.file().path().empty() ? f.target() : f.file().path();
    uint64_t flags = (f.flags() & ~static_cast<uint32_t>(O_CREAT | O_EXCL | O_TRUNC)) | O_NOCTTY |
                     (f.cloexec() ? O_CLOEXEC : 0);
    int lowest = 0;
    while (open.count(lowest)) lowest++;
    opens.push_back({calls.size(), lowest});
    calls.push_back(make_call(cat("open ", path, " for fd ", num), SYS_openat,
                              static_cast<uint64_t>(AT_FDCWD), r.push_string(path), flags, 0));
    open.insert(lowest);
    if (lowest != num) {
      calls.push_back(make_call(cat("dup3(", lowest, ", ", num, ")"), SYS_dup3,
                                static_cast<uint64_t>(lowest), static_cast<uint64_t>(num),
                                f.cloexec() ? O_CLOEXEC : 0));
      calls.push_back(
          make_call(cat("close(", lowest, ")"), SYS_close, static_cast<uint64_t>(lowest)));
      open.erase(lowest);
      open.insert(num);
    }
    if (f.kind() == image::FileDescriptor::REGULAR && f.pos() != 0)
      calls.push_back(make_call(cat("lseek(", num, ", ", f.pos(), ")"), SYS_lseek,
                                static_cast<uint64_t>(num), f.pos(), SEEK_SET));
  }
  if (calls.empty()) return;
  std::vector<long> got = r.batch(calls);
  for (const auto& [index, expected] : opens)
    if (got[index] != expected)
      fail(calls[index].what, " got fd ", got[index], ", expected ", expected,
           " (the process has descriptors lazycr did not expect)");
}

// Session and process group: a session or group leader becomes one again; otherwise (and with
// --shell-job) the process stays in ours.
void restore_session(Restoree& r, const image::Process& p, bool shell_job) {
  if (shell_job) return;
  if (p.sid() == p.pid())
    r.inject("setsid", SYS_setsid);
  else if (p.pgid() == p.pid())
    r.inject("setpgid(0, 0)", SYS_setpgid, 0, 0);
  else
    log::info("pid ", p.pid(), ": process group ", p.pgid(), " and session ", p.sid(),
              " are not restored; it joins lazycr's");
}

// Queues the recorded pending signals from inside the process (see the top of this file): a
// thread's own in that thread, the process's in the leader, each queue in its order.
void restore_pending(Restoree& r, const image::Process& p) {
  for (auto& c : r.threads()) {
    r.reset_arena();
    std::vector<Call> calls;
    for (const auto& s : c.img->pending())
      calls.push_back(make_call(cat("rt_tgsigqueueinfo(", s.signo(), ")"), SYS_rt_tgsigqueueinfo,
                                static_cast<uint64_t>(r.vpid()), static_cast<uint64_t>(c.vtid),
                                static_cast<uint64_t>(s.signo()),
                                r.push(s.siginfo().data(), s.siginfo().size())));
    if (&c == &r.leader())
      for (const auto& s : p.shared_pending())
        calls.push_back(make_call(cat("rt_sigqueueinfo(", s.signo(), ")"), SYS_rt_sigqueueinfo,
                                  static_cast<uint64_t>(r.vpid()), static_cast<uint64_t>(s.signo()),
                                  r.push(s.siginfo().data(), s.siginfo().size())));
    if (!calls.empty()) r.batch(c, calls);
  }
}

void restore_rlimits(Restoree& r, const image::Process& p) {
  for (const auto& l : p.rlimits()) {
    struct rlimit64 lim {
      l.cur(), l.max()
    };
    if (::syscall(SYS_prlimit64, r.pid(), l.resource(), &lim, nullptr) != 0)
      fail_errno("prlimit(", l.resource(), ", ", l.cur(), ", ", l.max(), ")");
  }
}

// The image's credentials, last: once a thread is another user it can no longer do what the
// restore needs (clone3 with set_tid, raising rlimits). Raw syscalls change only the calling
// thread, so each thread does it for itself; threads of one process share the same ones.
void restore_credentials(Restoree& r, const image::Process& p) {
  const auto& c = p.creds();
  if (c.uids_size() != 4 || c.gids_size() != 4) fail("the image's uids/gids are incomplete");
  proc::Status me = proc::read_status(::getpid());
  bool same =
      std::equal(c.uids().begin(), c.uids().end(), me.uids.begin(), me.uids.end()) &&
      std::equal(c.gids().begin(), c.gids().end(), me.gids.begin(), me.gids.end()) &&
      std::equal(c.groups().begin(), c.groups().end(), me.groups.begin(), me.groups.end()) &&
      c.cap_effective() == me.cap_eff && c.cap_permitted() == me.cap_prm &&
      c.cap_inheritable() == me.cap_inh && c.cap_bounding() == me.cap_bnd &&
      c.cap_ambient() == me.cap_amb;
  if (same) return;  // the new process has lazycr's, which are the image's
  int last_cap = std::stoi(proc::read_file("/proc/sys/kernel/cap_last_cap"));
  std::vector<uint32_t> groups(c.groups().begin(), c.groups().end());
  struct {
    uint32_t version = _LINUX_CAPABILITY_VERSION_3;
    int32_t pid = 0;
  } header;
  uint32_t data[6] = {static_cast<uint32_t>(c.cap_effective()),
                      static_cast<uint32_t>(c.cap_permitted()),
                      static_cast<uint32_t>(c.cap_inheritable()),
                      static_cast<uint32_t>(c.cap_effective() >> 32),
                      static_cast<uint32_t>(c.cap_permitted() >> 32),
                      static_cast<uint32_t>(c.cap_inheritable() >> 32)};
  for (auto& t : r.threads()) {
    r.reset_arena();
    uint64_t groups_at = groups.empty() ? 0 : r.push(groups.data(), groups.size() * 4);
    uint64_t header_at = r.push(&header, sizeof header);
    uint64_t data_at = r.push(data, sizeof data);
    // Keep the permitted set across the change of uid; capset then trims it to the image's.
    r.call(t, "prctl(PR_SET_KEEPCAPS, 1)", SYS_prctl, PR_SET_KEEPCAPS, 1);
    for (int cap = 0; cap <= last_cap && cap < 64; cap++)
      if (!(c.cap_bounding() & (uint64_t{1} << cap)))
        r.call(t, cat("prctl(PR_CAPBSET_DROP, ", cap, ")"), SYS_prctl, PR_CAPBSET_DROP,
               static_cast<uint64_t>(cap));
    r.call(t, cat("setgroups(", groups.size(), " groups)"), SYS_setgroups, groups.size(),
           groups_at);
    r.call(t, cat("setresgid(", c.gids(0), ", ", c.gids(1), ", ", c.gids(2), ")"), SYS_setresgid,
           c.gids(0), c.gids(1), c.gids(2));
    r.call(t, cat("setfsgid(", c.gids(3), ")"), SYS_setfsgid, c.gids(3));
    r.call(t, cat("setresuid(", c.uids(0), ", ", c.uids(1), ", ", c.uids(2), ")"), SYS_setresuid,
           c.uids(0), c.uids(1), c.uids(2));
    r.call(t, cat("setfsuid(", c.uids(3), ")"), SYS_setfsuid, c.uids(3));
    r.call(t, "capset", SYS_capset, header_at, data_at);
    for (int cap = 0; cap <= last_cap && cap < 64; cap++)
      if (c.cap_ambient() & (uint64_t{1} << cap))
        r.call(t, cat("prctl(PR_CAP_AMBIENT_RAISE, ", cap, ")"), SYS_prctl, PR_CAP_AMBIENT,
               PR_CAP_AMBIENT_RAISE, static_cast<uint64_t>(cap), 0, 0);
    r.call(t, "prctl(PR_SET_KEEPCAPS, 0)", SYS_prctl, PR_SET_KEEPCAPS, 0);
  }
  // A change of effective ids resets the dumpable flag.
  r.inject(cat("prctl(PR_SET_DUMPABLE, ", p.dumpable() ? 1 : 0, ")"), SYS_prctl, PR_SET_DUMPABLE,
           p.dumpable() ? 1 : 0);
}

void set_mm(Restoree& r, const image::Process& p) {
  const auto& mm = p.mm();
  long exe = r.inject(cat("open ", p.exe().path()), SYS_openat, static_cast<uint64_t>(AT_FDCWD),
                      r.put_string(p.exe().path()), O_RDONLY | O_CLOEXEC, 0);
  struct prctl_mm_map m;
  std::memset(&m, 0, sizeof m);
  m.start_code = mm.start_code();
  m.end_code = mm.end_code();
  m.start_data = mm.start_data();
  m.end_data = mm.end_data();
  m.start_brk = mm.start_brk();
  m.brk = mm.brk();
  m.start_stack = mm.start_stack();
  m.arg_start = mm.arg_start();
  m.arg_end = mm.arg_end();
  m.env_start = mm.env_start();
  m.env_end = mm.env_end();
  m.auxv_size = static_cast<uint32_t>(p.auxv().size());
  m.exe_fd = static_cast<uint32_t>(exe);
  r.reset_arena();
  m.auxv = reinterpret_cast<__u64*>(r.push(p.auxv().data(), p.auxv().size()));
  uint64_t base = r.push(&m, sizeof m);
  r.inject(
      cat("prctl(PR_SET_MM, PR_SET_MM_MAP) with brk ", hex(mm.brk()), ", exe ", p.exe().path()),
      SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, base, sizeof m, 0);
  r.inject("close of the exe descriptor", SYS_close, static_cast<uint64_t>(exe));
}

// The image's rseq_cs word of a thread, from the page store (0 if the page was not stored).
std::optional<uint64_t> image_rseq_cs(const image::PageStoreReader& store, uint64_t rseq_ptr) {
  uint64_t addr = rseq_ptr + 8;
  uint64_t page = addr & ~uint64_t{kPageSize - 1};
  if (addr + 8 > page + kPageSize) return std::nullopt;
  if (!store.find(page)) return std::nullopt;
  std::vector<char> buf(kPageSize);
  store.read(page, 1, buf.data());
  uint64_t v;
  std::memcpy(&v, buf.data() + (addr - page), 8);
  return v;
}

}  // namespace

Restored restore(const RestoreOptions& opts_in) {
  const uint64_t t0 = now_ns();
  RestoreOptions opts = opts_in;
  if (opts.start_ns == 0) opts.start_ns = t0;
  Steps steps(opts.fault_inject);
  std::unique_ptr<image::ImageReader> img;
  steps.run("validate", cat("image ", opts.dir),
            [&] { img = std::make_unique<image::ImageReader>(opts.dir); });
  const image::Process& p = img->processes().front();
  const std::string who = cat("pid ", p.pid());
  steps.run("validate", who, [&] {
    if (opts.lazy.enabled) check_lazy_options(opts.lazy);
    validate_image(*img, opts);
  });
  const image::PageStoreReader& store = img->pages(p.pid());
  const uint64_t t_valid = now_ns();

  // Declared before the process: on failure the process is killed (and reaped) first, then
  // the strategy lets go of its page server, which ends once the process is gone.
  std::unique_ptr<MemoryStrategy> strategy;
  Restoree r(opts, p);
  std::unique_ptr<PinSelf> pin;
  steps.run("create", who, [&] { spawn_process(p.pid(), opts.pidns, r.spawn()); });
  steps.run("seize", who, [&] { r.seize(); });
  steps.run("pin", who, [&] {
    pin = std::make_unique<PinSelf>();
    if (::sched_setaffinity(r.pid(), sizeof(cpu_set_t), &pin->pinned()) != 0)
      fail_errno("sched_setaffinity of pid ", r.pid());
  });
  steps.run("trampoline", who, [&] {
    auto now = proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps")));
    r.map_trampoline(choose_trampoline(now, p));
  });
  steps.run("rseq", who, [&] {
    auto conf = r.leader().t.get_rseq();
    if (conf.rseq_abi_pointer != 0)
      r.inject(cat("rseq unregistration of the inherited area at ", hex(conf.rseq_abi_pointer)),
               SYS_rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, kRseqFlagUnregister,
               conf.signature);
  });
  const int first_free_fd = opts.shell_job ? 3 : 0;
  steps.run("close-fds", who, [&] {
    r.inject(cat("close_range(", first_free_fd, ", ~0)"), SYS_close_range,
             static_cast<uint64_t>(first_free_fd), ~0u, 0);
  });
  steps.run("unmap", who, [&] {
    uint64_t t = r.trampoline();
    r.inject("munmap below the trampoline", SYS_munmap, 0, t);
    r.inject("munmap above the trampoline", SYS_munmap, t + kTrampolineSize,
             kTaskSize - (t + kTrampolineSize));
    for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps"))))
      if (m.start != t && m.path != "[vsyscall]")
        fail("area ", hex(m.start), "-", hex(m.end), " ", m.path, " is still mapped");
  });
  steps.run("vdso", who, [&] {
    uint64_t base = 0;
    for (const auto& a : p.areas())
      if (is_vdso_block(a) && (base == 0 || a.start() < base)) base = a.start();
    if (base == 0) return;  // the image has no vdso: neither will the process
    r.inject(cat("arch_prctl(ARCH_MAP_VDSO_64, ", hex(base), ")"), SYS_arch_prctl, ARCH_MAP_VDSO_64,
             base);
    auto now = proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps")));
    for (const auto& a : p.areas()) {
      if (!is_vdso_block(a)) continue;
      bool found = false;
      for (const auto& m : now)
        found |= m.start == a.start() && m.end == a.end() && m.path == a.name();
      if (!found)
        fail("the kernel's ", a.name(), " did not land at ", hex(a.start()), "-", hex(a.end()));
    }
  });

  strategy = opts.lazy.enabled ? make_lazy_strategy(p, store, opts, pin->saved())
                               : make_eager_filler(store, &pin->saved());
  AddressSpace space(r, p, *strategy, first_free_fd);
  const uint64_t t_mem = now_ns();
  steps.run("map-areas", who, [&] { space.map_areas(); });
  // Lazy: the userfaultfd and the page server come first, so that the server starts up while
  // the rest is filled and shaped.
  steps.run("uffd", who, [&] { strategy->register_lazy(r); });
  steps.run("server", who, [&] { strategy->start_server(r); });
  steps.run("fill", who, [&] { strategy->fill_mapped(r); });
  steps.run("protect", who, [&] { space.protect(); });
  const uint64_t memory_ns = now_ns() - t_mem;
  steps.run("mm", who, [&] { set_mm(r, p); });
  steps.run("after-shaping", who, [&] { strategy->after_shaping(r); });
  steps.run("process-state", who, [&] { restore_process_state(r, p); });
  steps.run("sigactions", who, [&] { restore_sigactions(r, p); });
  steps.run("fds", who, [&] { restore_fds(r, p, opts.shell_job); });
  steps.run("session", who, [&] { restore_session(r, p, opts.shell_job); });
  steps.run("thread-state", cat("tid ", p.pid()), [&] { restore_thread_state(r, r.leader()); });
  for (int i = 1; i < p.threads_size(); i++) {
    const image::Thread& th = p.threads(i);
    steps.run("threads", cat("tid ", th.tid()), [&] {
      abi::clone_args args;
      std::memset(&args, 0, sizeof args);
      args.flags = kThreadFlags;
      args.set_tid_size = 1;
      pid_t tid = th.tid();
      r.reset_arena();
      args.set_tid = r.push(&tid, sizeof tid);
      uint64_t base = r.push(&args, sizeof args);
      long got = r.inject(cat("clone3 of thread ", tid), SYS_clone3, base, sizeof args);
      ThreadCtl& c = r.adopt_new_thread(tid, &th);
      if (got != tid) fail("clone3 created thread ", got, ", not ", tid);
      steps.check("thread-created");
      restore_thread_state(r, c);
    });
  }
  steps.run("signals", who, [&] { restore_pending(r, p); });
  steps.run("rlimits", who, [&] { restore_rlimits(r, p); });
  steps.run("credentials", who, [&] { restore_credentials(r, p); });
  steps.run("unmap-trampoline", who, [&] {
    r.inject("prctl(PR_SET_PDEATHSIG, 0)", SYS_prctl, PR_SET_PDEATHSIG, 0);
    r.unmap_trampoline();
  });
  steps.run("server-ready", who, [&] { strategy->before_release(r); });
  for (auto& c : r.threads()) {
    steps.run("registers", cat("tid ", c.vtid), [&] {
      const image::Thread& th = *c.img;
      if (th.rseq().rseq_abi_pointer() != 0) {
        if (auto cs = image_rseq_cs(store, th.rseq().rseq_abi_pointer()))
          remote_write(r.pid(), th.rseq().rseq_abi_pointer() + 8, &*cs, sizeof *cs);
      }
      if (!th.xsave().empty())
        c.t.set_xstate(std::vector<uint8_t>(th.xsave().begin(), th.xsave().end()));
      c.t.set_regs(to_regs(th.regs()));
      c.t.set_sigmask(th.blocked());
      if (::sched_setaffinity(c.t.tid(), sizeof(cpu_set_t), &pin->saved()) != 0)
        fail_errno("sched_setaffinity of tid ", c.t.tid());
    });
  }
  steps.run("detach", who, [&] {
    // Other threads first, the leader last: the process starts as a whole as far as it can.
    for (size_t i = r.threads().size(); i-- > 0;) r.threads()[i].t.detach();
    if (r.spawn().s.reaper_ctl) {
      char d = 'D';
      if (::write(r.spawn().s.reaper_ctl.get(), &d, 1) != 1)
        fail_errno("telling the reaper the restore is done");
      // Until the reaper has cleared its PR_SET_PDEATHSIG, our exit (--detach) would kill it
      // and the whole namespace with it. It closes its end of the pipe right after: wait for
      // that (POLLERR on the write end).
      pollfd pf{r.spawn().s.reaper_ctl.get(), 0, 0};
      int n;
      do {
        n = ::poll(&pf, 1, 10000);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) fail("the namespace's reaper did not take over within 10 s");
    }
  });

  Restored out;
  out.stats.injected_syscalls = r.target_calls();
  out.stats.round_trips = r.injected();
  out.stats.inject_ns = r.inject_ns();
  out.stats.threads = static_cast<uint64_t>(p.threads_size());
  out.stats.areas = static_cast<uint64_t>(p.areas_size());
  Spawned s = r.commit();
  const uint64_t t_running = now_ns();
  pin.reset();
  strategy->on_running(r);
  ServerHandle server = strategy->take_server();
  auto ms = strategy->stats();
  out.server = server.pid;
  out.server_pidfd = std::move(server.pidfd);
  out.stats.lazy_areas = ms.lazy_areas;
  out.stats.lazy_pages = ms.lazy_pages;
  out.stats.hot_pages = ms.hot_pages;
  out.stats.first_instruction_ns = t_running - opts.start_ns;
  out.pid = s.pid;
  out.image_pid = s.vpid;
  out.reaper = s.reaper;
  out.child = s.reaper > 0 ? s.reaper : s.pid;
  out.pidfd = std::move(s.pidfd);
  out.stats.pages_written = ms.pages_written;
  out.stats.bytes_written = ms.bytes_written;
  out.stats.fill_read_ns = ms.read_ns;
  out.stats.fill_write_ns = ms.write_ns;
  out.stats.validate_ns = t_valid - t0;
  out.stats.memory_ns = memory_ns;
  out.stats.total_ns = t_running - t0;
  return out;
}

int wait_for_server(Restored& restored) {
  if (restored.server <= 0) return 0;
  int status = 0;
  while (::waitpid(restored.server, &status, 0) < 0) {
    if (errno != EINTR) fail_errno("waitpid for the page server (pid ", restored.server, ")");
  }
  restored.server = 0;
  restored.server_pidfd.reset();
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1;
}

int wait_for_exit(Restored& restored) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaddset(&set, sig);
  sigset_t old;
  if (::sigprocmask(SIG_BLOCK, &set, &old) != 0) fail_errno("sigprocmask");
  for (;;) {
    int status = 0;
    pid_t w = ::waitpid(restored.child, &status, WNOHANG);
    if (w == restored.child) {
      ::sigprocmask(SIG_SETMASK, &old, nullptr);
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      continue;
    }
    if (w < 0 && errno != EINTR) fail_errno("waitpid for pid ", restored.child);
    siginfo_t si;
    timespec ts{1, 0};  // SIGCHLD may have come before the mask: look again now and then
    int sig = ::sigtimedwait(&set, &si, &ts);
    if (sig <= 0 || sig == SIGCHLD) continue;
    // From kill(2) (si_code <= 0), not from the terminal, which signals the whole group.
    if (si.si_code <= 0 && restored.pidfd) send_signal_pidfd(restored.pidfd.get(), sig);
  }
}

}  // namespace lazycr::restore
