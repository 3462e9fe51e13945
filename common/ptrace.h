// Remote control of another process's threads. This is the only code in lazycr that calls
// ptrace(2); everything else goes through TracedThread.
#pragma once

#include <signal.h>
#include <sys/types.h>
#include <sys/user.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/linux_abi.h"

namespace lazycr {

using Regs = user_regs_struct;

// How an injected syscall returns control to us.
enum class InjectMode {
  kSingleStep,  // the address holds `syscall` only (e.g. found in the vdso): single-step it
  kTrapAfter,   // the address holds `syscall; int3` (restore trampoline): PTRACE_CONT to the int3
};

// What kind of stop a thread is in after wait_stop().
enum class StopKind { kEventStop, kSignalStop, kSyscallTrap, kCloneEvent, kExited };

struct StopInfo {
  StopKind kind;
  int signo = 0;        // signal for kSignalStop
  int exit_status = 0;  // wait status for kExited
  unsigned long event_msg = 0;  // for kCloneEvent: the new thread's tid
};

// One ptrace-attached thread. Moves only; the destructor detaches if still attached
// (without touching registers: callers restore what they changed first).
class TracedThread {
 public:
  TracedThread() = default;
  // PTRACE_SEIZE with `options` (PTRACE_O_*). Errors name the tid: ESRCH (gone),
  // EPERM (already traced / not permitted).
  static TracedThread seize(pid_t tid, unsigned long options = 0);
  // Adopts a thread that is already attached (e.g. auto-attached through PTRACE_O_TRACECLONE).
  static TracedThread adopt(pid_t tid);
  TracedThread(TracedThread&& o) noexcept;
  TracedThread& operator=(TracedThread&& o) noexcept;
  TracedThread(const TracedThread&) = delete;
  TracedThread& operator=(const TracedThread&) = delete;
  ~TracedThread();

  pid_t tid() const { return tid_; }
  bool attached() const { return tid_ > 0; }

  // PTRACE_INTERRUPT then waits until the thread is in a ptrace stop where its registers can
  // be read and changed. A signal-delivery stop met on the way is given back (resumed with
  // that signal, then interrupted again) so that no signal is lost or swallowed. Throws if the
  // thread exits meanwhile.
  void interrupt_and_wait();
  // Waits for the next stop of this thread (__WALL).
  StopInfo wait_stop();
  void cont(int sig = 0);
  void detach();

  Regs get_regs() const;
  void set_regs(const Regs& regs);
  // NT_X86_XSTATE; the size is whatever the kernel returns (read it, do not assume it).
  std::vector<uint8_t> get_xstate() const;
  void set_xstate(const std::vector<uint8_t>& xstate);
  uint64_t get_sigmask() const;
  void set_sigmask(uint64_t mask);
  abi::ptrace_rseq_configuration get_rseq() const;
  // PTRACE_PEEKSIGINFO: queued signals of this thread (shared = false) or of its process.
  std::vector<siginfo_t> peek_siginfo(bool shared) const;
  unsigned long get_event_msg() const;

  // Runs one system call inside the stopped thread: saves registers and sigmask, blocks every
  // signal, sets rax = nr, args, rip = insn, orig_rax = -1, resumes per `mode`, waits for the
  // trap, reads rax, restores registers and sigmask. Returns the raw return value
  // (-errno on failure). Throws only if the thread cannot be driven (gone, unexpected stop).
  long syscall(uint64_t insn, InjectMode mode, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
               uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);
  // Number of syscalls injected through this object (for stats).
  uint64_t injected_syscalls() const { return injected_; }

 private:
  explicit TracedThread(pid_t tid) : tid_(tid) {}
  pid_t tid_ = -1;
  uint64_t injected_ = 0;
};

// Reads/writes another process's memory. read/write use process_vm_readv/writev (they honour
// protections); poke uses /proc/PID/mem (a tracer may write read-only pages).
void remote_read(pid_t pid, uint64_t addr, void* buf, size_t len);
void remote_write(pid_t pid, uint64_t addr, const void* buf, size_t len);
void remote_poke(pid_t pid, uint64_t addr, const void* buf, size_t len);

// Syscall restart fix-up for a thread interrupted in a syscall (DESIGN.md section 4).
// Returns true if it changed regs.
bool fixup_interrupted_syscall(Regs& regs);

}  // namespace lazycr

namespace lazycr {
// Address of a `syscall` instruction (0f 05) inside the [vdso] of `pid`, for InjectMode::kSingleStep.
// Throws if the process has no vdso or none is found.
uint64_t find_vdso_syscall_insn(pid_t pid);
}  // namespace lazycr
