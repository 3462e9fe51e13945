// The restore sequence (DESIGN.md section 5), for one process with any number of threads.
//
// Everything that must happen inside the new process is a system call injected through a
// small trampoline page (`syscall; int3`) with common/ptrace.h. Differences from DESIGN.md
// section 5, and why:
// - The child is seized *before* it stops itself. A child that stops first is in a group-stop
//   that PTRACE_DETACH re-enters at the end (the process would stay stopped, and only a
//   SIGCONT, visible to the program, would let it go). Seized first, its SIGSTOP is a
//   signal-delivery-stop that the first injected call suppresses.
// - Pending signals are queued from inside the process (rt_sigqueueinfo/rt_tgsigqueueinfo
//   injected in the target thread), where the kernel accepts every si_code; from outside it
//   refuses si_code >= 0 (SI_USER, kernel codes) and SI_TKILL.
// - The vdso is moved by unmapping everything but the trampoline and calling
//   arch_prctl(ARCH_MAP_VDSO_64) with the image's [vvar] address (two calls), then checked.
// - rseq: registering from the trampoline makes the kernel clear rseq->rseq_cs on the way
//   back to user space (the trampoline is in no critical section). The image's value is
//   written back before the final registers, so a thread dumped inside a critical section
//   is still aborted to its handler as it would have been.
// - Calls are batched: a loop in the trampoline runs a table of system calls and traps once
//   (one ptrace round trip per step instead of one per call; 5,000 areas: 7,582 -> 19).
// - Identical maps need more than mmap at the right place: VMA flags mmap does not set (e.g.
//   VM_NOHUGEPAGE of MAP_STACK thread stacks) are re-applied from the image's VmFlags, and
//   neighbouring areas the original's kernel kept apart (separate anon_vmas) are kept apart
//   (AddressSpace::find_split_runs()).
//
// Steps (names for --fault-inject): see kSteps.
#include "restore/restore.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/prctl.h>
#include <linux/sched.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>

#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/netns.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "common/signals.h"
#include "image-format/image_dir.h"
#include "objects/net_lock.h"
#include "objects/objects.h"
#include "restore/address_space.h"
#include "restore/clone3_tid.h"
#include "restore/fd_passing.h"
#include "restore/ghost_files.h"
#include "restore/internal.h"
#include "restore/memory.h"
#include "restore/open_files.h"
#include "restore/parallel_checks.h"
#include "restore/restoree.h"
#include "restore/shared_files.h"
#include "restore/steps.h"
#include "restore/sysv_shm.h"
#include "restore/template.h"
#include "restore/thread_state.h"
#include "restore/trust.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;

// Every step a restore goes through, in order; --fault-inject=NAME fails at the start of that
// step ("thread-created": after the first extra thread exists; "checks": the checks beside the
// creation of the tree fail once done, reported as "validate").
// Eager trees fork each child right before its memory steps (unmap..protect), lazy ones all at
// "fork"; "uffd", "server" and "server-ready" are lazy only.
[[maybe_unused]] constexpr const char* kSteps =
    "validate files create seize pin trampoline rseq close-fds session fork unmap vdso "
    "map-areas uffd server fill protect sysv-shm groups zombie mm after-shaping "
    "process-state sigactions fds objects-fds thread-state objects-leader threads "
    "thread-created objects-threads signals rlimits credentials unmap-trampoline release "
    "registers detach server-ready";

constexpr size_t kKernelSigactionSize = 32;  // handler, flags, restorer, mask
constexpr uint64_t kRseqFlagUnregister = 1;  // RSEQ_FLAG_UNREGISTER

// Process-wide settings: personality, umask, cwd, dumpable, THP and no_new_privs (the last
// is per thread but inherited: set before any other thread exists).
void restore_process_state(Restoree& r, const image::Process& p, const GhostFiles& ghosts) {
  r.reset_arena();
  std::vector<Call> calls;
  calls.push_back(make_call(cat("prctl(PR_SET_DUMPABLE, ", p.dumpable() ? 1 : 0, ")"), SYS_prctl,
                            PR_SET_DUMPABLE, p.dumpable() ? 1 : 0));
  if (p.thp_disable() != 0)
    calls.push_back(make_call("prctl(PR_SET_THP_DISABLE, 1)", SYS_prctl, PR_SET_THP_DISABLE, 1));
  if (p.creds().no_new_privs())
    calls.push_back(make_call("prctl(PR_SET_NO_NEW_PRIVS, 1)", SYS_prctl, PR_SET_NO_NEW_PRIVS, 1));
  unsigned long ours = static_cast<unsigned long>(::personality(0xffffffff));
  if (p.personality() != ours)
    calls.push_back(make_call(cat("personality(", hex(p.personality()), ")"), SYS_personality,
                              p.personality()));
  calls.push_back(make_call(cat("umask(0", std::oct, p.umask(), ")"), SYS_umask, p.umask()));
  // As the process: lazycr's root would let it into a directory it could not enter itself.
  if (p.cwd_ghost_id() != 0) {  // recreated and removed by lazycr (ghost_files.h)
    calls.push_back(ghosts.chdir_call(r, p));
  } else {
    push_enter_identity(r, p.creds(), calls);
    calls.push_back(make_call(cat("chdir(", p.cwd(), ")"), SYS_chdir, r.push_string(p.cwd())));
    push_leave_identity(r, calls);
  }
  r.batch(calls);
}

void restore_sigactions(Restoree& r, const image::Process& p) {
  std::vector<uint64_t> table(64 * 4, 0);
  std::vector<int> to_set;
  for (const auto& a : p.sigactions()) {
    uint64_t* k = &table[(a.signo() - 1) * 4];
    k[0] = a.handler();
    k[1] = a.flags();
    k[2] = a.restorer();
    k[3] = a.mask();
    // The new process inherited our actions: only the ones that differ need a call.
    uint64_t mine[4] = {0, 0, 0, 0};
    if (::syscall(SYS_rt_sigaction, a.signo(), nullptr, mine, 8) != 0 ||
        std::memcmp(mine, k, sizeof mine) != 0)
      to_set.push_back(a.signo());
  }
  if (to_set.empty()) return;
  r.reset_arena();
  uint64_t base = r.push(table.data(), table.size() * 8);
  std::vector<Call> calls;
  for (int sig : to_set)
    calls.push_back(make_call(cat("rt_sigaction(", sig, ")"), SYS_rt_sigaction,
                              static_cast<uint64_t>(sig), base + (sig - 1) * kKernelSigactionSize,
                              0, 8));
  r.batch(calls);
}

