#include "checkpoint/interrupt.h"

#include <pthread.h>
#include <time.h>

#include <cstring>

#include "common/log.h"

namespace lazycr::checkpoint {
namespace {

sigset_t termination_signals() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaddset(&set, sig);
  return set;
}

// The pending termination signal, consumed; 0 if none.
int take_pending() {
  sigset_t set = termination_signals();
  struct timespec now {
    0, 0
  };
  for (;;) {
    int sig = ::sigtimedwait(&set, nullptr, &now);
    if (sig > 0) return sig;
    if (errno != EINTR) return 0;  // EAGAIN: none pending
  }
}

}  // namespace

const char* termination_signal_name(int signo) {
  switch (signo) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGHUP:
      return "SIGHUP";
    case SIGQUIT:
      return "SIGQUIT";
    default:
      return "a signal";
  }
}

HoldTerminationSignals::HoldTerminationSignals() {
  sigset_t set = termination_signals();
  int err = ::pthread_sigmask(SIG_BLOCK, &set, &old_);
  if (err != 0) fail_errno_value(err, "pthread_sigmask (blocking SIGINT/SIGTERM/SIGHUP/SIGQUIT)");
}

HoldTerminationSignals::~HoldTerminationSignals() {
  if (int sig = take_pending())
    log::info(termination_signal_name(sig),
              " came after the last point where the dump could "
              "stop; the dump ran to its end");
  ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
}

void throw_if_interrupted() {
  if (int sig = take_pending())
    throw Interrupted(sig, cat("dump interrupted by ", termination_signal_name(sig)));
}

}  // namespace lazycr::checkpoint
