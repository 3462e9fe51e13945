#include "objects/sched.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "common/error.h"
#include "common/log.h"

namespace lazycr::objects::sched {
namespace {

constexpr uint32_t kSchedDeadline = 6;
constexpr uint64_t kFlagResetOnFork = 0x01;  // SCHED_FLAG_RESET_ON_FORK

// struct sched_attr, SCHED_ATTR_SIZE_VER0 (glibc 2.36 has no wrapper).
struct SchedAttr {
  uint32_t size;
  uint32_t policy;
  uint64_t flags;
  int32_t nice;
  uint32_t priority;
  uint64_t runtime, deadline, period;
};
static_assert(sizeof(SchedAttr) == 48);

const char* policy_name(uint32_t policy) {
  switch (policy) {
    case SCHED_OTHER:
      return "SCHED_OTHER";
    case SCHED_FIFO:
      return "SCHED_FIFO";
    case SCHED_RR:
      return "SCHED_RR";
    case SCHED_BATCH:
      return "SCHED_BATCH";
    case SCHED_IDLE:
      return "SCHED_IDLE";
    case kSchedDeadline:
      return "SCHED_DEADLINE";
  }
  return "an unknown policy";
}

const image::Thread* image_thread(const image::Process& proc, pid_t tid) {
  for (const auto& t : proc.threads())
    if (t.tid() == tid) return &t;
  fail("thread ", tid, " is not in the image of pid ", proc.pid());
}

}  // namespace

// "0-3,6" for a CPU mask.
std::string cpu_list(const uint8_t* mask, size_t bytes) {
  std::string out;
  for (size_t c = 0; c < bytes * 8; c++) {
    if (!(mask[c / 8] & (1u << (c % 8)))) continue;
    size_t last = c;
    while (last + 1 < bytes * 8 && (mask[(last + 1) / 8] & (1u << ((last + 1) % 8)))) last++;
    out += cat(out.empty() ? "" : ",", c, last > c ? cat("-", last) : std::string());
    c = last;
  }
  return out.empty() ? "none" : out;
}

void dump(RemoteProcess& p, image::Process& proc, DumpContext&) {
  for (size_t i = 0; i < p.thread_count(); i++) {
    const pid_t tid = p.tid(i);
    image::Thread* th = nullptr;
    for (auto& t : *proc.mutable_threads())
      if (t.tid() == p.image_tid(i)) th = &t;
    if (!th) fail("thread ", p.image_tid(i), " is not in the image of pid ", proc.pid());
    SchedAttr a{};
    if (::syscall(SYS_sched_getattr, tid, &a, sizeof a, 0) != 0)
      fail_errno("sched_getattr of thread ", tid);
    if (a.policy == kSchedDeadline)
      fail("thread ", tid, " runs under SCHED_DEADLINE, which lazycr cannot restore");
    if (a.policy != SCHED_OTHER && a.policy != SCHED_FIFO && a.policy != SCHED_RR &&
        a.policy != SCHED_BATCH && a.policy != SCHED_IDLE)
      fail("thread ", tid, " runs under scheduling policy ", a.policy, ", unknown to lazycr");
    image::ThreadSched* s = th->mutable_sched();
    s->set_policy(a.policy);
    s->set_priority(a.priority);
    // sched_getattr reports the nice value of the fair policies only; a realtime thread keeps
    // one too (for when it goes back to SCHED_OTHER), which getpriority reports either way.
    errno = 0;
    const int nice = ::getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
    if (nice == -1 && errno != 0) fail_errno("getpriority of thread ", tid);
    s->set_nice(nice);
    s->set_reset_on_fork(a.flags & kFlagResetOnFork);
    cpu_set_t mask;
    CPU_ZERO(&mask);
    // The raw call returns how many bytes the kernel's mask has (glibc's wrapper hides it).
    long bytes = ::syscall(SYS_sched_getaffinity, tid, sizeof mask, &mask);
    if (bytes < 0) fail_errno("sched_getaffinity of thread ", tid);
    s->set_affinity(&mask, static_cast<size_t>(bytes));
  }
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kThreadsExist) return;
  for (size_t i = 0; i < p.thread_count(); i++) {
    const image::Thread& th = *image_thread(proc, p.image_tid(i));
    if (!th.has_sched()) continue;
    const image::ThreadSched& s = th.sched();
    const pid_t tid = p.tid(i);
    // sched_setattr sets the nice value of the fair policies only: a realtime thread keeps one
    // for when it goes back to SCHED_OTHER.
    if (::setpriority(PRIO_PROCESS, static_cast<id_t>(tid), s.nice()) != 0)
      fail_errno("setpriority(nice ", s.nice(), ") of thread ", th.tid());
    SchedAttr a{};
    a.size = sizeof a;
    a.policy = s.policy();
    a.flags = s.reset_on_fork() ? kFlagResetOnFork : 0;
    a.nice = s.nice();
    a.priority = s.priority();
    if (::syscall(SYS_sched_setattr, tid, &a, 0) != 0)
      fail_errno("thread ", th.tid(), " cannot be given ", policy_name(s.policy()),
                 s.priority() ? cat(" priority ", s.priority()) : std::string(),
                 errno == EPERM ? " (not permitted here)" : "");
  }
}

}  // namespace lazycr::objects::sched

namespace lazycr::objects {

void restore_affinity(pid_t tid, const image::Thread& th, const cpu_set_t& unrecorded) {
  if (!th.has_sched() || th.sched().affinity().empty()) {
    if (::sched_setaffinity(tid, sizeof unrecorded, &unrecorded) != 0)
      fail_errno("sched_setaffinity of tid ", tid);
    return;
  }
  const std::string& want = th.sched().affinity();  // validated: 8..sizeof(cpu_set_t) bytes
  cpu_set_t mask;
  CPU_ZERO(&mask);
  std::memcpy(&mask, want.data(), std::min(want.size(), sizeof mask));
  const auto* bytes = reinterpret_cast<const uint8_t*>(want.data());
  if (::sched_setaffinity(tid, sizeof mask, &mask) != 0)
    fail_errno("thread ", th.tid(), " was bound to CPUs ", sched::cpu_list(bytes, want.size()),
               errno == EINVAL ? ", none of which exists or may be used here" : "");
  cpu_set_t got;
  CPU_ZERO(&got);
  if (::sched_getaffinity(tid, sizeof got, &got) != 0) fail_errno("sched_getaffinity of tid ", tid);
  if (!CPU_EQUAL(&got, &mask))
    log::warn("thread ", th.tid(), " was bound to CPUs ", sched::cpu_list(bytes, want.size()),
              " and runs on CPUs ",
              sched::cpu_list(reinterpret_cast<const uint8_t*>(&got), sizeof got),
              " (the others do not exist or may not be used here)");
}

}  // namespace lazycr::objects