// The channel descriptions made by lazycr (shared_files.h) reach the processes through: a
// socket pair whose one end every process of the tree inherits (the root from lazycr at
// creation, the others from their parent at fork), at `fd_in_tree`, a number above every
// descriptor of the image. Each process closes it once its descriptors are in place.
struct FdTransport {
  UniqueFd ours;
  UniqueFd theirs;      // lazycr's copy of the end the tree inherits (closed once inherited)
  int fd_in_tree = -1;  // its number in the processes
  int high = 0;         // numbers from here up are free in every process while fds are placed
};

// File descriptors at their numbers with flags and positions. Three kinds (shared_files.h):
// lazycr's own fds 0-2 kept (--shell-job), descriptions made by lazycr and passed over the
// transport, and files opened inside the process by path. Passed descriptors are first moved
// above every number the image uses, so that placing one never closes another not yet placed.
// An open takes the lowest free number, which is known here (the process's fd table is read
// first), so each open is followed in the same batch by the dup3 + close that moves it where
// it belongs; the numbers the opens got are checked afterwards.
void restore_fds(Restoree& r, const image::Process& p, bool shell_job, const SharedFiles& shared,
                 const FdTransport& transport) {
  std::map<int, const image::FileDescriptor*> by_fd;
  std::map<int, FdPlan> plans;
  for (const auto& f : p.fds()) {
    plans[f.fd()] = shared.plan(p.pid(), f);
    if (plans[f.fd()].source != FdPlan::kObjects) by_fd[f.fd()] = &f;  // made by objects/
  }
  std::vector<Call> calls;
  // lazycr's standard descriptors: kept where they are, copied where the image has a dup.
  for (auto it = by_fd.begin(); it != by_fd.end();) {
    const FdPlan& plan = plans.at(it->first);
    if (plan.source != FdPlan::kLazycrStd) {
      ++it;
      continue;
    }
    const auto& f = *it->second;
    if (!shell_job || plan.fd < 0 || plan.fd > 2)
      fail("fd ", f.fd(), ": no descriptor of lazycr's to give (--shell-job)");
    if (f.fd() == plan.fd)
      calls.push_back(make_call(cat("fcntl(", f.fd(), ", F_SETFD)"), SYS_fcntl,
                                static_cast<uint64_t>(f.fd()), F_SETFD,
                                f.cloexec() ? FD_CLOEXEC : 0));
    else
      calls.push_back(make_call(cat("dup3(", plan.fd, ", ", f.fd(), ")"), SYS_dup3,
                                static_cast<uint64_t>(plan.fd), static_cast<uint64_t>(f.fd()),
                                f.cloexec() ? O_CLOEXEC : 0));
    it = by_fd.erase(it);
  }
  if (shell_job)
    for (int fd = 0; fd <= 2; fd++)
      if (!by_fd.count(fd) && !plans.count(fd))
        calls.push_back(make_call(cat("close(", fd, ")"), SYS_close, static_cast<uint64_t>(fd)));
  if (!calls.empty()) {
    r.reset_arena();
    r.batch(calls);
    calls.clear();
  }

  // Descriptions made by lazycr: received, moved up, then placed.
  std::vector<const image::FileDescriptor*> passed;
  for (const auto& [num, fp] : by_fd)
    if (plans.at(num).source == FdPlan::kShared) passed.push_back(fp);
  std::vector<long> high;  // where each passed descriptor waits
  for (size_t i = 0; i < passed.size(); i += kFdsPerMessage) {
    std::vector<int> mine;
    for (size_t k = i; k < std::min(passed.size(), i + kFdsPerMessage); k++)
      mine.push_back(plans.at(passed[k]->fd()).fd);
    send_fds(transport.ours.get(), mine);
    std::vector<int> got = receive_fds(r, transport.fd_in_tree, mine.size());
    r.reset_arena();
    for (int fd : got) {
      calls.push_back(make_call(cat("fcntl(", fd, ", F_DUPFD_CLOEXEC)"), SYS_fcntl,
                                static_cast<uint64_t>(fd), F_DUPFD_CLOEXEC,
                                static_cast<uint64_t>(transport.high)));
      calls.push_back(make_call(cat("close(", fd, ")"), SYS_close, static_cast<uint64_t>(fd)));
    }
    std::vector<long> res = r.batch(calls);
    for (size_t k = 0; k < got.size(); k++) high.push_back(res[k * 2]);
    calls.clear();
  }
  for (size_t k = 0; k < passed.size(); k++) {
    const auto& f = *passed[k];
    calls.push_back(make_call(cat("dup3 of the passed description to fd ", f.fd()), SYS_dup3,
                              static_cast<uint64_t>(high[k]), static_cast<uint64_t>(f.fd()),
                              f.cloexec() ? O_CLOEXEC : 0));
    calls.push_back(
        make_call(cat("close(", high[k], ")"), SYS_close, static_cast<uint64_t>(high[k])));
    by_fd.erase(f.fd());
  }
  if (transport.fd_in_tree >= 0)
    calls.push_back(make_call("close of the descriptor transport", SYS_close,
                              static_cast<uint64_t>(transport.fd_in_tree)));
  if (!calls.empty()) {
    r.reset_arena();
    r.batch(calls);
    calls.clear();
  }

  // Opened inside by path, as the process (open_files.h), above every number of the image,
  // then placed.
  std::vector<OpenRequest> reqs;
  std::vector<const image::FileDescriptor*> opened;
  int min_fd = 3;
  for (const auto& f : p.fds()) min_fd = std::max(min_fd, f.fd() + 1);
  for (const auto& [num, fp] : by_fd) {
    if (!fp->restorable()) fail("fd ", num, " (", fp->target(), ") cannot be restored");
    reqs.push_back(request_for_fd(*fp));
    opened.push_back(fp);
  }
  std::vector<long> fds = open_as_process(r, p.creds(), reqs, min_fd);
  r.reset_arena();
  push_place_fds(opened, fds, calls);
  if (!calls.empty()) r.batch(calls);
}

