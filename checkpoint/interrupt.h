// Ctrl-C, SIGTERM, SIGHUP and SIGQUIT during a dump. Dying at an arbitrary instant would
// abandon the tree half-way: a thread parked in the trap of an injected call gets that SIGTRAP
// when its tracer dies, and is killed by it; a scratch page stays mapped; the staging directory
// stays. So these signals are held blocked while the dump runs and taken at safe points only
// (between steps, between injected calls, between batches of pages), where they become an
// Interrupted error that runs the ordinary rollback.
#pragma once

#include <signal.h>

#include "common/error.h"

namespace lazycr::checkpoint {

// A termination signal taken at a safe point. The message is complete only once the rollback
// has run (dump() rethrows it with what was left running).
class Interrupted : public Error {
 public:
  Interrupted(int signo, const std::string& msg) : Error(msg, EINTR), signo_(signo) {}
  int signo() const { return signo_; }

 private:
  int signo_;
};

// Blocks the termination signals in the calling thread for its lifetime (threads it starts
// meanwhile inherit the mask). On destruction a signal still pending is one that came after the
// last safe point, when there was nothing left to roll back: it is consumed (logged), then the
// previous mask is put back.
class HoldTerminationSignals {
 public:
  HoldTerminationSignals();
  ~HoldTerminationSignals();
  HoldTerminationSignals(const HoldTerminationSignals&) = delete;
  HoldTerminationSignals& operator=(const HoldTerminationSignals&) = delete;

 private:
  sigset_t old_;
};

// Safe point: throws Interrupted if a termination signal is pending (and consumes it).
void throw_if_interrupted();

// "SIGINT" etc.
const char* termination_signal_name(int signo);

}  // namespace lazycr::checkpoint
