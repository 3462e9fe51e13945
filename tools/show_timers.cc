#include "tools/show_timers.h"

#include <sched.h>
#include <signal.h>

#include <string>

#include "common/error.h"
#include "objects/sched.h"

namespace lazycr::cli {
namespace {

std::string notify_text(const image::PosixTimer& t) {
  const int base = t.notify() & ~SIGEV_THREAD_ID;
  std::string s = base == SIGEV_NONE ? "none" : base == SIGEV_THREAD ? "thread" : "signal";
  if (base != SIGEV_NONE) s += cat(" ", t.signo());
  if (t.notify() & SIGEV_THREAD_ID) s += cat(" to thread ", t.notify_tid());
  return s;
}

std::string policy_text(uint32_t policy) {
  switch (policy) {
    case SCHED_OTHER:
      return "other";
    case SCHED_FIFO:
      return "fifo";
    case SCHED_RR:
      return "rr";
    case SCHED_BATCH:
      return "batch";
    case SCHED_IDLE:
      return "idle";
  }
  return cat("policy ", policy);
}

std::string cpus(const image::ThreadSched& s) {
  if (s.affinity().empty()) return "not recorded";
  return objects::sched::cpu_list(reinterpret_cast<const uint8_t*>(s.affinity().data()),
                                  s.affinity().size());
}

std::string seconds(uint64_t ns) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6f s", static_cast<double>(ns) / 1e9);
  return buf;
}

const char* itimer_name(int which) {
  return which == 0 ? "real" : which == 1 ? "virtual" : "prof";
}

}  // namespace

void print_timers_text(std::ostream& o, const image::Process& p) {
  if (p.posix_timers_size() > 0) o << "  POSIX timers (" << p.posix_timers_size() << "):\n";
  for (const auto& t : p.posix_timers())
    o << "    id " << t.id() << "  clock " << t.clock() << "  notify " << notify_text(t)
      << "  value " << hex(t.value()) << "  left "
      << (t.value_ns() ? seconds(t.value_ns()) : std::string("disarmed")) << "  interval "
      << seconds(t.interval_ns()) << "  overrun " << t.overrun() << "\n";
  for (const auto& it : p.itimers())
    o << "  Interval timer " << itimer_name(it.which()) << ": left "
      << seconds(it.value_us() * 1000) << "  interval " << seconds(it.interval_us() * 1000) << "\n";
  for (const auto& t : p.threads()) {
    if (!t.has_sched() && t.pdeathsig() == 0) continue;
    o << "  Scheduling (thread " << t.tid() << "):";
    if (t.has_sched())
      o << " " << policy_text(t.sched().policy())
        << (t.sched().priority() ? cat(" priority ", t.sched().priority()) : std::string())
        << (t.sched().reset_on_fork() ? " reset-on-fork" : "") << "  nice " << t.sched().nice()
        << "  cpus " << cpus(t.sched());
    if (t.pdeathsig() != 0) o << "  parent death signal " << t.pdeathsig();
    o << "\n";
  }
}

void timers_json(JsonWriter& j, const image::Process& p) {
  j.key("posix_timers");
  j.begin_array();
  for (const auto& t : p.posix_timers()) {
    j.begin_object();
    j.field("id", t.id());
    j.field("clock", t.clock());
    j.field("notify", t.notify());
    j.field("signo", t.signo());
    j.hex_field("value", t.value());
    j.field("notify_tid", t.notify_tid());
    j.field("value_ns", t.value_ns());
    j.field("interval_ns", t.interval_ns());
    j.field("overrun", t.overrun());
    j.end_object();
  }
  j.end_array();
  j.key("itimers");
  j.begin_array();
  for (const auto& it : p.itimers()) {
    j.begin_object();
    j.field("which", itimer_name(it.which()));
    j.field("value_us", it.value_us());
    j.field("interval_us", it.interval_us());
    j.end_object();
  }
  j.end_array();
}

void thread_sched_json(JsonWriter& j, const image::Thread& t) {
  if (t.has_sched()) {
    j.key("sched");
    j.begin_object();
    j.field("policy", policy_text(t.sched().policy()));
    j.field("priority", t.sched().priority());
    j.field("reset_on_fork", t.sched().reset_on_fork());
    j.field("nice", t.sched().nice());
    j.field("cpus", cpus(t.sched()));
    j.end_object();
  }
  j.field("pdeathsig", t.pdeathsig());
}

}  // namespace lazycr::cli