// Sessions and process groups, in an order that makes them possible (validate_tree() refused
// the shapes it cannot make): a process that led its session calls setsid() as soon as it
// exists, before it forks its children, which inherit the session; once every process exists,
// group leaders make their groups, then the members join them. A group whose leader is not in
// the image is the root's: every process created in it stays there. A root that led neither
// its session nor its group stays in lazycr's (--shell-job: a job started from a shell).
void start_session(Restoree& r, const image::Process& p, bool is_root) {
  if (p.sid() != p.pid()) {
    if (is_root)
      log::info("pid ", p.pid(), ": session ", p.sid(), " is not in the image; it joins lazycr's");
    return;
  }
  r.inject("setsid", SYS_setsid);
}

// The groups led by processes of the image (they get their group back).
std::set<int> restored_group_leaders(const std::vector<image::Process>& procs) {
  std::set<int> out;
  for (const auto& p : procs)
    if (p.pgid() == p.pid()) out.insert(p.pid());
  return out;
}

// pass 0: leaders make their group; pass 1: members join theirs.
void join_group(Restoree& r, const image::Process& p, const std::set<int>& leaders, int pass) {
  const bool leader = leaders.count(p.pid()) > 0;
  if (pass == 0 && leader && p.sid() != p.pid())  // setsid() made session leaders group leaders
    r.inject("setpgid(0, 0)", SYS_setpgid, 0, 0);
  if (pass == 1 && !leader && leaders.count(p.pgid()))
    r.inject(cat("setpgid(0, ", p.pgid(), ")"), SYS_setpgid, 0, static_cast<uint64_t>(p.pgid()));
}

// Queues the recorded pending signals from inside the process (see the top of this file): a
// thread's own in that thread, the process's in the leader, each queue in its order.
void restore_pending(Restoree& r, const image::Process& p) {
  for (auto& c : r.threads()) {
    r.reset_arena();
    std::vector<Call> calls;
    for (const auto& s : c.img->pending())
      calls.push_back(make_call(cat("rt_tgsigqueueinfo(", s.signo(), ")"), SYS_rt_tgsigqueueinfo,
                                static_cast<uint64_t>(r.vpid()), static_cast<uint64_t>(c.vtid),
                                static_cast<uint64_t>(s.signo()),
                                r.push(s.siginfo().data(), s.siginfo().size())));
    if (&c == &r.leader())
      for (const auto& s : p.shared_pending())
        calls.push_back(make_call(cat("rt_sigqueueinfo(", s.signo(), ")"), SYS_rt_sigqueueinfo,
                                  static_cast<uint64_t>(r.vpid()), static_cast<uint64_t>(s.signo()),
                                  r.push(s.siginfo().data(), s.siginfo().size())));
    if (!calls.empty()) r.batch(c, calls);
  }
}

void restore_rlimits(Restoree& r, const image::Process& p) {
  for (const auto& l : p.rlimits()) {
    struct rlimit64 lim {
      l.cur(), l.max()
    };
    if (::syscall(SYS_prlimit64, r.pid(), l.resource(), &lim, nullptr) != 0)
      fail_errno("prlimit(", l.resource(), ", ", l.cur(), ", ", l.max(), ")");
  }
}

// The image's credentials, last: once a thread is another user it can no longer do what the
// restore needs (clone3 with set_tid, raising rlimits). Raw syscalls change only the calling
// thread, so each thread does it for itself; threads of one process share the same ones.
void restore_credentials(Restoree& r, const image::Process& p) {
  const auto& c = p.creds();
  if (c.uids_size() != 4 || c.gids_size() != 4) fail("the image's uids/gids are incomplete");
  proc::Status me = proc::read_status(::getpid());
  bool same =
      std::equal(c.uids().begin(), c.uids().end(), me.uids.begin(), me.uids.end()) &&
      std::equal(c.gids().begin(), c.gids().end(), me.gids.begin(), me.gids.end()) &&
      std::equal(c.groups().begin(), c.groups().end(), me.groups.begin(), me.groups.end()) &&
      c.cap_effective() == me.cap_eff && c.cap_permitted() == me.cap_prm &&
      c.cap_inheritable() == me.cap_inh && c.cap_bounding() == me.cap_bnd &&
      c.cap_ambient() == me.cap_amb;
  if (same) return;  // the new process has lazycr's, which are the image's
  int last_cap = std::stoi(proc::read_file("/proc/sys/kernel/cap_last_cap"));
  std::vector<uint32_t> groups(c.groups().begin(), c.groups().end());
  struct {
    uint32_t version = _LINUX_CAPABILITY_VERSION_3;
    int32_t pid = 0;
  } header;
  uint32_t data[6] = {static_cast<uint32_t>(c.cap_effective()),
                      static_cast<uint32_t>(c.cap_permitted()),
                      static_cast<uint32_t>(c.cap_inheritable()),
                      static_cast<uint32_t>(c.cap_effective() >> 32),
                      static_cast<uint32_t>(c.cap_permitted() >> 32),
                      static_cast<uint32_t>(c.cap_inheritable() >> 32)};
  for (auto& t : r.threads()) {
    r.reset_arena();
    uint64_t groups_at = groups.empty() ? 0 : r.push(groups.data(), groups.size() * 4);
    uint64_t header_at = r.push(&header, sizeof header);
    uint64_t data_at = r.push(data, sizeof data);
    // Keep the permitted set across the change of uid; capset then trims it to the image's.
    r.call(t, "prctl(PR_SET_KEEPCAPS, 1)", SYS_prctl, PR_SET_KEEPCAPS, 1);
    for (int cap = 0; cap <= last_cap && cap < 64; cap++)
      if (!(c.cap_bounding() & (uint64_t{1} << cap)))
        r.call(t, cat("prctl(PR_CAPBSET_DROP, ", cap, ")"), SYS_prctl, PR_CAPBSET_DROP,
               static_cast<uint64_t>(cap));
    r.call(t, cat("setgroups(", groups.size(), " groups)"), SYS_setgroups, groups.size(),
           groups_at);
    r.call(t, cat("setresgid(", c.gids(0), ", ", c.gids(1), ", ", c.gids(2), ")"), SYS_setresgid,
           c.gids(0), c.gids(1), c.gids(2));
    r.call(t, cat("setfsgid(", c.gids(3), ")"), SYS_setfsgid, c.gids(3));
    r.call(t, cat("setresuid(", c.uids(0), ", ", c.uids(1), ", ", c.uids(2), ")"), SYS_setresuid,
           c.uids(0), c.uids(1), c.uids(2));
    r.call(t, cat("setfsuid(", c.uids(3), ")"), SYS_setfsuid, c.uids(3));
    r.call(t, "capset", SYS_capset, header_at, data_at);
    for (int cap = 0; cap <= last_cap && cap < 64; cap++)
      if (c.cap_ambient() & (uint64_t{1} << cap))
        r.call(t, cat("prctl(PR_CAP_AMBIENT_RAISE, ", cap, ")"), SYS_prctl, PR_CAP_AMBIENT,
               PR_CAP_AMBIENT_RAISE, static_cast<uint64_t>(cap), 0, 0);
    r.call(t, "prctl(PR_SET_KEEPCAPS, 0)", SYS_prctl, PR_SET_KEEPCAPS, 0);
  }
  // A change of effective ids resets the dumpable flag.
  r.inject(cat("prctl(PR_SET_DUMPABLE, ", p.dumpable() ? 1 : 0, ")"), SYS_prctl, PR_SET_DUMPABLE,
           p.dumpable() ? 1 : 0);
}

