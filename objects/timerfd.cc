// timerfd (TIMERFD): clock, settime flags, time left, interval and ticks not yet read, from
// fdinfo after a timerfd_gettime() of the description (it accounts a periodic timer's missed
// expirations into its ticks, as the next read would, and re-arms it). Made again by lazycr:
// a relative timer resumes with the time it had left at dump (the time between dump and
// restore does not count), an absolute one keeps its absolute expiration; then the ticks
// come back with TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE).
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>

#include <cstdint>
#include <cstdio>

#include "common/error.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "common/proc.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

constexpr int64_t kNsPerSec = 1000000000;
constexpr uint32_t kSettimeFlags = TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET;
// Times beyond this (~146 years) are refused: ns counts must not overflow an int64 sum.
constexpr uint64_t kMaxTimeNs = uint64_t{1} << 62;

bool known_clock(int c) {
  return c == CLOCK_REALTIME || c == CLOCK_MONOTONIC || c == CLOCK_BOOTTIME ||
         c == CLOCK_REALTIME_ALARM || c == CLOCK_BOOTTIME_ALARM;
}

// The clock an alarm clock counts on (clock_gettime of the alarm ids needs an RTC).
clockid_t base_clock(int c) {
  if (c == CLOCK_REALTIME_ALARM) return CLOCK_REALTIME;
  if (c == CLOCK_BOOTTIME_ALARM) return CLOCK_BOOTTIME;
  return c;
}

int64_t clock_ns(clockid_t c) {
  timespec t{};
  if (::clock_gettime(c, &t) != 0) fail_errno("clock_gettime(", c, ")");
  return int64_t{t.tv_sec} * kNsPerSec + t.tv_nsec;
}

// "(sec, nsec)" of an it_value / it_interval line, in ns.
uint64_t fdinfo_time(const std::string& fdinfo, const std::string& key) {
  auto v = fdinfo_value(fdinfo, key);
  unsigned long long sec = 0, nsec = 0;
  if (!v || std::sscanf(v->c_str(), "(%llu, %llu)", &sec, &nsec) != 2 || nsec >= kNsPerSec ||
      sec >= kMaxTimeNs / kNsPerSec)
    fail("fdinfo '", key, ":' is '", v.value_or("missing"), "', not a time");
  return sec * kNsPerSec + nsec;
}

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  auto* t = f.mutable_timerfd();
  const std::string info_path = cat("/proc/self/fdinfo/", src.dup);
  std::string info;
  int64_t before = 0, after = 0;
  uint64_t value = 0, interval = 0;
  // A periodic timer that expires between the timerfd_gettime() and the fdinfo read shows no
  // time left until the next read forwards it: read again (a few times; then it is due now).
  for (int attempt = 0; attempt < 5; attempt++) {
    itimerspec cur{};
    if (::timerfd_gettime(src.dup, &cur) != 0) fail_errno("timerfd_gettime");
    const int clock = static_cast<int>(fdinfo_number(proc::read_file(info_path), "clockid", 10));
    if (!known_clock(clock)) fail("timerfd of unknown clock ", clock);
    before = clock_ns(base_clock(clock));
    info = proc::read_file(info_path);
    after = clock_ns(base_clock(clock));
    value = fdinfo_time(info, "it_value");
    interval = fdinfo_time(info, "it_interval");
    if (value != 0 || interval == 0) break;
  }
  if (value == 0 && interval != 0) value = interval;
  t->set_clockid(static_cast<int32_t>(fdinfo_number(info, "clockid", 10)));
  t->set_ticks(fdinfo_number(info, "ticks", 10));
  t->set_settime_flags(static_cast<uint32_t>(fdinfo_number(info, "settime flags", 8)));
  t->set_value_ns(value);
  t->set_interval_ns(interval);
  // The kernel measured the time left somewhere between `before` and `after`.
  if ((t->settime_flags() & TFD_TIMER_ABSTIME) && value != 0)
    t->set_expires_ns(before + (after - before) / 2 + static_cast<int64_t>(value));
  if (t->settime_flags() & ~kSettimeFlags)
    fail("timerfd settime flags 0", std::oct, t->settime_flags(), " unknown to lazycr");
}

void validate(const image::FileDescriptor& f, const std::set<int>&) {
  if (!f.has_timerfd()) fail("has no timerfd state");
  const auto& t = f.timerfd();
  if (!known_clock(t.clockid())) fail("timerfd clock ", t.clockid(), " is not a timerfd clock");
  if (t.settime_flags() & ~kSettimeFlags)
    fail("timerfd settime flags 0", std::oct, t.settime_flags(), " unknown");
  if ((t.settime_flags() & TFD_TIMER_CANCEL_ON_SET) &&
      (!(t.settime_flags() & TFD_TIMER_ABSTIME) ||
       (t.clockid() != CLOCK_REALTIME && t.clockid() != CLOCK_REALTIME_ALARM)))
    fail("timerfd TFD_TIMER_CANCEL_ON_SET without TFD_TIMER_ABSTIME on a real-time clock");
  if (t.value_ns() >= kMaxTimeNs || t.interval_ns() >= kMaxTimeNs)
    fail("timerfd time left ", t.value_ns(), " ns or interval ", t.interval_ns(),
         " ns out of bounds");
  if (t.expires_ns() < 0 || static_cast<uint64_t>(t.expires_ns()) >= kMaxTimeNs)
    fail("timerfd expiration ", t.expires_ns(), " ns out of bounds");
  if (t.ticks() != 0 && !kernel_features().timerfd_set_ticks)
    fail("timerfd with ", t.ticks(),
         " expirations not yet read: this kernel cannot set them (TFD_IOC_SET_TICKS needs "
         "CONFIG_CHECKPOINT_RESTORE; see 'lazycr check')");
}

timespec to_timespec(uint64_t ns) {
  return timespec{static_cast<time_t>(ns / kNsPerSec), static_cast<long>(ns % kNsPerSec)};
}

UniqueFd create(const image::FileDescriptor& f, const FdCreateContext&) {
  const auto& t = f.timerfd();
  UniqueFd fd(
      ::timerfd_create(t.clockid(), TFD_CLOEXEC | (f.flags() & O_NONBLOCK ? TFD_NONBLOCK : 0)));
  if (!fd) fail_errno("timerfd_create(clock ", t.clockid(), ")");
  itimerspec its{};
  its.it_interval = to_timespec(t.interval_ns());
  const bool absolute = t.settime_flags() & TFD_TIMER_ABSTIME;
  if (t.value_ns() != 0)
    its.it_value = to_timespec(absolute ? static_cast<uint64_t>(t.expires_ns()) : t.value_ns());
  if (::timerfd_settime(fd.get(), static_cast<int>(t.settime_flags()), &its, nullptr) != 0)
    fail_errno("timerfd_settime(flags ", t.settime_flags(), ")");
  if (t.ticks() != 0) {
    // Arming cleared the ticks; an expiration since (at most one: the kernel forwards a
    // periodic timer only on read) is added to the image's rather than overwritten.
    uint64_t ticks = t.ticks() + fdinfo_number(proc::read_file(cat("/proc/self/fdinfo/", fd.get())),
                                               "ticks", 10);
    if (::ioctl(fd.get(), TFD_IOC_SET_TICKS, &ticks) != 0)
      fail_errno("ioctl(TFD_IOC_SET_TICKS, ", ticks, ")");
  }
  return fd;
}

}  // namespace

const FdKind kTimerfdKind = {
    image::FileDescriptor::TIMERFD, "[timerfd]", dump, validate, create, nullptr};

}  // namespace lazycr::objects
