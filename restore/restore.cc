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
#include "restore/process_steps.h"
#include "restore/restoree.h"
#include "restore/shared_files.h"
#include "restore/steps.h"
#include "restore/sysv_shm.h"
#include "restore/template.h"
#include "restore/thread_state.h"
#include "restore/tree_sharing.h"
#include "restore/trust.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;

// Every step a restore goes through, in order; --fault-inject=NAME fails at the start of that
// step ("thread-created": after the first extra thread exists; "checks": the checks beside the
// creation of the tree fail once done, reported as "validate").
// Each child is forked right before its memory steps (unmap..fill; eager: ..protect); lazy
// restores run "uffd", "server" and "protect" once every process exists; "uffd", "server" and
// "server-ready" are lazy only.
[[maybe_unused]] constexpr const char* kSteps =
    "validate files create seize pin trampoline rseq close-fds session fork unmap vdso "
    "map-areas uffd server fill protect sysv-shm groups zombie mm after-shaping "
    "process-state sigactions fds objects-fds thread-state objects-leader threads "
    "thread-created objects-threads signals rlimits credentials unmap-trampoline release "
    "registers detach server-ready";

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
  std::unique_ptr<TreeSharing> sharing;  // lazy trees: pages children hold from their parent
  SharedObjectMap shared_objects;        // shared memory objects of the tree, as they are created
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
  steps.run("rseq", rt.who, [&] { unregister_inherited_rseq(r0); });
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
  auto make_space = [&](Task& t, std::set<uint64_t> kept, int parent_pid) {
    const image::PageStoreReader& store = img->pages(t.p->pid());
    if (opts.lazy.enabled && !lazy_group)
      lazy_group = std::make_unique<LazyServerGroup>(opts, pin->saved());
    t.strategy = opts.lazy.enabled ? make_lazy_strategy(*t.p, store, opts, pin->saved(),
                                                        *lazy_group, sharing.get())
                                   : make_eager_filler(store, &pin->saved());
    t.space = std::make_unique<AddressSpace>(*t.r, *t.p, *t.strategy, shared_objects, *ghosts,
                                             sysv_segments, std::move(kept), parent_pid);
  };

  const uint64_t t_mem = now_ns();
  // Each process is forked once its parent's memory is in place, so that it finds the
  // parent's pages there, shared copy-on-write, and writes only what differs. Lazy: the
  // parent's lazy areas hold only the pages its children share with it (restore/tree_sharing.h)
  // and are registered once every process exists (a fork of a registered area would be a
  // userfaultfd FORK event); then the server starts, and the final protections come last
  // (an area userfaultfd refuses is filled eagerly, while still writable).
  const bool fork_first = opts.lazy.enabled && !opts.lazy.tree_sharing;
  if (opts.lazy.enabled && opts.lazy.tree_sharing && procs.size() > 1)
    sharing = std::make_unique<TreeSharing>(*img);
  if (fork_first) {
    // --no-tree-sharing: every process forked while its parent is still a bare copy of lazycr
    // with the trampoline; each owes all its pages.
    for (size_t i = 1; i < tree.tasks.size(); i++) fork(*tree.tasks[i]);
    each_live("unmap", [&](Task& t) { unmap_inherited(*t.r, *t.p, {}, false); });
    each_live("vdso", [&](Task& t) { move_vdso(*t.r, *t.p); });
    for (auto& t : tree.tasks)
      if (t->live()) make_space(*t, {}, 0);
    each_live("map-areas", [&](Task& t) { t.space->map_areas(); });
    each_live("fill", [&](Task& t) { t.strategy->fill_mapped(*t.r); });
  }
  for (size_t i = 0; i < tree.tasks.size() && !fork_first; i++) {
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
    steps.run("unmap", t.who, [&] { unmap_inherited(*t.r, *t.p, kept, vdso_kept); });
    steps.run("vdso", t.who, [&] {
      if (!vdso_kept) move_vdso(*t.r, *t.p);
    });
    make_space(t, kept, parent_pid);
    steps.run("map-areas", t.who, [&] { t.space->map_areas(); });
    steps.run("fill", t.who, [&] { t.strategy->fill_mapped(*t.r); });
    if (!opts.lazy.enabled) steps.run("protect", t.who, [&] { t.space->protect(); });
  }
  if (opts.lazy.enabled) {
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
  // A template keeps lazycr's: it makes each clone in a new PID namespace (setns, clone3 with
  // set_tid), which the image's credentials may not allow; each clone takes them last.
  if (!opts.hold) each_live("credentials", [&](Task& t) { restore_credentials(*t.r, *t.p); });
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
      steps.run("registers", cat("tid ", c.vtid),
                [&] { set_final_thread_state(r, c, &store, pin->saved()); });
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