void set_mm(Restoree& r, const image::Process& p, const GhostFiles& ghosts) {
  const auto& mm = p.mm();
  OpenRequest req;
  req.path = p.exe().path();
  req.flags = O_RDONLY;
  req.id = &p.exe();
  req.strict = true;
  req.what = "executable";
  long exe = p.exe_ghost_id() != 0 ? ghosts.open_in(r, p.exe_ghost_id(), O_RDONLY,
                                                    cat("the deleted executable ", p.exe().path()))
                                   : open_as_process(r, p.creds(), {req}, 0).at(0);
  struct prctl_mm_map m;
  std::memset(&m, 0, sizeof m);
  m.start_code = mm.start_code();
  m.end_code = mm.end_code();
  m.start_data = mm.start_data();
  m.end_data = mm.end_data();
  m.start_brk = mm.start_brk();
  m.brk = mm.brk();
  m.start_stack = mm.start_stack();
  m.arg_start = mm.arg_start();
  m.arg_end = mm.arg_end();
  m.env_start = mm.env_start();
  m.env_end = mm.env_end();
  m.auxv_size = static_cast<uint32_t>(p.auxv().size());
  m.exe_fd = static_cast<uint32_t>(exe);
  r.reset_arena();
  m.auxv = reinterpret_cast<__u64*>(r.push(p.auxv().data(), p.auxv().size()));
  uint64_t base = r.push(&m, sizeof m);
  r.inject(
      cat("prctl(PR_SET_MM, PR_SET_MM_MAP) with brk ", hex(mm.brk()), ", exe ", p.exe().path()),
      SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, base, sizeof m, 0);
  r.inject("close of the exe descriptor", SYS_close, static_cast<uint64_t>(exe));
}

// The image's rseq_cs word of a thread, from the page store (0 if the page was not stored).
std::optional<uint64_t> image_rseq_cs(const image::PageStoreReader& store, uint64_t rseq_ptr) {
  uint64_t addr = rseq_ptr + 8;
  uint64_t page = addr & ~uint64_t{kPageSize - 1};
  if (addr + 8 > page + kPageSize) return std::nullopt;
  if (!store.find(page)) return std::nullopt;
  std::vector<char> buf(kPageSize);
  store.read(page, 1, buf.data());
  uint64_t v;
  std::memcpy(&v, buf.data() + (addr - page), 8);
  return v;
}

// One process of the tree under construction. Members are destroyed in reverse order: the
// address space (it refers to the process), the process (killed and reaped unless committed),
// then its memory strategy (a lazy one lets go of its page server once the process is gone).
struct Task {
  const image::Process* p = nullptr;
  size_t parent = 0;  // index in Tree::tasks (the root's is its own, 0)
  std::string who;
  std::unique_ptr<MemoryStrategy> strategy;
  std::unique_ptr<Restoree> r;
  std::unique_ptr<AddressSpace> space;
  bool live() const { return !p->zombie(); }
};

// lazycr is the child subreaper while it builds a tree: should the restore fail, a process
// whose parent is killed becomes lazycr's child and is reaped here, not left to a PID 1 that
// may never reap it.
class SubreaperWhileBuilding {
 public:
  explicit SubreaperWhileBuilding(bool tree) {
    if (!tree) return;
    int prev = 0;
    if (::prctl(PR_GET_CHILD_SUBREAPER, &prev, 0, 0, 0) != 0) fail_errno("PR_GET_CHILD_SUBREAPER");
    if (prev) return;
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) fail_errno("PR_SET_CHILD_SUBREAPER");
    set_ = true;
  }
  ~SubreaperWhileBuilding() {
    if (set_) ::prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0);
  }

 private:
  bool set_ = false;
};

// The processes of the image, parents before children (the inventory's order). A failure
// kills every process first, then reaps parents before children: a child whose parent was
// reaped is lazycr's (see SubreaperWhileBuilding), so the tracer's wait reaps it for good.
class Tree {
 public:
  Tree() = default;
  Tree(const Tree&) = delete;
  Tree& operator=(const Tree&) = delete;
  ~Tree() {
    kill();
    for (auto& t : tasks) {
      t->space.reset();
      t->r->reap_zombie();  // after its parent, reaped just before (preorder)
      t->r.reset();
      t->strategy.reset();
    }
  }
  // Every process killed, and the exits of those we trace collected.
  void kill() {
    for (auto& t : tasks) t->r->kill();
    for (auto& t : tasks) t->r->reap_traced();
  }
  std::vector<std::unique_ptr<Task>> tasks;
};

