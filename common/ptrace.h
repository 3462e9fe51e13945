// Remote control of another process's threads. This is the only code in lazycr that calls
// ptrace(2); everything else goes through TracedThread.
#pragma once

#include <linux/filter.h>
#include <signal.h>
#include <sys/ptrace.h>  // before linux_abi.h: glibc declares PTRACE_* as enumerators
#include <sys/types.h>
#include <sys/user.h>

#include <cstdint>
#include <functional>
#include <optional>
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
enum class StopKind {
  kEventStop,    // PTRACE_EVENT_STOP: after PTRACE_INTERRUPT (signo SIGTRAP) or a group-stop
                 // (signo SIGSTOP/SIGTSTP/SIGTTIN/SIGTTOU)
  kSignalStop,   // signal-delivery-stop: signo is about to be delivered unless suppressed
  kSyscallTrap,  // syscall-enter/exit-stop (PTRACE_O_TRACESYSGOOD: WSTOPSIG == SIGTRAP|0x80)
  kCloneEvent,   // PTRACE_EVENT_CLONE/FORK/VFORK: event_msg is the new task's tid
  kOtherEvent,   // any other PTRACE_EVENT_* (EXEC, EXIT, VFORK_DONE, SECCOMP): see `event`
  kExited,       // the thread is gone (WIFEXITED / WIFSIGNALED); no longer attached
};

struct StopInfo {
  StopKind kind = StopKind::kExited;
  int signo = 0;                // kSignalStop: the signal; kEventStop: WSTOPSIG
  int exit_status = 0;          // wait status for kExited
  int event = 0;                // PTRACE_EVENT_* for kCloneEvent/kOtherEvent/kEventStop
  unsigned long event_msg = 0;  // kCloneEvent: the new task's tid; kOtherEvent: PTRACE_GETEVENTMSG
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
  bool attached() const { return attached_; }

  // PTRACE_INTERRUPT then waits until the thread is in a ptrace stop where its registers can
  // be read and changed (PTRACE_EVENT_STOP, which includes a group-stop). The thread must be
  // running (not in a stop already reported by wait_stop()). A signal-delivery stop met on the
  // way is given back (resumed with that signal, then interrupted again) so that no signal is
  // lost or swallowed; clone/fork/other event stops and syscall traps met on the way are
  // resumed too (clone children are kept for take_new_tasks()). Throws if the thread exits
  // meanwhile or does not settle within 64 rounds.
  // Kernel rule: an INTERRUPT that lands while the thread is already trapped is kept for the
  // next resume, so one extra kEventStop (signo SIGTRAP) may follow a later cont(); syscall()
  // and detach() absorb it, wait_stop() users should treat a kEventStop as spurious.
  // Returns the stop's signal: SIGTRAP for the interrupt itself, or the signal of a group-stop
  // the thread was in (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU: a stopped job).
  int interrupt_and_wait();
  // PTRACE_INTERRUPT without waiting; the next interrupt_and_wait() (or _for) waits for it
  // instead of sending another: several threads asked first then stop together. A failed
  // request is left for that wait to send again and report.
  void send_interrupt();
  // The same, giving up after `timeout_ms` (a thread in an uninterruptible sleep): false then,
  // with the thread still attached and the interrupt pending (abandon() it).
  bool interrupt_and_wait_for(int timeout_ms);
  // Forgets the thread without detaching it: the kernel ends the link, and drops a pending
  // interrupt, when this process exits. For a thread that would not stop.
  void abandon() { attached_ = false; }
  // Waits for the next stop of this thread (__WALL), retrying on EINTR.
  StopInfo wait_stop();
  // PTRACE_CONT, delivering `sig` (0: none, or suppress the signal of a signal-delivery-stop).
  void cont(int sig = 0);
  // PTRACE_DETACH. A thread that is running is interrupted first (the kernel refuses to detach
  // a running tracee); a signal met in a signal-delivery-stop on the way is passed on. A gone
  // or dead (zombie) thread counts as detached and is never waited for blockingly: a traced
  // zombie is collected if it can be at once (which hands it to its parent); a killed leader
  // whose other threads are not reaped yet stays linked until they are or until we exit.
  void detach();
  // Tids announced by clone/fork/vfork event stops that interrupt_and_wait() or syscall()
  // consumed (e.g. an injected clone under PTRACE_O_TRACECLONE); they are auto-attached and
  // the caller adopt()s them. Clears the list.
  std::vector<pid_t> take_new_tasks();

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
  // PTRACE_SETOPTIONS: replaces the options given at seize (e.g. to add
  // PTRACE_O_SUSPEND_SECCOMP once the thread is known to have seccomp state, so that injected
  // calls bypass its filters; the option needs CAP_SYS_ADMIN and an unfiltered tracer).
  void set_options(unsigned long options);
  // PTRACE_SECCOMP_GET_FILTER: the classic BPF program of the thread's seccomp filter number
  // `index`, counting from the oldest (0: the first installed, as get_nth_filter() counts);
  // nullopt past the newest.
  std::optional<std::vector<sock_filter>> seccomp_filter(unsigned index) const;
  // PTRACE_GET_SECCOMP_METADATA: the flags the kernel keeps for filter `index`
  // (SECCOMP_FILTER_FLAG_LOG is the only one it reports).
  uint64_t seccomp_filter_flags(unsigned index) const;

