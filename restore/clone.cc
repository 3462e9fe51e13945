#include "restore/clone.h"

#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "common/linux_abi.h"
#include "common/log.h"
#include "common/netns.h"
#include "common/proc.h"
#include "common/signals.h"
#include "objects/objects.h"
#include "restore/calls.h"
#include "restore/clone3_tid.h"
#include "restore/clone_dontfork.h"
#include "restore/clone_fds.h"
#include "restore/clone_shared_memory.h"
#include "restore/clone_tree.h"
#include "restore/open_files.h"
#include "restore/process_steps.h"
#include "restore/restoree.h"
#include "restore/thread_state.h"

namespace lazycr::restore {
namespace {

// PID 1 of a clone's namespace: a copy of lazycr made by clone3 (raw system calls only). It
// dies with lazycr until it reads the clone's pid (in its namespace) on `ctl`; from then on it
// outlives lazycr, reaps the orphans of the clone's namespace and exits once the clone is gone
// (which ends the namespace, as a restore --pidns does). EOF on `ctl`: the clone failed.
[[noreturn]] void reaper_main(int ctl) {
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  for (int fd = 0; fd < ctl; fd++) ::syscall(SYS_close, fd);
  ::syscall(SYS_close_range, ctl + 1, ~0u, 0);
  int32_t pid = 0;
  long n;
  do {
    n = ::syscall(SYS_read, ctl, &pid, sizeof pid);
  } while (n < 0 && errno == EINTR);
  if (n != sizeof pid || pid <= 1) ::syscall(SYS_exit_group, 1);
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, 0, 0, 0, 0);
  ::syscall(SYS_close, ctl);
  uint64_t chld = 1ull << (SIGCHLD - 1);
  ::syscall(SYS_rt_sigprocmask, SIG_BLOCK, &chld, nullptr, 8);
  long sfd = ::syscall(SYS_signalfd4, -1, &chld, 8, SFD_CLOEXEC | SFD_NONBLOCK);
  long pidfd = ::syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0 || sfd < 0) ::syscall(SYS_exit_group, 0);  // the clone is gone already
  for (;;) {
    struct pollfd pf[2] = {{static_cast<int>(pidfd), POLLIN, 0},
                           {static_cast<int>(sfd), POLLIN, 0}};
    ::syscall(SYS_poll, pf, 2, -1);
    char buf[128];
    while (::syscall(SYS_read, sfd, buf, sizeof buf) > 0) {
    }
    int status;
    while (::syscall(SYS_wait4, -1, &status, WNOHANG | __WALL, nullptr) > 0) {
    }
    if (pf[0].revents) ::syscall(SYS_exit_group, 0);
  }
}

}  // namespace

