#include "image-format/validate_timers.h"

#include <sched.h>
#include <signal.h>
#include <sys/time.h>

#include <climits>
#include <cstdint>
#include <set>

#include "common/error.h"

namespace lazycr::image {
namespace {

// The kernel's per-process timer count is bounded by RLIMIT_SIGPENDING only; this bound is
// far beyond real programs and keeps a hostile image from making millions of calls.
constexpr int kMaxPosixTimers = 65536;
constexpr uint64_t kMaxNs = static_cast<uint64_t>(INT64_MAX);
constexpr size_t kMaxAffinityBytes = sizeof(cpu_set_t);  // CPUs 0..1023

bool valid_signal(int32_t s) {
  return s >= 1 && s <= 64;
}

void validate_timer(const PosixTimer& t, const Process& p, const std::string& who) {
  const std::string timer = cat(who, ": timer ", t.id());
  if (t.id() < 0) fail(who, ": timer id ", t.id(), " is negative");
  const int base = t.notify() & ~SIGEV_THREAD_ID;
  if ((t.notify() & ~(SIGEV_THREAD_ID | 3)) != 0 ||
      (base != SIGEV_SIGNAL && base != SIGEV_NONE && base != SIGEV_THREAD))
    fail(timer, ": unknown notification ", t.notify());
  if (base != SIGEV_NONE && !valid_signal(t.signo())) fail(timer, ": signal ", t.signo());
  if (base == SIGEV_NONE && (t.signo() < 0 || t.signo() > 64)) fail(timer, ": signal ", t.signo());
  if (t.notify() & SIGEV_THREAD_ID) {
    bool found = false;
    for (const auto& th : p.threads()) found |= th.tid() == t.notify_tid();
    if (!found) fail(timer, ": signals thread ", t.notify_tid(), ", not one of the process");
  } else if (t.notify_tid() != 0) {
    fail(timer, ": a thread ", t.notify_tid(), " without SIGEV_THREAD_ID");
  }
  if (t.value_ns() > kMaxNs || t.interval_ns() > kMaxNs) fail(timer, ": time out of range");
}

}  // namespace

void validate_timers_and_sched(const Process& p, const std::string& who) {
  if (p.posix_timers_size() > kMaxPosixTimers)
    fail(who, ": ", p.posix_timers_size(), " POSIX timers exceeds the bound");
  int prev = -1;
  for (const auto& t : p.posix_timers()) {
    validate_timer(t, p, who);
    if (t.id() <= prev) fail(who, ": timer ", t.id(), " out of order or listed twice");
    prev = t.id();
  }
  if (p.itimers_size() > 3) fail(who, ": ", p.itimers_size(), " interval timers (at most 3)");
  std::set<int> which;
  for (const auto& it : p.itimers()) {
    if (it.which() != ITIMER_REAL && it.which() != ITIMER_VIRTUAL && it.which() != ITIMER_PROF)
      fail(who, ": unknown interval timer ", it.which());
    if (!which.insert(it.which()).second) fail(who, ": interval timer ", it.which(), " twice");
    if (it.value_us() > kMaxNs / 1000 || it.interval_us() > kMaxNs / 1000)
      fail(who, ": interval timer ", it.which(), ": time out of range");
  }
  for (const auto& th : p.threads()) {
    const std::string thread = cat(who, " thread ", th.tid());
    if (th.pdeathsig() != 0 && !valid_signal(th.pdeathsig()))
      fail(thread, ": parent death signal ", th.pdeathsig());
    if (!th.has_sched()) continue;
    const ThreadSched& s = th.sched();
    const bool realtime = s.policy() == SCHED_FIFO || s.policy() == SCHED_RR;
    if (!realtime && s.policy() != SCHED_OTHER && s.policy() != SCHED_BATCH &&
        s.policy() != SCHED_IDLE)
      fail(thread, ": unknown scheduling policy ", s.policy());
    if (realtime ? (s.priority() < 1 || s.priority() > 99) : s.priority() != 0)
      fail(thread, ": priority ", s.priority(), " for policy ", s.policy());
    if (s.nice() < -20 || s.nice() > 19) fail(thread, ": nice ", s.nice());
    const std::string& a = s.affinity();
    if (a.empty()) continue;
    if (a.size() % 8 != 0 || a.size() > kMaxAffinityBytes)
      fail(thread, ": a CPU mask of ", a.size(), " bytes (want 8..", kMaxAffinityBytes,
           ", a multiple of 8)");
    if (a.find_first_not_of('\0') == std::string::npos) fail(thread, ": an empty CPU mask");
  }
}

}  // namespace lazycr::image