  // Runs one system call inside the stopped thread: saves registers and sigmask, blocks every
  // signal, sets rax = nr, args, rip = insn, orig_rax = -1, resumes per `mode`, waits for the
  // trap, reads rax, restores registers and sigmask. Returns the raw return value
  // (-errno on failure). Throws only if the thread cannot be driven (gone, unexpected stop).
  // Details (see ptrace.cc): "every signal" leaves SIGTRAP, SIGSEGV, SIGBUS, SIGILL, SIGFPE and
  // SIGSYS unblocked, because the kernel resets the handler of a blocked signal it forces (the
  // single-step/int3 trap, a fault, a seccomp SIGSYS). An asynchronous signal dequeued during
  // the call (SIGSTOP, or one of those six sent by kill) is suppressed and re-sent with
  // tgkill/kill after registers are restored, so it stays pending. A fault or SIGSYS caused by
  // the injected call itself throws (targets with seccomp filters: seize with
  // PTRACE_O_SUSPEND_SECCOMP). Call it from an event stop (interrupt_and_wait()) or a previous
  // syscall(), not from a signal-delivery-stop: resuming with signal 0 would drop that signal.
  // The clone event of an injected clone/fork is kept for take_new_tasks(). In kTrapAfter mode
  // a call must not unmap or change its own trampoline (the int3 must still be there when it
  // returns); munmap the trampoline with kSingleStep on its `syscall` instead, which traps at
  // the syscall exit before anything else is fetched.
  long syscall(uint64_t insn, InjectMode mode, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
               uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);
  // As syscall() in kTrapAfter mode, for code at `insn` that reaches its int3 further on:
  // the call is done when the thread traps with rip == trap_rip (just past that int3). For a
  // stub that sends the child of an injected clone down another path than the caller's.
  long syscall_trap_at(uint64_t insn, uint64_t trap_rip, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
                       uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0);
  // Number of syscalls injected through this object (for stats).
  uint64_t injected_syscalls() const { return injected_; }

 private:
  explicit TracedThread(pid_t tid) : tid_(tid), attached_(tid > 0) {}
  void resume(int request, int sig, const char* why);
  // waitpid(__WALL) for this thread; without `block`, nullopt when it has nothing to report.
  std::optional<StopInfo> poll_stop(bool block);
  // interrupt_and_wait() until `deadline_ns` (now_ns() clock; < 0: no deadline).
  bool interrupt_until(int64_t deadline_ns);
  // If the thread is dead: collects it when possible, marks it detached, returns true.
  bool release_if_dead();
  void note_new_task(const StopInfo& s);
  long inject(uint64_t insn, bool step, uint64_t trap_rip, long nr, uint64_t a1, uint64_t a2,
              uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6);

  pid_t tid_ = -1;
  bool attached_ = false;
  int last_stop_signo_ = 0;  // of the PTRACE_EVENT_STOP interrupt_until() ended on
  bool interrupt_sent_ = false;  // send_interrupt() done, not waited for yet
  uint64_t injected_ = 0;
  std::vector<pid_t> new_tasks_;
};

// Tests only (fault injection): run in every injected call once the thread has been resumed
// into it and before its trap is collected, the moment a dying tracer would leave the thread
// parked in that trap with injected registers. Empty by default.
void set_injected_call_hook(std::function<void()> hook);

// Reads/writes another process's memory. read/write use process_vm_readv/writev (they honour
// protections); poke uses /proc/PID/mem (a tracer may write read-only pages).
void remote_read(pid_t pid, uint64_t addr, void* buf, size_t len);
void remote_write(pid_t pid, uint64_t addr, const void* buf, size_t len);
void remote_poke(pid_t pid, uint64_t addr, const void* buf, size_t len);

// Syscall restart fix-up for a thread interrupted in a syscall (DESIGN.md section 4), for
// registers that will be set on a restored thread: -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND
// rewind to the syscall instruction (rip -= 2, rax = orig_rax); so does -ERESTART_RESTARTBLOCK
// of poll, futex, nanosleep and clock_nanosleep (the wait starts over: the kernel's
// restart_block does not survive a restore); of any other call it becomes -EINTR. Either way
// orig_rax becomes -1, so the kernel applies no restart logic of its own on top. Returns true
// if it changed regs.
// Not for live injection: syscall() restores the original registers and the kernel restarts
// the interrupted call itself.
bool fixup_interrupted_syscall(Regs& regs);

}  // namespace lazycr

namespace lazycr {
// Address of a `syscall` instruction (0f 05) inside the [vdso] of `pid`, for
// InjectMode::kSingleStep. Throws if the process has no vdso or none is found.
uint64_t find_vdso_syscall_insn(pid_t pid);
}  // namespace lazycr
