// A stopped process as the kernel-object units (objects/) see it, on either side: the dump
// drives a frozen original (checkpoint/), the restore a process under construction (restore/).
// Both sides implement this narrow interface; the units never call ptrace themselves.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/syscall_batch.h"

namespace lazycr::objects {

class RemoteProcess {
 public:
  virtual ~RemoteProcess() = default;
  // The process as lazycr sees it (for /proc and messages).
  virtual pid_t pid() const = 0;
  // Threads that exist now, the leader first: index 0 .. thread_count() - 1.
  virtual size_t thread_count() const = 0;
  // A thread's id as lazycr sees it, and as the image knows it (equal at dump; they differ
  // in a restore into a new PID namespace).
  virtual pid_t tid(size_t thread) const = 0;
  virtual pid_t image_tid(size_t thread) const = 0;
  // The stopped thread itself, for reads only ptrace can do (common/ptrace.h).
  virtual TracedThread& traced(size_t thread) = 0;
  // From now on the thread's system calls, injected or not, bypass its seccomp filters until
  // it is detached (PTRACE_O_SUSPEND_SECCOMP added to the options it was seized with).
  virtual void suspend_seccomp(size_t thread) = 0;
  // Runs one system call in the thread; returns its result, or throws naming `what` and the
  // errno (Error::sys_errno()).
  virtual long call(size_t thread, const std::string& what, long nr, uint64_t a1 = 0,
                    uint64_t a2 = 0, uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0,
                    uint64_t a6 = 0) = 0;
  // Runs `calls` in order in the thread, in one round trip where the side can (the dump's
  // batch area); returns their results, or throws naming `what` at the first that fails.
  virtual std::vector<long> calls(size_t thread, const std::string& what,
                                  std::span<const BatchCall> calls) {
    std::vector<long> results;
    for (const BatchCall& c : calls)
      results.push_back(call(thread, what, c.nr, c.a[0], c.a[1], c.a[2], c.a[3], c.a[4], c.a[5]));
    return results;
  }
  // Writes `len` bytes (at most 64 KiB) at the start of a scratch buffer inside the process
  // and returns their address, the same on every call: what an earlier put() wrote is gone.
  virtual uint64_t put(const void* data, size_t len) = 0;
  // Reads the process's memory.
  virtual void read(uint64_t addr, void* buf, size_t len) = 0;
};

}  // namespace lazycr::objects