// The clone's namespace and its reaper; killed and reaped unless released.
struct NsReaper {
  pid_t pid = 0;
  UniqueFd pidfd;
  UniqueFd ctl;  // write end
  bool released = false;
  ~NsReaper() {
    if (pid <= 0 || released) return;
    ctl.reset();
    send_signal_pidfd(pidfd.get(), SIGKILL);
    int status;
    while (::waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {
    }
  }
};

static void make_reaper(NsReaper& r) {
  int ctl[2];
  if (::pipe2(ctl, O_CLOEXEC) != 0) fail_errno("pipe2");
  UniqueFd rd(ctl[0]);
  r.ctl.reset(ctl[1]);
  int pidfd = -1;
  abi::clone_args args;
  std::memset(&args, 0, sizeof args);
  args.flags = CLONE_NEWPID | CLONE_PIDFD;
  args.pidfd = reinterpret_cast<uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  long got = ::syscall(SYS_clone3, &args, sizeof args);
  if (got == 0) reaper_main(ctl[0]);
  if (got < 0) fail_errno("clone3(CLONE_NEWPID) for the clone's namespace");
  r.pid = static_cast<pid_t>(got);
  r.pidfd.reset(pidfd);
}

// The template's children from now on in the PID namespace of `ns`'s reaper.
static void enter_namespace(Restoree& tpl, const NsReaper& ns) {
  tpl.reset_arena();
  long nsfd = tpl.inject(cat("open of the pid namespace of reaper ", ns.pid), SYS_openat,
                         static_cast<uint64_t>(AT_FDCWD),
                         tpl.put_string(cat("/proc/", ns.pid, "/ns/pid")), O_RDONLY | O_CLOEXEC);
  long set = tpl.inject_raw(SYS_setns, static_cast<uint64_t>(nsfd), CLONE_NEWPID);
  tpl.inject("close of the pid namespace", SYS_close, static_cast<uint64_t>(nsfd));
  if (set < 0) fail_errno_value(static_cast<int>(-set), "setns(CLONE_NEWPID) in the template");
}

static bool alive(const NsReaper& ns) {
  pollfd pf{ns.pidfd.get(), POLLIN, 0};
  return ::poll(&pf, 1, 0) == 0;
}

void NsReaperDeleter::operator()(NsReaper* r) const noexcept {
  delete r;
}

PreparedNs prepare_clone_namespace(HeldTemplate& t) {
  PreparedNs ns(new NsReaper);
  make_reaper(*ns);
  enter_namespace(t.root, *ns);
  return ns;
}

static void check_clonable_process(const image::ImageReader& img, const image::Process& p,
                                   bool shell_job) {
  const std::string who = cat("pid ", p.pid());
  if (p.shared_pending_size() != 0) fail(who, " has pending signals (a fork does not copy them)");
  for (const auto& th : p.threads()) {
    if (th.pending_size() != 0)
      fail("tid ", th.tid(), " has pending signals (a fork does not copy them)");
    // The fork copies the leader's filters, which recreated threads inherit: only filters
    // every thread shares are given back to a clone as they were.
    if (th.seccomp_filters_size() != 0 || (th.seccomp_mode() != 0 && p.seccomp_shared_size() == 0))
      fail("tid ", th.tid(), " has seccomp state of its own: not given back to clones yet");
  }
  if (p.posix_timers_size() != 0 || p.itimers_size() != 0)
    fail(who, " has timers (a fork does not copy them)");
  if (p.stop_signo() != 0) fail(who, " is a stopped job");
  if (p.ctty_pty() != 0) fail(who, " has a controlling terminal of the image");
  for (const auto& a : p.areas()) {
    const std::string where = cat("area ", hex(a.start()), "-", hex(a.end()), " ", a.name());
    check_dontfork_area(a);
    if (a.shared() && a.kind() != image::MemoryArea::SHARED_FILE && !remade_in_clones(a))
      fail(where, a.sysv_shm() ? " is a SysV shared memory segment" : " is shared memory",
           ": every clone would share it");
    if (a.shared() && a.ghost_id() != 0)
      fail(where, " is a shared mapping of a deleted file or memfd: every clone would share it");
  }
  for (const auto& f : p.fds()) check_clone_fd(p, f, img.shared(), shell_job);
}

void check_clonable(const image::ImageReader& img, bool shell_job) {
  // Trees: the other processes are made in each clone (clone_tree.h), zombies too.
  for (const image::Process& p : img.processes()) check_clonable_process(img, p, shell_job);
}

Clone make_clone(HeldTemplate& t, const CloneRequest& req, PreparedNs prepared) {
  const image::Process& p = t.img.processes().front();
  const size_t tree_size = t.img.processes().size();
  Restoree& tpl = t.root;
  std::string step = "namespace";
  // Time per step, logged with -vv (where a clone's milliseconds go).
  uint64_t step_start = now_ns();
  std::string timings;
  auto next = [&](std::string name) {
    const uint64_t t = now_ns();
    timings += cat(" ", step, " ", (t - step_start) / 1000, " us;");
    step_start = t;
    step = std::move(name);
  };
  try {
    PreparedNs ns = std::move(prepared);
    if (!ns || !alive(*ns)) {
      ns.reset(new NsReaper);
      make_reaper(*ns);
      next("setns");
      enter_namespace(tpl, *ns);
    }

    next("fork");
    auto c = std::make_unique<Restoree>(p);
    {
      // Our child, not the template's: we wait for it, and it outlives the template. Its exit
      // signal is the template's (SIGCHLD); clone3 wants 0 here with CLONE_PARENT, which makes
      // it a clone event (PTRACE_O_TRACECLONE auto-attaches it).
      const pid_t vpid = p.pid();
      long got = inject_clone3_with_id(tpl, CLONE_PARENT, 0, vpid);
      auto tids = tpl.leader().t.take_new_tasks();
      if (got < 0) fail_errno_value(static_cast<int>(-got), cat("clone3 of pid ", vpid));
      if (tids.size() != 1) fail("clone3 reported ", tids.size(), " new tasks, expected 1");
      c->adopt_forked(tids[0], vpid, tpl.trampoline());
      // clone3 returns the pid in the template's namespace; the clone's own is the last of
      // NSpid.
      const std::string st = proc::read_file(cat("/proc/", got, "/status"));
      const auto at = st.find("\nNSpid:");
      const auto eol = st.find('\n', at + 1);
      const std::string ns = st.substr(at + 7, eol - at - 7);
      const auto last = ns.find_last_of(" \t");
      if (at == std::string::npos || std::atoi(ns.c_str() + last + 1) != vpid)
        fail("clone3 created pid ", got, " with NSpid", ns, ", not ", vpid, " in its namespace");
    }
    Restoree& r = *c;

    next("dontfork");
    copy_dontfork_areas(tpl, r, p);
    next("shared memory");
    SharedObjectMap shared_objects = remake_shared_memory(tpl, r, p);
    next("leader");
    {  // A fork child has no tid address and no robust list (rseq and the rest are inherited).
      const image::Thread& th = p.threads(0);
      r.reset_arena();
      std::vector<Call> calls;
      calls.push_back(make_call("set_tid_address", SYS_set_tid_address, th.clear_child_tid()));
      if (th.robust_list() != 0)
        calls.push_back(make_call("set_robust_list", SYS_set_robust_list, th.robust_list(),
                                  th.robust_list_len()));
      r.batch(calls);
    }
    next("fds");
    UniqueFd netns, template_netns;
    if (req.netns) netns = make_network_namespace();
    if (t.opts.netns) {  // template --netns: the clone is in the template's namespace until setns
      template_netns.reset(
          ::open(cat("/proc/", tpl.pid(), "/ns/net").c_str(), O_RDONLY | O_CLOEXEC));
      if (!template_netns) fail_errno("open of the template's network namespace");
    }
    const int template_netns_fd = template_netns ? template_netns.get() : -1;
    CloneFiles files(t.img, netns ? netns.get() : template_netns_fd, req.std_fds[0] >= 0,
                     tree_size > 1);
    const int netns_there =
        replace_clone_fds(r, p, files, netns ? netns.get() : -1, template_netns_fd, req.std_fds);
    if (netns_there >= 0) {
      next("netns");
      r.reset_arena();
      std::vector<Call> calls;
      calls.push_back(make_call("setns(CLONE_NEWNET) into the clone's network namespace", SYS_setns,
                                static_cast<uint64_t>(netns_there), CLONE_NEWNET));
      calls.push_back(make_call("close of the network namespace", SYS_close,
                                static_cast<uint64_t>(netns_there)));
      r.batch(calls);
    }

    // The tree's other processes, forked from the root (which has its descriptors and its
    // network namespace) before its other threads exist.
    std::unique_ptr<CloneTree> tree;
    if (tree_size > 1) {
      tree = std::make_unique<CloneTree>(t.img, r, files, std::move(shared_objects), t.cpus,
                                         netns ? netns.get() : template_netns_fd, req.std_fds);
      tree->make(next);
    }

    for (int i = 1; i < p.threads_size(); i++) {
      const image::Thread& th = p.threads(i);
      next(cat("thread ", th.tid()));
      ThreadCtl& tc = make_thread_with_tid(r, th);
      restore_thread_state(r, tc);
    }
    next("release");
    {
      RestoreeRemote remote(r);
      // Each thread's scheduling policy and nice value (timers were refused at template time;
      // seccomp filters shared by every thread came with the fork).
      objects::restore_objects(objects::RestorePoint::kThreadsExist, remote, p);
      // The template has lazycr's credentials (restore.cc): the image's come last, once the
      // tree's processes and threads are made.
      restore_credentials(r, p);
      objects::restore_objects(objects::RestorePoint::kBeforeRelease, remote, p);
    }
    r.unmap_trampoline();
    // (The root's rseq_cs words are in the memory it shares with the template.)
    for (auto& tc : r.threads()) set_final_thread_state(r, tc, nullptr, t.cpus);
    const int32_t vpid = p.pid();
    if (::write(ns->ctl.get(), &vpid, sizeof vpid) != sizeof vpid)
      fail_errno("telling the namespace's reaper the clone's pid");
    if (tree) tree->release();
    for (size_t i = r.threads().size(); i-- > 0;) r.threads()[i].t.detach();
    Clone out;
    out.running_ns = now_ns();
    next("");
    log::debug("clone: steps:", timings);
    out.threads = r.threads().size() + (tree ? tree->threads() : 0);
    Spawned s = c->commit();
    out.pid = s.pid;
    out.image_pid = s.vpid;
    out.pidfd = std::move(s.pidfd);
    ns->released = true;
    out.reaper = ns->pid;
    out.reaper_pidfd = std::move(ns->pidfd);
    return out;
  } catch (const Error& e) {
    throw Error(cat("clone: ", step, ": ", e.what()), e.sys_errno());
  }
}

Restored hold_template(const RestoreOptions& opts, const image::ImageReader& img, Restoree& root,
                       const cpu_set_t& cpus) {
  HeldTemplate held{opts, img, root, cpus};
  opts.hold(held);
  return Restored{};
}

}  // namespace lazycr::restore
