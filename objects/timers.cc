#include "objects/timers.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <sstream>
#include <vector>

#include "common/error.h"
#include "common/kernel_features.h"
#include "common/proc.h"

namespace lazycr::objects::timers {
namespace {

// Linux 6.16 (include/uapi/linux/prctl.h); Debian's headers predate it. Probed in
// common/kernel_features.cc.
constexpr int kPrTimerCreateRestoreIds = 77;
constexpr int kRestoreIdsOff = 0;
constexpr int kRestoreIdsOn = 1;
constexpr int kSigevThreadId = 4;
constexpr int64_t kNsPerSec = 1'000'000'000;
// Without the prctl, how many throw-away timers the restore creates to reach one id.
constexpr int kMaxFillerTimers = 4096;

// struct sigevent as the kernel reads it on x86_64 (64 bytes).
struct KernelSigevent {
  uint64_t value;
  int32_t signo;
  int32_t notify;
  int32_t tid;
  int32_t pad[11];
};
static_assert(sizeof(KernelSigevent) == 64);

struct KernelItimerspec {
  int64_t interval_sec, interval_nsec, value_sec, value_nsec;
};
struct KernelItimerval {
  int64_t interval_sec, interval_usec, value_sec, value_usec;
};

// One entry of /proc/PID/timers (fs/proc/base.c show_timer()).
struct ProcTimer {
  int id = -1;
  int signo = 0;
  uint64_t value = 0;
  std::string notify;  // "signal", "none", "thread"
  bool to_thread = false;
  int target = 0;  // pid or tid, in lazycr's PID namespace
  int clock = 0;
  bool clock_seen = false;
};

std::vector<ProcTimer> parse_proc_timers(pid_t pid, const std::string& text) {
  std::vector<ProcTimer> out;
  std::istringstream in(text);
  std::string line;
  auto bad = [&] { fail("/proc/", pid, "/timers: cannot parse \"", line, "\""); };
  while (std::getline(in, line)) {
    if (line.rfind("ID: ", 0) == 0) {
      out.emplace_back();
      char* end = nullptr;
      long id = std::strtol(line.c_str() + 4, &end, 10);
      if (*end != '\0' || id < 0 || id > INT_MAX) bad();
      out.back().id = static_cast<int>(id);
      continue;
    }
    if (out.empty()) bad();
    ProcTimer& t = out.back();
    if (line.rfind("signal: ", 0) == 0) {
      unsigned long long v = 0;
      if (std::sscanf(line.c_str(), "signal: %d/%llx", &t.signo, &v) != 2) bad();
      t.value = v;
    } else if (line.rfind("notify: ", 0) == 0) {
      char kind[16] = {}, who[8] = {};
      if (std::sscanf(line.c_str(), "notify: %15[a-z]/%7[a-z].%d", kind, who, &t.target) != 3)
        bad();
      t.notify = kind;
      t.to_thread = std::strcmp(who, "tid") == 0;
    } else if (line.rfind("ClockID: ", 0) == 0) {
      if (std::sscanf(line.c_str(), "ClockID: %d", &t.clock) != 1) bad();
      t.clock_seen = true;
    }
  }
  for (const auto& t : out)
    if (!t.clock_seen || t.notify.empty())
      fail("/proc/", pid, "/timers: timer ", t.id, " is incomplete");
  return out;
}

int notify_base(const ProcTimer& t) {
  if (t.notify == "signal") return SIGEV_SIGNAL;
  if (t.notify == "none") return SIGEV_NONE;
  if (t.notify == "thread") return SIGEV_THREAD;
  fail("timer ", t.id, ": unknown notification \"", t.notify, "\"");
}

uint64_t to_ns(int64_t sec, int64_t nsec) {
  return static_cast<uint64_t>(sec) * kNsPerSec + static_cast<uint64_t>(nsec);
}

void dump_posix(RemoteProcess& p, image::Process& proc) {
  auto text = proc::try_read_file(cat("/proc/", p.pid(), "/timers"));
  if (!text) fail_errno("reading /proc/", p.pid(), "/timers");
  std::vector<ProcTimer> timers = parse_proc_timers(p.pid(), *text);
  std::sort(timers.begin(), timers.end(),
            [](const ProcTimer& a, const ProcTimer& b) { return a.id < b.id; });
  for (const ProcTimer& t : timers) {
    image::PosixTimer* out = proc.add_posix_timers();
    out->set_id(t.id);
    out->set_clock(t.clock);
    out->set_notify(notify_base(t) | (t.to_thread ? kSigevThreadId : 0));
    out->set_signo(t.signo);
    out->set_value(t.value);
    if (t.to_thread) {
      bool found = false;
      for (size_t i = 0; i < p.thread_count() && !found; i++)
        if (p.tid(i) == t.target) {
          out->set_notify_tid(p.image_tid(i));
          found = true;
        }
      if (!found) fail("timer ", t.id, " signals thread ", t.target, ", not one of this process");
    }
    // Both in one round trip.
    KernelItimerspec its{};
    const uint64_t at = p.put(&its, sizeof its);
    const BatchCall calls[] = {{SYS_timer_gettime, {static_cast<uint64_t>(t.id), at}},
                               {SYS_timer_getoverrun, {static_cast<uint64_t>(t.id)}}};
    const std::vector<long> results =
        p.calls(0, cat("timer_gettime, timer_getoverrun of timer ", t.id), calls);
    p.read(at, &its, sizeof its);
    out->set_value_ns(to_ns(its.value_sec, its.value_nsec));
    out->set_interval_ns(to_ns(its.interval_sec, its.interval_nsec));
    out->set_overrun(static_cast<int32_t>(results.at(1)));
  }
}

void dump_itimers(RemoteProcess& p, image::Process& proc) {
  // The three in one round trip.
  constexpr int kWhich[] = {ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF};
  KernelItimerval values[3]{};
  const uint64_t at = p.put(values, sizeof values);
  BatchCall calls[3];
  for (size_t k = 0; k < 3; k++)
    calls[k] = {SYS_getitimer, {static_cast<uint64_t>(kWhich[k]), at + k * sizeof values[0]}};
  p.calls(0, "getitimer(ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF)", calls);
  p.read(at, values, sizeof values);
  for (size_t k = 0; k < 3; k++) {
    const int which = kWhich[k];
    const KernelItimerval& v = values[k];
    if (v.value_sec == 0 && v.value_usec == 0 && v.interval_sec == 0 && v.interval_usec == 0)
      continue;
    image::Itimer* out = proc.add_itimers();
    out->set_which(which);
    out->set_value_us(static_cast<uint64_t>(v.value_sec) * 1'000'000 +
                      static_cast<uint64_t>(v.value_usec));
    out->set_interval_us(static_cast<uint64_t>(v.interval_sec) * 1'000'000 +
                         static_cast<uint64_t>(v.interval_usec));
  }
}

// Creates the timer; returns the id the kernel gave it. With `wanted` >= 0 and the prctl on,
// the kernel gives that id or fails.
int create(RemoteProcess& p, const image::PosixTimer& t, int wanted) {
  struct {
    KernelSigevent ev;
    int32_t id;
  } arg{};
  arg.ev.value = t.value();
  arg.ev.signo = t.signo();
  arg.ev.notify = t.notify();
  arg.ev.tid = t.notify_tid();
  arg.id = wanted;
  const uint64_t at = p.put(&arg, sizeof arg);
  p.call(0, cat("timer_create of timer ", t.id(), " (clock ", t.clock(), ")"), SYS_timer_create,
         static_cast<uint64_t>(static_cast<int64_t>(t.clock())), at, at + sizeof arg.ev);
  int32_t got = -1;
  p.read(at + sizeof arg.ev, &got, sizeof got);
  return got;
}

void remove(RemoteProcess& p, int id, const char* why) {
  p.call(0, cat("timer_delete of ", why, " timer ", id), SYS_timer_delete,
         static_cast<uint64_t>(id));
}

// Without PR_TIMER_CREATE_RESTORE_IDS the kernel hands out ids in increasing order: create
// throw-away timers up to each id, delete them afterwards.
void create_in_order(RemoteProcess& p, const image::Process& proc) {
  std::vector<int> fillers;
  for (const auto& t : proc.posix_timers()) {
    int got = create(p, t, -1);
    while (got != t.id()) {
      if (got > t.id() || fillers.size() >= static_cast<size_t>(kMaxFillerTimers)) {
        remove(p, got, "a surplus");
        fail("timer ", t.id(), " cannot get its id back: the kernel handed out ", got,
             " (no PR_TIMER_CREATE_RESTORE_IDS on this kernel)");
      }
      fillers.push_back(got);
      got = create(p, t, -1);
    }
  }
  for (int id : fillers) remove(p, id, "a throw-away");
}

void arm(RemoteProcess& p, const image::PosixTimer& t) {
  if (t.value_ns() == 0 && t.interval_ns() == 0) return;  // as created: disarmed
  KernelItimerspec its{static_cast<int64_t>(t.interval_ns() / kNsPerSec),
                       static_cast<int64_t>(t.interval_ns() % kNsPerSec),
                       static_cast<int64_t>(t.value_ns() / kNsPerSec),
                       static_cast<int64_t>(t.value_ns() % kNsPerSec)};
  const uint64_t at = p.put(&its, sizeof its);
  p.call(0, cat("timer_settime of timer ", t.id()), SYS_timer_settime,
         static_cast<uint64_t>(t.id()), 0, at, 0);
}

void restore_posix(RemoteProcess& p, const image::Process& proc) {
  if (proc.posix_timers_size() == 0) return;
  if (kernel_features().timer_restore_ids) {
    p.call(0, "prctl(PR_TIMER_CREATE_RESTORE_IDS, ON)", SYS_prctl, kPrTimerCreateRestoreIds,
           kRestoreIdsOn, 0, 0, 0);
    for (const auto& t : proc.posix_timers()) {
      int got = create(p, t, t.id());
      if (got != t.id()) fail("timer ", t.id(), " was created with id ", got);
    }
    p.call(0, "prctl(PR_TIMER_CREATE_RESTORE_IDS, OFF)", SYS_prctl, kPrTimerCreateRestoreIds,
           kRestoreIdsOff, 0, 0, 0);
  } else {
    create_in_order(p, proc);
  }
  for (const auto& t : proc.posix_timers()) arm(p, t);
}

void restore_itimers(RemoteProcess& p, const image::Process& proc) {
  for (const auto& it : proc.itimers()) {
    KernelItimerval v{static_cast<int64_t>(it.interval_us() / 1'000'000),
                      static_cast<int64_t>(it.interval_us() % 1'000'000),
                      static_cast<int64_t>(it.value_us() / 1'000'000),
                      static_cast<int64_t>(it.value_us() % 1'000'000)};
    const uint64_t at = p.put(&v, sizeof v);
    p.call(0, cat("setitimer(", it.which(), ")"), SYS_setitimer, static_cast<uint64_t>(it.which()),
           at, 0);
  }
}

}  // namespace

void dump(RemoteProcess& p, image::Process& proc, DumpContext&) {
  dump_posix(p, proc);
  dump_itimers(p, proc);
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kThreadsExist) return;
  restore_posix(p, proc);
  restore_itimers(p, proc);
}

}  // namespace lazycr::objects::timers
