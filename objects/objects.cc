#include "objects/objects.h"

#include "common/error.h"
#include "objects/epoll.h"
#include "objects/fd_kinds.h"
#include "objects/locks.h"
#include "objects/mdwe.h"
#include "objects/pdeathsig.h"
#include "objects/pty.h"
#include "objects/sched.h"
#include "objects/seccomp.h"
#include "objects/timers.h"

namespace lazycr::objects {
namespace {

struct Kind {
  const char* name;
  void (*dump)(RemoteProcess&, image::Process&, DumpContext&);
  void (*restore)(RestorePoint, RemoteProcess&, const image::Process&);
  // Optional: what the kind reads of each thread with the thread's own state (thread_reads).
  ThreadRead (*thread_read)(uint64_t slot) = nullptr;
};

// Every kind of kernel object lazycr records, in the order the restore recreates them at
// each point. Descriptors made inside the process come first (other kinds act on them), then
// locks: nothing of the process may run before they are held. epoll instances need every
// other descriptor in place (they are keyed by target fd number).
constexpr Kind kKinds[] = {
    {"descriptors", dump_fd_kinds, restore_fd_kinds},
    {"file locks", locks::dump, locks::restore},
    {"epoll", epoll::dump, epoll::restore},
    {"seccomp", seccomp::dump, seccomp::restore},
    {"scheduling", sched::dump, sched::restore},
    {"timers", timers::dump, timers::restore},
    {"parent death signal", pdeathsig::dump, pdeathsig::restore, pdeathsig::thread_read},
    {"memory-deny-write-execute", mdwe::dump, mdwe::restore},
    {"controlling terminal", pty::dump_ctty, pty::restore_ctty},
};

}  // namespace

void dump_objects(RemoteProcess& p, image::Process& proc, DumpContext& ctx) {
  for (const Kind& k : kKinds) {
    try {
      k.dump(p, proc, ctx);
    } catch (const Error& e) {
      throw Error(cat("pid ", proc.pid(), ": ", k.name, ": ", e.what()), e.sys_errno());
    }
  }
}

std::vector<ThreadRead> thread_reads(uint64_t first_slot) {
  std::vector<ThreadRead> reads;
  for (const Kind& k : kKinds)
    if (k.thread_read != nullptr) reads.push_back(k.thread_read(first_slot + 8 * reads.size()));
  return reads;
}

void restore_objects(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  for (const Kind& k : kKinds) {
    try {
      k.restore(point, p, proc);
    } catch (const Error& e) {
      throw Error(cat(k.name, ": ", e.what()), e.sys_errno());
    }
  }
}

}  // namespace lazycr::objects