// The areas `child` can keep from `parent` when it is forked once the parent's memory is
// restored (eager): same place, same anonymous kind and attributes (a shared one: the same
// object), and passed on by fork at all (not MADV_DONTFORK or MADV_WIPEONFORK in the parent).
// By start address.
std::set<uint64_t> inheritable_areas(const image::Process& parent, const image::Process& child) {
  std::map<uint64_t, const MemoryArea*> by_start;
  for (const auto& a : parent.areas()) by_start[a.start()] = &a;
  std::set<uint64_t> out;
  for (const auto& c : child.areas()) {
    if (c.kind() != MemoryArea::ANON && c.kind() != MemoryArea::HEAP &&
        c.kind() != MemoryArea::STACK && c.kind() != MemoryArea::SHARED_ANON)
      continue;
    auto it = by_start.find(c.start());
    if (it == by_start.end()) continue;
    const MemoryArea& b = *it->second;
    std::istringstream flags(b.vmflags());
    std::string f;
    bool passed_on = true;
    while (flags >> f) passed_on &= f != "dc" && f != "wf";
    if (passed_on && b.end() == c.end() && b.kind() == c.kind() && b.prot() == c.prot() &&
        b.shared() == c.shared() && b.growsdown() == c.growsdown() && b.name() == c.name() &&
        b.vmflags() == c.vmflags() && b.pgoff() == c.pgoff() && b.file().dev() == c.file().dev() &&
        b.file().inode() == c.file().inode())
      out.insert(c.start());
  }
  return out;
}

// The vdso block is where the parent's is (a forked child that did not exec).
bool same_vdso_block(const image::Process& parent, const image::Process& child) {
  auto block = [](const image::Process& p) {
    std::vector<std::pair<uint64_t, uint64_t>> v;
    for (const auto& a : p.areas())
      if (is_vdso_block(a)) v.push_back({a.start(), a.end()});
    return v;
  };
  return !block(child).empty() && block(child) == block(parent);
}

void consume_sigchld(Restoree& r) {
  uint64_t set = uint64_t{1} << (SIGCHLD - 1);
  struct timespec none {
    0, 0
  };
  r.reset_arena();
  uint64_t set_at = r.push(&set, sizeof set);
  uint64_t ts_at = r.push(&none, sizeof none);
  long got = r.inject_raw(SYS_rt_sigtimedwait, set_at, 0, ts_at, sizeof set);
  if (got != SIGCHLD && got != -EAGAIN)
    fail_errno_value(got < 0 ? static_cast<int>(-got) : EIO,
                     "rt_sigtimedwait for the SIGCHLD of the zombie children");
}

}  // namespace

