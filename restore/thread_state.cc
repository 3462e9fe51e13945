#include "restore/thread_state.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "restore/calls.h"

namespace lazycr::restore {
namespace {
constexpr int kSsAutoDisarm = static_cast<int>(1u << 31);  // SS_AUTODISARM (Linux 4.7)
}  // namespace

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

// The registers a thread resumes with. A thread that was interrupted in a restartable system
// call gets it back as the kernel left it (rip after the `syscall`, rax = -ERESTART*,
// orig_rax = the call): the thread resumes from a ptrace stop inside the kernel's signal
// delivery, whose restart logic then restarts the call, or makes it return -EINTR if a
// handler runs first (ERESTARTNOHAND, or ERESTARTSYS without SA_RESTART) - as in the
// original. The image's rewound form (FORMAT.md) would restart it even after a handler: a
// pause() woken by a signal would sleep again.
Regs final_regs(const image::Thread& th) {
  Regs r = to_regs(th.regs());
  const int code = th.restart_code();
  if (th.interrupted_syscall() && (code == 512 || code == 513 || code == 514) &&
      static_cast<long>(r.orig_rax) < 0 && static_cast<long>(r.rax) >= 0) {
    r.rip += 2;
    r.orig_rax = r.rax;
    r.rax = static_cast<uint64_t>(-static_cast<long>(code));
  }
  return r;
}

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
}  // namespace lazycr::restore
