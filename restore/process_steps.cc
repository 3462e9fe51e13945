// The steps that make one process of an image (process_steps.h); restore.cc says why the
// sequence is as it is.
#include "restore/process_steps.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/prctl.h>
#include <signal.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>
#include <string>

#include "common/error.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/ptrace.h"
#include "objects/objects.h"
#include "restore/address_space.h"
#include "restore/calls.h"
#include "restore/fd_passing.h"
#include "restore/ghost_files.h"
#include "restore/internal.h"
#include "restore/open_files.h"
#include "restore/restoree.h"
#include "restore/shared_files.h"
#include "restore/thread_state.h"
#include "restore/trust.h"

namespace lazycr::restore {
namespace {
constexpr size_t kKernelSigactionSize = 32;  // handler, flags, restorer, mask
}  // namespace

using image::kPageSize;
using image::MemoryArea;

void unregister_inherited_rseq(Restoree& r) {
  auto conf = r.leader().t.get_rseq();
  if (conf.rseq_abi_pointer != 0)
    r.inject(cat("rseq unregistration of the inherited area at ", hex(conf.rseq_abi_pointer)),
             SYS_rseq, conf.rseq_abi_pointer, conf.rseq_abi_size, kRseqFlagUnregister,
             conf.signature);
}

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

void restore_sigactions(Restoree& r, const image::Process& p, bool inherited_from_lazycr) {
  std::vector<uint64_t> table(64 * 4, 0);
  std::vector<int> to_set;
  for (const auto& a : p.sigactions()) {
    uint64_t* k = &table[(a.signo() - 1) * 4];
    k[0] = a.handler();
    k[1] = a.flags();
    k[2] = a.restorer();
    k[3] = a.mask();
    // A process made by lazycr inherited our actions: only the ones that differ need a call.
    uint64_t mine[4] = {0, 0, 0, 0};
    if (!inherited_from_lazycr || ::syscall(SYS_rt_sigaction, a.signo(), nullptr, mine, 8) != 0 ||
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

// A process forked from a restored one (the other processes of a tree clone) has the image's
// executable already; the kernel refuses to replace an executable that is still mapped (EBUSY),
// even by the same file.
static bool exe_in_place(pid_t pid, const image::Process& p) {
  struct stat now, image_exe;
  return p.exe_ghost_id() == 0 && ::stat(cat("/proc/", pid, "/exe").c_str(), &now) == 0 &&
         ::stat(p.exe().path().c_str(), &image_exe) == 0 && now.st_dev == image_exe.st_dev &&
         now.st_ino == image_exe.st_ino;
}

void set_mm(Restoree& r, const image::Process& p, const GhostFiles& ghosts) {
  const auto& mm = p.mm();
  long exe = -1;
  if (!exe_in_place(r.pid(), p)) {
    OpenRequest req;
    req.path = p.exe().path();
    req.flags = O_RDONLY;
    req.id = &p.exe();
    req.strict = true;
    req.what = "executable";
    exe = p.exe_ghost_id() != 0 ? ghosts.open_in(r, p.exe_ghost_id(), O_RDONLY,
                                                 cat("the deleted executable ", p.exe().path()))
                                : open_as_process(r, p.creds(), {req}, 0).at(0);
  }
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
  if (exe >= 0) r.inject("close of the exe descriptor", SYS_close, static_cast<uint64_t>(exe));
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

void unmap_inherited(Restoree& r, const image::Process& p, const std::set<uint64_t>& kept,
                     bool vdso_kept) {
  const uint64_t tr = r.trampoline();
  if (kept.empty() && !vdso_kept) {
    r.inject("munmap below the trampoline", SYS_munmap, 0, tr);
    r.inject("munmap above the trampoline", SYS_munmap, tr + kTrampolineSize,
             kTaskSize - (tr + kTrampolineSize));
  } else {
    std::map<uint64_t, uint64_t> keep;
    for (const auto& a : p.areas())
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
}
void move_vdso(Restoree& r, const image::Process& p) {
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
}

void set_final_thread_state(Restoree& r, ThreadCtl& c, const image::PageStoreReader* store,
                            const cpu_set_t& cpus) {
  const image::Thread& th = *c.img;
  if (store != nullptr && th.rseq().rseq_abi_pointer() != 0) {
    if (auto cs = image_rseq_cs(*store, th.rseq().rseq_abi_pointer()))
      remote_write(r.pid(), th.rseq().rseq_abi_pointer() + 8, &*cs, sizeof *cs);
  }
  if (!th.xsave().empty())
    c.t.set_xstate(std::vector<uint8_t>(th.xsave().begin(), th.xsave().end()));
  c.t.set_regs(final_regs(th));
  c.t.set_sigmask(th.blocked());
  objects::restore_affinity(c.t.tid(), th, cpus);
}

}  // namespace lazycr::restore
