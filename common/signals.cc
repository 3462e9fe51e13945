#include "common/signals.h"

#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/error.h"

namespace lazycr {

bool send_signal(pid_t pid, int sig) {
  if (pid <= 0) fail("refusing to send signal ", sig, " to pid ", pid);
  return ::kill(pid, sig) == 0;
}

bool send_thread_signal(pid_t tgid, pid_t tid, int sig) {
  if (tgid <= 0 || tid <= 0) fail("refusing to send signal ", sig, " to tid ", tgid, "/", tid);
  return ::syscall(SYS_tgkill, tgid, tid, sig) == 0;
}

bool send_signal_pidfd(int pidfd, int sig) {
  if (pidfd < 0) fail("refusing to send signal ", sig, " through invalid pidfd");
  return ::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) == 0;
}

}  // namespace lazycr
