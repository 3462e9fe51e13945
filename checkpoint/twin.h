// Internal to checkpoint/: a live dump's copy-on-write twin of a frozen process. While the tree
// is frozen, an injected clone (checkpoint/frozen.h clone_twin) gives each process a child with
// a copy-on-write copy of its memory, held stopped by lazycr before it runs anything; the tree
// then runs on while the pages are read from the twin at the same addresses, as they were at
// the freeze. The twin shares the descriptor table (no extra reference to any pipe or socket)
// and sends no signal when it exits; ending it has its parent reap it (an injected
// wait4(__WCLONE)), so the program never sees it.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "checkpoint/frozen.h"
#include "common/ptrace.h"
#include "image-format/process.pb.h"

namespace lazycr::checkpoint {

class Twin {
 public:
  // `fp` frozen, its scratch page released by the caller afterwards. nullptr with `why_not`
  // where no twin can be made (the caller copies while frozen instead).
  static std::unique_ptr<Twin> make(FrozenProcess& fp, std::string& why_not);
  ~Twin();
  Twin(const Twin&) = delete;
  Twin& operator=(const Twin&) = delete;

  // Where to read the process's memory as it was at the freeze (lazycr's pid namespace).
  pid_t pid() const { return ids_.pid; }
  // The tree has been let go: ending the twin seizes one thread of its parent for a moment.
  void tree_released() { frozen_ = nullptr; }
  // SIGKILLs the twin once nothing more is read from it: its exit (the teardown of an address
  // space as large as the process's) then overlaps what the dump still does. Never throws.
  void kill();
  // Kills the twin if it is not, collects its exit and has its parent reap it; logs (never
  // throws) what could not be done.
  void end();
  pid_t parent() const { return parent_; }
  pid_t ns_pid() const { return ids_.ns_pid; }

 private:
  Twin(pid_t parent, FrozenProcess* frozen, FrozenProcess::TwinIds ids, TracedThread thread)
      : parent_(parent), frozen_(frozen), ids_(ids), thread_(std::move(thread)) {}

  pid_t parent_;
  FrozenProcess* frozen_;  // while the tree is frozen
  FrozenProcess::TwinIds ids_;
  TracedThread thread_;
  bool killed_ = false;
  bool ended_ = false;
};

// A SIGKILLed lazycr leaves no twin: its tracees are let go, and a twin let go exits at once
// (its next instruction is exit_group), but stays a zombie only its parent may reap. The
// watchdog, a child of lazycr that does nothing else, waits for lazycr's death
// (PR_SET_PDEATHSIG) and then has the parent of each twin it was told of reap it. Made before
// the tree is frozen (forking lazycr is not free), told of each twin as it is made (a pipe).
// Stopped (SIGKILL, reaped) when destroyed.
class TwinWatchdog {
 public:
  TwinWatchdog();
  ~TwinWatchdog();
  TwinWatchdog(const TwinWatchdog&) = delete;
  TwinWatchdog& operator=(const TwinWatchdog&) = delete;
  // Before the tree can run again with the twin (a dead lazycr lets it go).
  void watch(const Twin& twin);

 private:
  pid_t pid_ = -1;
  int to_watchdog_ = -1;
};

// Memory areas a twin cannot stand in for: registered with a userfaultfd (a fork would send
// the program a fork event, or leave the twin without the registration). "" if none.
std::string twin_refusal(const std::vector<image::MemoryArea>& areas);

}  // namespace lazycr::checkpoint