Restored restore(const RestoreOptions& opts_in) {
  const uint64_t t0 = now_ns();
  RestoreOptions opts = opts_in;
  if (opts.start_ns == 0) opts.start_ns = t0;
  Steps steps(opts.fault_inject);
  Sha256Loader sha256_loader;
  std::unique_ptr<image::ImageReader> img;
  steps.run("validate", cat("image ", opts.dir),
            [&] { img = std::make_unique<image::ImageReader>(opts.dir); });
  sha256_loader.join();
  const std::vector<image::Process>& procs = img->processes();
  const image::Process& root = procs.front();
  // The lazy probe and the MAC decide nothing about what is made: they run beside it.
  ParallelChecks checks;
  steps.on_failure([&] { checks.join(); });
  steps.run("validate", cat("pid ", root.pid()), [&] {
    stand_in_for_unsupported_fds(img->mutable_processes(), opts);
    validate_image(*img, opts);  // first: its refusals come before the MAC's, as they did
    checks.start(*img, opts, cat("pid ", root.pid()));
    if (files_reach_outside(*img, opts)) checks.join();
  });
  const uint64_t t_valid = now_ns();
  if (opts.lazy.enabled) opts.preread = EagerPreread::start(*img);
  // Pipes, sockets and shared descriptions, made by lazycr before any process exists.
  std::unique_ptr<GhostFiles> ghosts;
  std::unique_ptr<SharedFiles> shared;
  FdTransport transport;
  UniqueFd netns;  // --netns: sockets are made in it, the root is cloned into it
  steps.run("files", cat("image ", opts.dir), [&] {
    if (opts.netns) netns = make_network_namespace();
    InNetworkNamespace in_netns(netns.get());
    ghosts = std::make_unique<GhostFiles>(procs, img->shared());
    shared = std::make_unique<SharedFiles>(procs, img->shared(), opts.shell_job, ghosts.get(),
                                           opts.ext_unix_sk);
    if (shared->size() == 0) return;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0)
      fail_errno("socketpair for passing descriptors");
    transport.ours.reset(sv[0]);
    transport.theirs.reset(sv[1]);
    int max_fd = 2;
    for (const auto& q : procs)
      for (const auto& f : q.fds()) max_fd = std::max(max_fd, f.fd());
    transport.fd_in_tree = max_fd + 1;
    transport.high = max_fd + 2;
  });
  // --netns: the connections live in the new namespace now; a network lock the dump left in
  // lazycr's own (objects/net_lock.h) would drop their 4-tuples there for ever.
  if (opts.netns) objects::unlock_connections(img->shared().inet_sockets());

  SubreaperWhileBuilding subreaper(procs.size() > 1);
  // Declared before the processes: on failure they are killed (and reaped) first, then the
  // page server, finding them gone, ends.
  std::unique_ptr<LazyServerGroup> lazy_group;
  SharedObjectMap shared_objects;  // shared memory objects of the tree, as they are created
  SysvSegments sysv_segments(img->shared());
  Tree tree;
  std::map<int, size_t> index_of;
  for (size_t i = 0; i < procs.size(); i++) {
    auto t = std::make_unique<Task>();
    t->p = &procs[i];
    t->who = cat("pid ", procs[i].pid());
    t->r = std::make_unique<Restoree>(procs[i]);
    if (i > 0) t->parent = index_of.at(procs[i].ppid());  // validated: parents come first
    index_of[procs[i].pid()] = i;
    tree.tasks.push_back(std::move(t));
  }
  Task& rt = *tree.tasks.front();
  Restoree& r0 = *rt.r;
  // A page server failing to start kills the processes, often while a step works on one:
  // its message is the cause, reported as the step that waits for it would. It comes once
  // the processes are gone, and we trace them: they are killed and collected first (the
  // restore fails anyway).
  steps.on_failure([&] {
    if (!lazy_group || !lazy_group->server_pending()) return;
    // Our own failure, the processes alive: the server did not cause it.
    if (std::none_of(tree.tasks.begin(), tree.tasks.end(), [](const auto& t) {
          return t->live() && t->r->pid() > 0 && proc::exiting(t->r->pid());
        }))
      return;
    tree.kill();
    try {
      lazy_group->raise_server_failure();
    } catch (const Error& e) {
      throw Error(cat("restore: server-ready for ", rt.who, ": ", e.what()), e.sys_errno());
    }
  });

  std::unique_ptr<PinSelf> pin;
  steps.run("create", rt.who, [&] {
    InNetworkNamespace in_netns(netns.get());
    spawn_process(root.pid(), opts.pidns, r0.spawn());
  });
  steps.run("seize", rt.who, [&] { r0.seize(); });
  steps.run("pin", rt.who, [&] {
    pin = std::make_unique<PinSelf>();
    if (::sched_setaffinity(r0.pid(), sizeof(cpu_set_t), &pin->pinned()) != 0)
      fail_errno("sched_setaffinity of pid ", r0.pid());
  });
  steps.run("trampoline", rt.who, [&] {
    auto now = proc::parse_maps(proc::read_file(cat("/proc/", r0.pid(), "/maps")));
    r0.map_trampoline(choose_trampoline(now, procs));
  });
  steps.run("rseq", rt.who, [&] {
    auto conf = r0.leader().t.get_rseq();
    if (conf.rseq_abi_pointer != 0)
      r0.inject(cat("rseq unregistration of the inherited area at ", hex(conf.rseq_abi_pointer)),
                SYS_rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, kRseqFlagUnregister,
                conf.signature);
  });
  const int first_free_fd = opts.shell_job ? 3 : 0;
  steps.run("close-fds", rt.who, [&] {
    const int keep = transport.theirs.get();  // -1 without a transport
    if (keep < first_free_fd) {
      r0.inject(cat("close_range(", first_free_fd, ", ~0)"), SYS_close_range,
                static_cast<uint64_t>(first_free_fd), ~0u, 0);
      return;
    }
    if (keep > first_free_fd)
      r0.inject(cat("close_range(", first_free_fd, ", ", keep - 1, ")"), SYS_close_range,
                static_cast<uint64_t>(first_free_fd), static_cast<uint64_t>(keep - 1), 0);
    r0.inject(cat("close_range(", keep + 1, ", ~0)"), SYS_close_range,
              static_cast<uint64_t>(keep + 1), ~0u, 0);
    if (keep != transport.fd_in_tree) {
      long got = r0.inject("fcntl(F_DUPFD_CLOEXEC) of the descriptor transport", SYS_fcntl,
                           static_cast<uint64_t>(keep), F_DUPFD_CLOEXEC,
                           static_cast<uint64_t>(transport.fd_in_tree));
      if (got != transport.fd_in_tree)
        fail("the descriptor transport landed at fd ", got, ", not ", transport.fd_in_tree);
      r0.inject("close of the inherited transport", SYS_close, static_cast<uint64_t>(keep));
    }
    transport.theirs.reset();
  });
  steps.run("session", rt.who, [&] { start_session(r0, root, true); });
  auto each_live = [&](const char* step, auto&& f) {
    for (auto& t : tree.tasks)
      if (t->live()) steps.run(step, t->who, [&] { f(*t); });
  };
  auto fork = [&](Task& t) {
    steps.run("fork", t.who, [&] {
      tree.tasks[t.parent]->r->fork_child(t.p->pid(), *t.r);
      start_session(*t.r, *t.p, false);
    });
  };
  // Everything but what the process keeps from its parent (kept: areas by start address).
  auto unmap = [&](Task& t, const std::set<uint64_t>& kept, bool vdso_kept) {
    Restoree& r = *t.r;
    const uint64_t tr = r.trampoline();
    if (kept.empty() && !vdso_kept) {
      r.inject("munmap below the trampoline", SYS_munmap, 0, tr);
      r.inject("munmap above the trampoline", SYS_munmap, tr + kTrampolineSize,
               kTaskSize - (tr + kTrampolineSize));
    } else {
      std::map<uint64_t, uint64_t> keep;
      for (const auto& a : t.p->areas())
        if (kept.count(a.start()) || (vdso_kept && is_vdso_block(a))) keep[a.start()] = a.end();
      std::vector<Call> calls;
      for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps")))) {
        if (m.start == tr || m.path == "[vsyscall]") continue;
        auto k = keep.find(m.start);
        if (k != keep.end() && k->second == m.end) continue;
        calls.push_back(make_call(cat("munmap of ", hex(m.start), "-", hex(m.end), " ", m.path),
                                  SYS_munmap, m.start, m.end - m.start));
      }
      r.reset_arena();
      r.batch(calls);
      std::set<uint64_t> now;
      for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps"))))
        now.insert(m.start);
      for (const auto& [start, end] : keep)
        if (!now.count(start)) fail("the inherited area at ", hex(start), " is gone");
      return;
    }
    for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps"))))
      if (m.start != tr && m.path != "[vsyscall]")
        fail("area ", hex(m.start), "-", hex(m.end), " ", m.path, " is still mapped");
  };
  auto move_vdso = [&](Task& t) {
    Restoree& r = *t.r;
    const image::Process& p = *t.p;
    uint64_t base = 0;
    for (const auto& a : p.areas())
      if (is_vdso_block(a) && (base == 0 || a.start() < base)) base = a.start();
    if (base == 0) return;  // the image has no vdso: neither will the process
    r.inject(cat("arch_prctl(ARCH_MAP_VDSO_64, ", hex(base), ")"), SYS_arch_prctl, ARCH_MAP_VDSO_64,
             base);
    auto now = proc::parse_maps(proc::read_file(cat("/proc/", r.pid(), "/maps")));
    for (const auto& a : p.areas()) {
      if (!is_vdso_block(a)) continue;
      bool found = false;
      for (const auto& m : now)
        found |= m.start == a.start() && m.end == a.end() && m.path == a.name();
      if (!found)
        fail("the kernel's ", a.name(), " did not land at ", hex(a.start()), "-", hex(a.end()));
    }
  };
  auto make_space = [&](Task& t, std::set<uint64_t> kept, int parent_pid) {
    const image::PageStoreReader& store = img->pages(t.p->pid());
    if (opts.lazy.enabled && !lazy_group)
      lazy_group = std::make_unique<LazyServerGroup>(opts, pin->saved());
    t.strategy = opts.lazy.enabled
                     ? make_lazy_strategy(*t.p, store, opts, pin->saved(), *lazy_group)
                     : make_eager_filler(store, &pin->saved());
    t.space = std::make_unique<AddressSpace>(*t.r, *t.p, *t.strategy, shared_objects, *ghosts,
                                             sysv_segments, std::move(kept), parent_pid);
  };

  const uint64_t t_mem = now_ns();
  if (!opts.lazy.enabled) {
    // Eager: each process is forked once its parent's memory is back, so that it finds the
    // parent's pages in place, shared copy-on-write, and writes only what differs.
    for (size_t i = 0; i < tree.tasks.size(); i++) {
      Task& t = *tree.tasks[i];
      if (i > 0) fork(t);
      if (!t.live()) continue;
      std::set<uint64_t> kept;
      bool vdso_kept = false;
      int parent_pid = 0;
      if (i > 0) {
        const image::Process& parent = *tree.tasks[t.parent]->p;
        kept = inheritable_areas(parent, *t.p);
        vdso_kept = same_vdso_block(parent, *t.p);
        parent_pid = parent.pid();
      }
      steps.run("unmap", t.who, [&] { unmap(t, kept, vdso_kept); });
      steps.run("vdso", t.who, [&] {
        if (!vdso_kept) move_vdso(t);
      });
      make_space(t, kept, parent_pid);
      steps.run("map-areas", t.who, [&] { t.space->map_areas(); });
      steps.run("fill", t.who, [&] { t.strategy->fill_mapped(*t.r); });
      steps.run("protect", t.who, [&] { t.space->protect(); });
    }
  } else {
    // Lazy: every process is forked while its parent is still a bare copy of lazycr with the
    // trampoline (a fork of a process with registered lazy areas would be a userfaultfd FORK
    // event); each owes its own pages, served by one server.
    for (size_t i = 1; i < tree.tasks.size(); i++) fork(*tree.tasks[i]);
    each_live("unmap", [&](Task& t) { unmap(t, {}, false); });
    each_live("vdso", [&](Task& t) { move_vdso(t); });
    for (auto& t : tree.tasks)
      if (t->live()) make_space(*t, {}, 0);
    each_live("map-areas", [&](Task& t) { t.space->map_areas(); });
    // The userfaultfds and the page server come first, so that the server starts up while the
    // rest is filled and shaped.
    each_live("uffd", [&](Task& t) { t.strategy->register_lazy(*t.r); });
    steps.run("server", rt.who, [&] {
      checks.join();  // before the server's fork(): no lock is held by the checks' thread
      for (auto& t : tree.tasks)
        if (t->live()) t->strategy->start_server(*t->r);
      std::vector<std::string> stores;
      for (auto& t : tree.tasks)
        if (t->live()) stores.push_back(img->pages(t->p->pid()).path());
      if (lazy_group) lazy_group->start(r0.pid(), stores);
    });
    each_live("fill", [&](Task& t) { t.strategy->fill_mapped(*t.r); });
    each_live("protect", [&](Task& t) { t.space->protect(); });
  }
  steps.run("sysv-shm", rt.who, [&] { sysv_segments.finish(); });
  const uint64_t memory_ns = now_ns() - t_mem;

  const std::set<int> leaders = restored_group_leaders(procs);
  for (int pass = 0; pass < 2; pass++)
    for (auto& t : tree.tasks)
      steps.run("groups", t->who, [&] { join_group(*t->r, *t->p, leaders, pass); });
  std::set<size_t> zombie_parents;
  for (auto& t : tree.tasks) {
    if (t->live()) continue;
    steps.run("zombie", t->who, [&] { t->r->exit_as_zombie(t->p->exit_status()); });
    zombie_parents.insert(t->parent);
  }
  for (size_t i : zombie_parents) {
    Task& t = *tree.tasks[i];
    steps.run("zombie", t.who, [&] { consume_sigchld(*t.r); });
  }

  each_live("mm", [&](Task& t) { set_mm(*t.r, *t.p, *ghosts); });
  each_live("after-shaping", [&](Task& t) { t.strategy->after_shaping(*t.r); });
  each_live("process-state", [&](Task& t) { restore_process_state(*t.r, *t.p, *ghosts); });
  each_live("sigactions", [&](Task& t) { restore_sigactions(*t.r, *t.p); });
  each_live("fds", [&](Task& t) { restore_fds(*t.r, *t.p, opts.shell_job, *shared, transport); });
  auto objects_at = [&](objects::RestorePoint point) {
    return [point](Task& t) {
      RestoreeRemote remote(*t.r);
      objects::restore_objects(point, remote, *t.p);
    };
  };
  each_live("objects-fds", objects_at(objects::RestorePoint::kFilesInPlace));
  each_live("thread-state", [&](Task& t) { restore_thread_state(*t.r, t.r->leader()); });
  each_live("objects-leader", objects_at(objects::RestorePoint::kBeforeThreads));
  for (auto& tp : tree.tasks) {
    if (!tp->live()) continue;
    Restoree& r = *tp->r;
    const image::Process& p = *tp->p;
    for (int i = 1; i < p.threads_size(); i++) {
      const image::Thread& th = p.threads(i);
      steps.run("threads", cat("tid ", th.tid()), [&] {
        ThreadCtl& c = make_thread_with_tid(r, th);
        steps.check("thread-created");
        restore_thread_state(r, c);
      });
    }
  }
  each_live("objects-threads", objects_at(objects::RestorePoint::kThreadsExist));
  each_live("signals", [&](Task& t) { restore_pending(*t.r, *t.p); });
  each_live("rlimits", [&](Task& t) { restore_rlimits(*t.r, *t.p); });
  each_live("credentials", [&](Task& t) { restore_credentials(*t.r, *t.p); });
  checks.join();  // before the tree can run (or be held as a template)
  // `lazycr template`: everything is built; the template is held here, never released.
  if (opts.hold) return hold_template(opts, *img, r0, pin->saved());
  each_live("unmap-trampoline", [&](Task& t) {
    t.r->inject("prctl(PR_SET_PDEATHSIG, 0)", SYS_prctl, PR_SET_PDEATHSIG, 0);
    objects_at(objects::RestorePoint::kBeforeRelease)(t);
    t.r->unmap_trampoline();
  });
  each_live("release", [&](Task& t) { t.strategy->before_release(*t.r); });
  for (auto& tp : tree.tasks) {
    if (!tp->live()) continue;
    Restoree& r = *tp->r;
    const image::PageStoreReader& store = img->pages(tp->p->pid());
    for (auto& c : r.threads()) {
      steps.run("registers", cat("tid ", c.vtid), [&] {
        const image::Thread& th = *c.img;
        if (th.rseq().rseq_abi_pointer() != 0) {
          if (auto cs = image_rseq_cs(store, th.rseq().rseq_abi_pointer()))
            remote_write(r.pid(), th.rseq().rseq_abi_pointer() + 8, &*cs, sizeof *cs);
        }
        if (!th.xsave().empty())
          c.t.set_xstate(std::vector<uint8_t>(th.xsave().begin(), th.xsave().end()));
        c.t.set_regs(final_regs(th));
        c.t.set_sigmask(th.blocked());
        objects::restore_affinity(c.t.tid(), th, pin->saved());
      });
    }
  }
  steps.run("detach", rt.who, [&] {
    if (opts.before_running) opts.before_running(r0.pid());
    // A stopped job stops again before its first instruction: a SIGSTOP queued while every
    // thread is in a ptrace stop is what a detached thread handles first. (SIGTSTP and the
    // like would be dropped in an orphaned process group.)
    for (auto& t : tree.tasks)
      if (t->live() && t->p->stop_signo() != 0 && !send_signal_pidfd(t->r->pidfd(), SIGSTOP))
        fail_errno("SIGSTOP to pid ", t->p->pid(), " (a stopped job)");
    // Children before parents, other threads before their leader: each process starts as a
    // whole as far as it can, and a parent finds its children there.
    for (size_t k = tree.tasks.size(); k-- > 0;) {
      Task& t = *tree.tasks[k];
      if (!t.live()) continue;
      for (size_t i = t.r->threads().size(); i-- > 0;) t.r->threads()[i].t.detach();
    }
    if (r0.spawn().s.reaper_ctl) {
      char d = 'D';
      if (::write(r0.spawn().s.reaper_ctl.get(), &d, 1) != 1)
        fail_errno("telling the reaper the restore is done");
      // Until the reaper has cleared its PR_SET_PDEATHSIG, our exit (--detach) would kill it
      // and the whole namespace with it. It closes its end of the pipe right after: wait for
      // that (POLLERR on the write end).
      pollfd pf{r0.spawn().s.reaper_ctl.get(), 0, 0};
      int n;
      do {
        n = ::poll(&pf, 1, 10000);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) fail("the namespace's reaper did not take over within 10 s");
    }
  });
  const uint64_t t_running = now_ns();  // every process runs (lazy: the server may start up)
  steps.run("server-ready", rt.who, [&] { lazy_group ? lazy_group->wait_ready() : void(); });

  Restored out;
  for (auto& tp : tree.tasks) {
    if (!tp->live()) continue;
    out.stats.injected_syscalls += tp->r->target_calls();
    out.stats.round_trips += tp->r->injected();
    out.stats.inject_ns += tp->r->inject_ns();
    out.stats.threads += static_cast<uint64_t>(tp->p->threads_size());
    out.stats.areas += static_cast<uint64_t>(tp->p->areas_size());
  }
  std::vector<Spawned> spawned;
  for (auto& tp : tree.tasks)
    if (tp->live()) spawned.push_back(tp->r->commit());
  sysv_segments.keep();
  pin.reset();
  MemoryStats total;
  for (auto& tp : tree.tasks) {
    if (!tp->live()) continue;
    tp->strategy->on_running(*tp->r);
    auto ms = tp->strategy->stats();
    total.pages_written += ms.pages_written;
    total.hot_pages += ms.hot_pages;
    total.lazy_pages += ms.lazy_pages;
    total.lazy_areas += ms.lazy_areas;
    out.stats.lazy_areas += ms.lazy_areas;
    out.stats.lazy_pages += ms.lazy_pages;
    out.stats.hot_pages += ms.hot_pages;
    out.stats.pages_written += ms.pages_written;
    out.stats.bytes_written += ms.bytes_written;
    out.stats.fill_read_ns += ms.read_ns;
    out.stats.fill_write_ns += ms.write_ns;
  }
  if (lazy_group) {
    ServerHandle server = lazy_group->go(spawned.front().pid, total);
    out.server = server.pid;
    out.server_pidfd = std::move(server.pidfd);
  }
  Spawned& s = spawned.front();
  out.stats.first_instruction_ns = t_running - opts.start_ns;
  out.pid = s.pid;
  out.image_pid = s.vpid;
  out.reaper = s.reaper;
  out.child = s.reaper > 0 ? s.reaper : s.pid;
  out.pidfd = std::move(s.pidfd);
  out.stats.validate_ns = t_valid - t0;
  out.stats.memory_ns = memory_ns;
  out.stats.total_ns = t_running - t0;
  return out;
}

