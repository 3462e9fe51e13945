// The one way lazycr sends a signal. A pid <= 0 would reach a process group or every
// process on the machine; it is refused here, always.
#pragma once

#include <sys/types.h>

namespace lazycr {

// kill(pid, sig) for pid > 0; throws Error on pid <= 0. Returns false (errno set) if kill failed.
bool send_signal(pid_t pid, int sig);
// tgkill(tgid, tid, sig) with the same guard.
bool send_thread_signal(pid_t tgid, pid_t tid, int sig);
// pidfd_send_signal: race-free against PID reuse.
bool send_signal_pidfd(int pidfd, int sig);

}  // namespace lazycr
