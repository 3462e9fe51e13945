// Internal to checkpoint/: the tree being dumped, every thread of every process seized and
// stopped before any state is read. Destroying it undoes everything done to the tree (scratch
// pages, then detach), so a failed dump leaves every process as it was.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "common/syscall_batch.h"

namespace lazycr::checkpoint {

// One live process: every thread seized and stopped.
class FrozenProcess {
 public:
  // Opens a pidfd; throws (errno ESRCH) if the process is gone.
  explicit FrozenProcess(pid_t pid);
  ~FrozenProcess();
  FrozenProcess(const FrozenProcess&) = delete;
  FrozenProcess& operator=(const FrozenProcess&) = delete;

  // Seizes and stops every thread; re-lists until no new thread shows up.
  void freeze();
  // One more listing: seizes threads that appeared since; true if there were any.
  bool seize_new_threads();

  pid_t pid() const { return pid_; }
  int pidfd() const { return pidfd_.get(); }
  uint64_t frozen_at() const { return frozen_at_; }
  // The signal of the group-stop (a stopped job) the process was in when it was seized; 0 if
  // it was running.
  int stop_signo() const { return stop_signo_; }
  std::vector<TracedThread>& threads() { return threads_; }
  TracedThread& leader() { return threads_[0]; }

  // Runs a syscall inside thread t; throws with the syscall's name on failure, and Interrupted
  // (before injecting anything) if a termination signal is pending.
  long call(TracedThread& t, const char* what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
            uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);
  // A page inside the target for results of injected calls, mapped with the batch area after
  // it (try_batch) where an executable page can be mapped. MAP_SHARED so that it can never
  // merge with a neighbouring private area.
  uint64_t scratch();
  // Runs `calls` in thread t, many per round trip (common/syscall_batch.h), with the loop in a
  // batch area mapped beside the scratch page and released with it. Returns the results (the
  // failed call's last, if one failed), or nullopt, having run nothing, where no executable
  // page can be mapped (memory-deny-write-execute, SELinux): the caller makes the calls one
  // by one then.
  std::optional<std::vector<long>> try_batch(TracedThread& t, std::span<const BatchCall> calls);
  // Runs `calls` in thread t in one round trip (try_batch), or one by one where no batch area
  // can be mapped; throws naming `what` and the failed call's index if one fails. Returns each
  // call's result.
  std::vector<long> run_calls(TracedThread& t, const char* what, std::span<const BatchCall> calls);
  void release_scratch();
  // Live dump (checkpoint/twin.h): injects into the leader a clone that shares the descriptor
  // table, not the memory, sends no signal at exit (exit_signal 0) and is auto-attached: the
  // child is stopped before it runs anything, at a stub whose next instructions are
  // exit_group(0), so that if lazycr dies it exits instead of running the program.
  // Returns the twin's pid in lazycr's namespace and in the process's, or nullopt with
  // `why_not` (no executable page can be mapped, clone refused).
  struct TwinIds {
    pid_t pid;
    pid_t ns_pid;
  };
  std::optional<TwinIds> clone_twin(std::string& why_not);
  // Runs wait4(ns_pid, NULL, __WCLONE | WNOHANG) in the leader (reaps an exited twin).
  long reap_child(pid_t ns_pid);
  uint64_t injected() const;
  // How long the scratch page has been mapped in all (ns): the time a SIGKILLed lazycr would
  // leave a stray mapping behind (README).
  uint64_t scratch_ns() const { return scratch_ns_; }

  // SIGKILL through the pidfd (the process must not run on past the image).
  void send_kill();
  // Collects the exit of every traced thread after send_kill(), then waits for the pidfd.
  void wait_killed();
  void detach_all();

 private:
  // call() without the safe point, for the rollback.
  long call_now(TracedThread& t, const char* what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
                uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);
  // Maps the batch area if it is not (with the scratch page); false if it cannot be.
  bool map_batch_area();

  pid_t pid_;
  UniqueFd pidfd_;
  std::vector<TracedThread> threads_;
  std::set<pid_t> seen_;
  uint64_t insn_ = 0;
  uint64_t scratch_ = 0;
  uint64_t batch_area_ = 0;
  bool no_batch_area_ = false;
  uint64_t scratch_since_ = 0;
  uint64_t scratch_ns_ = 0;
  uint64_t frozen_at_ = 0;
  int stop_signo_ = 0;
};

// A process of the tree: live and frozen, or a zombie (recorded, never seized).
struct TreeNode {
  pid_t pid = 0;
  pid_t parent = 0;             // the process of the tree it was found under (0: the root)
  std::vector<pid_t> children;  // in the order found
  std::unique_ptr<FrozenProcess> frozen;  // null for a zombie
  proc::Stat zombie_stat;                 // for a zombie: its /proc/PID/stat
  bool zombie() const { return frozen == nullptr; }
};

class FrozenTree {
 public:
  FrozenTree() = default;
  ~FrozenTree();
  FrozenTree(const FrozenTree&) = delete;
  FrozenTree& operator=(const FrozenTree&) = delete;

  // Seizes `root` and every process below it, then re-scans threads and children until
  // nothing new appears. Children that exit while being seized are recorded as zombies,
  // those already reaped are forgotten. Throws, with every seized process released, on
  // anything that cannot be dumped (lazycr itself in the tree, a task traced by someone
  // else, a nested PID namespace, memory or descriptor tables shared between processes).
  void freeze(pid_t root);

  // Every process, root first, parents before children (depth-first preorder).
  const std::vector<pid_t>& preorder() const { return preorder_; }
  TreeNode& node(pid_t pid) { return nodes_.at(pid); }
  const TreeNode& node(pid_t pid) const { return nodes_.at(pid); }
  size_t live_count() const;
  uint64_t frozen_at() const { return frozen_at_; }

  // Lets every process go on. Processes that were stopped (group-stop) stay stopped.
  void detach_all();
  // Kills every process (after a complete image): SIGKILL to all, then collects the exits.
  void kill_all();

 private:
  void add_child(pid_t parent, pid_t child);
  void check_shared_tables(pid_t parent, pid_t child);

  pid_t root_ = 0;
  std::string root_pidns_;
  std::map<pid_t, TreeNode> nodes_;
  std::vector<pid_t> found_;  // in discovery order
  std::vector<pid_t> preorder_;
  uint64_t frozen_at_ = 0;
};

// "pid N (comm)" for messages.
std::string describe_pid(pid_t pid);

}  // namespace lazycr::checkpoint
