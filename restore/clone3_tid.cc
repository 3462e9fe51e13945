#include "restore/clone3_tid.h"

#include <sys/syscall.h>

#include <cstring>

#include "common/error.h"
#include "common/linux_abi.h"
#include "restore/thread_state.h"

namespace lazycr::restore {

long inject_clone3_with_id(Restoree& r, uint64_t flags, uint64_t exit_signal, pid_t id) {
  abi::clone_args args;
  std::memset(&args, 0, sizeof args);
  args.flags = flags;
  args.exit_signal = exit_signal;
  args.set_tid_size = 1;
  r.reset_arena();
  args.set_tid = r.push(&id, sizeof id);
  const uint64_t base = r.push(&args, sizeof args);
  return r.inject_raw(SYS_clone3, base, sizeof args);
}

ThreadCtl& make_thread_with_tid(Restoree& r, const image::Thread& th) {
  const pid_t tid = th.tid();
  const long got = inject_clone3_with_id(r, kThreadFlags, 0, tid);
  if (got < 0 && got > -4096)
    fail_errno_value(static_cast<int>(-got), cat("clone3 of thread ", tid));
  ThreadCtl& c = r.adopt_new_thread(tid, &th);
  if (got != tid) fail("clone3 created thread ", got, ", not ", tid);
  return c;
}

}  // namespace lazycr::restore