int wait_for_server(Restored& restored) {
  if (restored.server <= 0) return 0;
  int status = 0;
  while (::waitpid(restored.server, &status, 0) < 0) {
    if (errno != EINTR) fail_errno("waitpid for the page server (pid ", restored.server, ")");
  }
  restored.server = 0;
  restored.server_pidfd.reset();
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1;
}

int wait_for_exit(Restored& restored) {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT}) sigaddset(&set, sig);
  sigset_t old;
  if (::sigprocmask(SIG_BLOCK, &set, &old) != 0) fail_errno("sigprocmask");
  for (;;) {
    int status = 0;
    pid_t w = ::waitpid(restored.child, &status, WNOHANG);
    if (w == restored.child) {
      ::sigprocmask(SIG_SETMASK, &old, nullptr);
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      continue;
    }
    if (w < 0 && errno != EINTR) fail_errno("waitpid for pid ", restored.child);
    siginfo_t si;
    timespec ts{1, 0};  // SIGCHLD may have come before the mask: look again now and then
    int sig = ::sigtimedwait(&set, &si, &ts);
    if (sig <= 0 || sig == SIGCHLD) continue;
    // From kill(2) (si_code <= 0), not from the terminal, which signals the whole group.
    if (si.si_code <= 0 && restored.pidfd) send_signal_pidfd(restored.pidfd.get(), sig);
  }
}

}  // namespace lazycr::restore
