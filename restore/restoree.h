// The process under construction: a new process (or a child forked by its parent) driven by
// system calls injected through a small trampoline page (`syscall; int3`, plus a batch loop
// that runs a table of calls per ptrace round trip). Internal to restore/.
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "image-format/image_dir.h"
#include "image-format/process.pb.h"
#include "objects/remote.h"
#include "restore/calls.h"
#include "restore/internal.h"
#include "restore/memory.h"

namespace lazycr::restore {

inline constexpr uint64_t kTaskSize = image::kUserSpaceEnd - image::kPageSize;  // x86_64 TASK_SIZE
// The trampoline mapping: code in its first page, then an arena for syscall arguments and
// batch tables.
inline constexpr uint64_t kTrampolineSize = 1ull << 20;
// Forked children and new threads inherit them (auto-attach).
inline constexpr unsigned long kSeizeOptions =
    PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_EXITKILL;

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
  explicit Restoree(const image::Process& proc) : proc_(proc) {}
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

  // Seizes the new process, lets it stop itself and waits for that stop. Forks it is made to
  // do (children of a tree) are auto-attached with the same options.
  void seize();

  // Makes this process fork the child `child` (its image pid `vpid`) with clone3(set_tid):
  // the child is auto-attached (PTRACE_O_TRACEFORK), starts as a copy of this process with
  // the trampoline at the same place, and is driven from its first stop.
  void fork_child(pid_t vpid, Restoree& child);

  // The other side of fork_child(): takes the auto-attached child and waits for its first stop.
  void adopt_forked(pid_t real_pid, pid_t vpid, uint64_t tramp);

  // A zombie of the image: the process ends now the way the original had ended (exit code or
  // signal), untraced, so that its parent finds it as a zombie with that wait status. The exit
  // runs from the trampoline's `syscall` once detached; waits until it is gone.
  void exit_as_zombie(int wait_status);

  // A zombie made by exit_as_zombie() whose parent was killed (the restore failed) is
  // lazycr's child by now (subreaper): reaped here.
  void reap_zombie() noexcept;

  // First system call, before the trampoline exists: single-step a `syscall` of the vdso.
  void map_trampoline(uint64_t addr);

  // Runs a system call in thread `c` through the trampoline; throws "<what>: <errno>".
  long call(ThreadCtl& c, const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
            uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);

  long inject(const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0,
              uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) override;

  // The argument arena: put_data() starts it over (arguments of one call); push() appends
  // (arguments of the calls of one batch).
  uint64_t put_data(const void* data, size_t len) override;
  uint64_t put_string(const std::string& s) { return put_data(s.c_str(), s.size() + 1); }
  void reset_arena() override { arena_ = 0; }
  uint64_t push(const void* data, size_t len) override;
  uint64_t push_string(const std::string& s) { return push(s.c_str(), s.size() + 1); }

  // Runs `calls` in order in thread `c` with the batch loop, as many per ptrace round trip as
  // the arena (after what push() put there) holds. Stops at the first failing call and throws
  // "<its what>: <errno>". Returns every result.
  std::vector<long> batch(ThreadCtl& c, const std::vector<Call>& calls);
  std::vector<long> batch(const std::vector<Call>& calls) override;

  // The last injected call: munmap of the trampoline, single-stepped (its int3 is gone when
  // the call returns).
  void unmap_trampoline();

  // Adopts the thread created by the clone3 just injected in the leader and waits for its
  // first stop (before its first instruction).
  ThreadCtl& adopt_new_thread(pid_t vtid, const image::Thread* img);

  // ptrace round trips (single calls and batches)
  uint64_t injected() const { return injected_; }
  // system calls that ran inside the process
  uint64_t target_calls() const { return injected_ - batches_ + batched_; }
  uint64_t inject_ns() const { return inject_ns_; }

  // Everything runs: nothing to kill any more.
  Spawned commit();

  // Kills the process (and its namespace); destroy() reaps it. A tree kills every process
  // before it reaps any (see Tree).
  void kill() noexcept;

  // Runs a system call in the leader and returns its raw result (-errno on failure).
  long inject_raw(long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0, uint64_t a4 = 0);

  // Waits for every traced thread of the killed process to exit (tasks we trace stay until we
  // wait for them). Before any wait for the namespace's reaper: it cannot finish while a
  // process of its namespace waits for its tracer.
  void reap_traced() noexcept;

 private:
  // Kills the process (and its namespace) and reaps every task we created or trace. Tasks we
  // trace stay zombies until we wait for them, so each one is waited for.
  void destroy() noexcept;
  // Runs f (one ptrace round trip) and counts it.
  template <typename F>
  long timed(ThreadCtl& c, F&& f);

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
  bool exited_ = false;  // exit_as_zombie() ran
};

// The process under construction as the kernel-object units see it (objects/remote.h).
class RestoreeRemote final : public objects::RemoteProcess {
 public:
  explicit RestoreeRemote(Restoree& r) : r_(r) {}
  pid_t pid() const override { return r_.pid(); }
  size_t thread_count() const override { return r_.threads().size(); }
  pid_t tid(size_t i) const override { return r_.threads().at(i).t.tid(); }
  pid_t image_tid(size_t i) const override { return r_.threads().at(i).vtid; }
  TracedThread& traced(size_t i) override { return r_.threads().at(i).t; }
  void suspend_seccomp(size_t i) override {
    traced(i).set_options(kSeizeOptions | PTRACE_O_SUSPEND_SECCOMP);
  }
  long call(size_t i, const std::string& what, long nr, uint64_t a1, uint64_t a2, uint64_t a3,
            uint64_t a4, uint64_t a5, uint64_t a6) override {
    return r_.call(r_.threads().at(i), what, nr, a1, a2, a3, a4, a5, a6);
  }
  uint64_t put(const void* data, size_t len) override { return r_.put_data(data, len); }
  void read(uint64_t addr, void* buf, size_t len) override {
    remote_read(r_.pid(), addr, buf, len);
  }

 private:
  Restoree& r_;
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

// A free address for the trampoline: outside every area of lazycr's layout (the new root is a
// copy of it) and of every process of the image (children inherit the trampoline), with a
// margin.
uint64_t choose_trampoline(const std::vector<proc::MapsEntry>& now,
                           const std::vector<image::Process>& procs);

}  // namespace lazycr::restore
