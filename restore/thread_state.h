// Internal to restore/: the state of one thread of the image, as the restore gives it back
// (shared by `lazycr restore` and by clones of a template, restore/clone.h).
#pragma once

#include <sched.h>

#include "common/ptrace.h"
#include "image-format/process.pb.h"
#include "restore/restoree.h"

namespace lazycr::restore {

// The flags of an injected clone3 that makes one more thread of a process.
inline constexpr unsigned long kThreadFlags =
    CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;

Regs to_regs(const image::X86Regs& p);

// The registers a thread resumes with (see thread_state.cc on interrupted system calls).
Regs final_regs(const image::Thread& th);

// Per-thread state each thread sets for itself (name, tid address, robust list, rseq,
// sigaltstack): one batch run in that thread.
void restore_thread_state(Restoree& r, ThreadCtl& c);

}  // namespace lazycr::restore
