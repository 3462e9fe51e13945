#include "objects/seccomp.h"

#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#include <cstring>
#include <vector>

#include "common/error.h"
#include "common/proc.h"
#include "common/ptrace.h"

namespace lazycr::objects::seccomp {
namespace {

constexpr int kModeStrict = 1;
constexpr int kModeFilter = 2;
constexpr int kMaxFilters = 32768 / 5;  // MAX_INSNS_PER_PATH / (1 instruction + penalty 4)

image::Thread* image_thread(image::Process& proc, pid_t tid) {
  for (auto& t : *proc.mutable_threads())
    if (t.tid() == tid) return &t;
  fail("thread ", tid, " is not in the image of pid ", proc.pid());
}

const image::Thread* image_thread(const image::Process& proc, pid_t tid) {
  for (const auto& t : proc.threads())
    if (t.tid() == tid) return &t;
  fail("thread ", tid, " is not in the image of pid ", proc.pid());
}

bool same(const image::SeccompFilter& a, const image::SeccompFilter& b) {
  return a.flags() == b.flags() && a.program() == b.program();
}

// A filter that may return SECCOMP_RET_USER_NOTIF hands calls to a listener (a descriptor of
// some supervisor) that a restore cannot give back: without one the kernel fails those calls
// with ENOSYS instead of asking.
bool may_notify_user(const std::vector<sock_filter>& prog) {
  for (const auto& insn : prog)
    if (insn.code == (BPF_RET | BPF_K) &&
        (insn.k & SECCOMP_RET_ACTION_FULL) == SECCOMP_RET_USER_NOTIF)
      return true;
  return false;
}

// The filters of one thread, oldest first. PTRACE_SECCOMP_GET_FILTER's index 0 is the oldest
// (kernel/seccomp.c get_nth_filter() walks back count - index filters from the newest), not
// the newest: the restore installs them in this order.
std::vector<image::SeccompFilter> read_chain(RemoteProcess& p, size_t i, uint32_t expected) {
  std::vector<image::SeccompFilter> chain;
  TracedThread& t = p.traced(i);
  for (unsigned index = 0;; index++) {
    if (index > static_cast<unsigned>(kMaxFilters))
      fail("thread ", p.tid(i), " has more than ", kMaxFilters, " seccomp filters");
    auto prog = t.seccomp_filter(index);
    if (!prog) break;
    if (may_notify_user(*prog))
      fail("thread ", p.tid(i), ": seccomp filter ", index + 1, " of ", expected,
           " can hand system calls to a user-space supervisor (SECCOMP_RET_USER_NOTIF); lazycr "
           "cannot restore its listener");
    image::SeccompFilter f;
    f.set_program(prog->data(), prog->size() * sizeof(sock_filter));
    f.set_flags(static_cast<uint32_t>(t.seccomp_filter_flags(index)));
    chain.push_back(std::move(f));
  }
  if (chain.size() != expected)
    fail("thread ", p.tid(i), ": read ", chain.size(), " seccomp filters, /proc says ", expected);
  return chain;
}

void install(RemoteProcess& p, size_t i, const image::SeccompFilter& f, const std::string& what) {
  // struct sock_fprog (u16 len, then a pointer at offset 8) followed by the program.
  const size_t insns = f.program().size() / sizeof(sock_filter);
  std::vector<uint8_t> buf(16 + f.program().size());
  const uint16_t len = static_cast<uint16_t>(insns);
  std::memcpy(buf.data(), &len, sizeof len);
  std::memcpy(buf.data() + 16, f.program().data(), f.program().size());
  const uint64_t base = p.put(buf.data(), buf.size());  // same address every time
  const uint64_t prog = base + 16;
  std::memcpy(buf.data() + 8, &prog, sizeof prog);
  p.put(buf.data(), buf.size());
  p.call(i, what, SYS_seccomp, SECCOMP_SET_MODE_FILTER, f.flags(), base);
}

// The mode and filter count each thread shows now against the image.
void check_installed(RemoteProcess& p, const image::Process& proc) {
  for (size_t i = 0; i < p.thread_count(); i++) {
    const image::Thread& th = *image_thread(proc, p.image_tid(i));
    proc::Status st = proc::read_status(p.tid(i));
    const uint32_t want =
        th.seccomp_mode() == kModeFilter
            ? static_cast<uint32_t>(proc.seccomp_shared_size() + th.seccomp_filters_size())
            : 0;
    if (st.seccomp != th.seccomp_mode() || st.seccomp_filters != want)
      fail("thread ", th.tid(), " has seccomp mode ", st.seccomp, " with ", st.seccomp_filters,
           " filters after the restore, the image says mode ", th.seccomp_mode(), " with ", want);
  }
}

}  // namespace

void dump(RemoteProcess& p, image::Process& proc, DumpContext&) {
  std::vector<std::vector<image::SeccompFilter>> chains(p.thread_count());
  bool any = false;
  for (size_t i = 0; i < p.thread_count(); i++) {
    proc::Status st = proc::read_status(p.tid(i));
    image::Thread* th = image_thread(proc, p.image_tid(i));
    if (st.seccomp < 0 || st.seccomp > kModeFilter)
      fail("thread ", p.tid(i), " is in an unknown seccomp mode ", st.seccomp);
    th->set_seccomp_mode(st.seccomp);
    if (st.seccomp == kModeFilter) {
      chains[i] = read_chain(p, i, st.seccomp_filters);
      any = true;
    }
  }
  if (!any) return;
  // The oldest filters every thread has: the restore installs them before creating the threads.
  size_t shared = chains[0].size();
  for (const auto& c : chains) {
    size_t n = 0;
    while (n < shared && n < c.size() && same(c[n], chains[0][n])) n++;
    shared = n;
  }
  for (size_t k = 0; k < shared; k++) *proc.add_seccomp_shared() = chains[0][k];
  for (size_t i = 0; i < p.thread_count(); i++) {
    image::Thread* th = image_thread(proc, p.image_tid(i));
    for (size_t k = shared; k < chains[i].size(); k++) *th->add_seccomp_filters() = chains[i][k];
  }
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point == RestorePoint::kBeforeThreads) {
    if (proc.seccomp_shared_size() == 0) return;
    p.suspend_seccomp(0);
    for (int k = 0; k < proc.seccomp_shared_size(); k++)
      install(p, 0, proc.seccomp_shared(k),
              cat("seccomp filter ", k + 1, " of ", proc.seccomp_shared_size(),
                  " shared by every thread"));
    return;
  }
  if (point != RestorePoint::kThreadsExist) return;
  bool any = proc.seccomp_shared_size() > 0;
  for (size_t i = 0; i < p.thread_count(); i++) {
    const image::Thread& th = *image_thread(proc, p.image_tid(i));
    if (th.seccomp_mode() == 0) continue;
    any = true;
    p.suspend_seccomp(i);
    if (th.seccomp_mode() == kModeStrict) {
      p.call(i, "prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)", SYS_prctl, PR_SET_SECCOMP,
             SECCOMP_MODE_STRICT);
      continue;
    }
    for (int k = 0; k < th.seccomp_filters_size(); k++)
      install(p, i, th.seccomp_filters(k),
              cat("seccomp filter ", k + 1, " of ", th.seccomp_filters_size(), " of thread ",
                  th.tid()));
  }
  if (any) check_installed(p, proc);
}

}  // namespace lazycr::objects::seccomp
