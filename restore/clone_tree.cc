#include "restore/clone_tree.h"

#include <fcntl.h>
#include <linux/prctl.h>
#include <sys/syscall.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "common/error.h"
#include "common/proc.h"
#include "objects/objects.h"
#include "restore/address_space.h"
#include "restore/calls.h"
#include "restore/clone3_tid.h"
#include "restore/clone_fds.h"
#include "restore/ghost_files.h"
#include "restore/memory.h"
#include "restore/process_steps.h"
#include "restore/restoree.h"
#include "restore/sysv_shm.h"
#include "restore/thread_state.h"

namespace lazycr::restore {

// One process of the clone other than its root. Destroyed in reverse order of its members:
// the address space (it refers to the process), the process (killed and reaped unless
// committed), its memory strategy.
struct CloneTreeProcess {
  const image::Process* p = nullptr;
  Restoree* parent = nullptr;
  std::unique_ptr<MemoryStrategy> strategy;
  std::unique_ptr<Restoree> r;
  std::unique_ptr<AddressSpace> space;
};

namespace {

// A process forked from its parent in the clone has the parent's descriptor table: the numbers
// `p` does not use are closed, and each number it uses holds something (/dev/null), so that
// replace_clone_fds() finds them all open as in the root (what it receives lands elsewhere).
void make_fd_numbers(Restoree& r, const image::Process& p) {
  std::set<int> want;
  for (const auto& f : p.fds()) want.insert(f.fd());
  std::set<int> have;
  for (const auto& e : std::filesystem::directory_iterator(cat("/proc/", r.pid(), "/fd")))
    have.insert(std::atoi(e.path().filename().c_str()));
  r.reset_arena();
  std::vector<Call> calls;
  for (int fd : have)
    if (!want.count(fd))
      calls.push_back(make_call(cat("close(", fd, ")"), SYS_close, static_cast<uint64_t>(fd)));
  if (!calls.empty()) r.batch(calls);
  std::set<int> missing;
  for (int fd : want)
    if (!have.count(fd)) missing.insert(fd);
  if (missing.empty()) return;
  r.reset_arena();
  const long null_fd = r.inject("open of /dev/null", SYS_openat, static_cast<uint64_t>(AT_FDCWD),
                                r.push_string("/dev/null"), O_RDONLY | O_CLOEXEC);
  calls.clear();
  for (int fd : missing)
    if (fd != null_fd)
      calls.push_back(make_call(cat("dup3 of /dev/null to ", fd), SYS_dup3,
                                static_cast<uint64_t>(null_fd), static_cast<uint64_t>(fd), 0));
  if (!missing.count(static_cast<int>(null_fd)))
    calls.push_back(make_call("close of /dev/null", SYS_close, static_cast<uint64_t>(null_fd)));
  if (!calls.empty()) r.batch(calls);
}

}  // namespace

CloneTree::CloneTree(const image::ImageReader& img, Restoree& root, const CloneFiles& files,
                     SharedObjectMap objects, const cpu_set_t& cpus, int transport_netns,
                     const int (&std_fds)[3])
    : img_(img),
      root_(root),
      files_(files),
      objects_(std::move(objects)),
      cpus_(cpus),
      transport_netns_(transport_netns) {
  std::copy(std::begin(std_fds), std::end(std_fds), std_fds_);
}

CloneTree::~CloneTree() {
  // Every process killed before any is reaped; each exit is collected by its Restoree.
  if (!released_) {
    for (auto& t : procs_) t->r->kill();
    for (auto& t : procs_) t->r->reap_traced();
  }
  for (size_t i = procs_.size(); i-- > 0;) {
    procs_[i]->space.reset();
    procs_[i]->r.reset();
    procs_[i]->strategy.reset();
  }
}

size_t CloneTree::threads() const {
  size_t n = 0;
  for (const auto& t : procs_) n += t->r->threads().size();
  return n;
}

void CloneTree::make(const std::function<void(std::string)>& step) {
  const auto& procs = img_.processes();
  const image::Process& root = procs.front();
  std::map<int, Restoree*> by_pid{{root.pid(), &root_}};
  std::map<int, const image::Process*> image_of{{root.pid(), &root}};
  SysvSegments sysv(img_.shared());
  step(cat("session of pid ", root.pid()));
  start_session(root_, root, true);

  for (size_t i = 1; i < procs.size(); i++) {
    const image::Process& p = procs[i];
    auto t = std::make_unique<CloneTreeProcess>();
    t->p = &p;
    t->parent = by_pid.at(p.ppid());  // check_image: parents come first
    t->r = std::make_unique<Restoree>(p);
    CloneTreeProcess& tp = *t;
    procs_.push_back(std::move(t));
    Restoree& r = *tp.r;
    const image::Process& parent = *image_of.at(p.ppid());
    step(cat("fork of pid ", p.pid()));
    tp.parent->fork_child(p.pid(), r);
    by_pid[p.pid()] = &r;
    image_of[p.pid()] = &p;
    if (p.zombie()) {
      // Its parent sees it as the image did: a child that exited with its status.
      step(cat("zombie of pid ", p.pid()));
      r.exit_as_zombie(p.exit_status());
      consume_sigchld(*tp.parent);
      continue;
    }
    start_session(r, p, false);
    // The parent's rseq area came with the fork: unregistered before its TLS may go.
    unregister_inherited_rseq(r);
    step(cat("memory of pid ", p.pid()));
    const std::set<uint64_t> kept = inheritable_areas(parent, p);
    const bool vdso_kept = same_vdso_block(parent, p);
    unmap_inherited(r, p, kept, vdso_kept);
    if (!vdso_kept) move_vdso(r, p);
    tp.strategy = make_eager_filler(img_.pages(p.pid()), &cpus_);
    tp.space = std::make_unique<AddressSpace>(r, p, *tp.strategy, objects_, *files_.ghosts, sysv,
                                              kept, parent.pid());
    tp.space->map_areas();
    tp.strategy->fill_mapped(r);
    tp.space->protect();
  }

  step("groups");
  const std::set<int> leaders = restored_group_leaders(procs);
  for (int pass = 0; pass < 2; pass++) {
    join_group(root_, root, leaders, pass);
    for (auto& t : procs_)
      if (!t->p->zombie()) join_group(*t->r, *t->p, leaders, pass);
  }

  for (auto& t : procs_) {
    if (t->p->zombie()) continue;
    Restoree& r = *t->r;
    const image::Process& p = *t->p;
    step(cat("state of pid ", p.pid()));
    set_mm(r, p, *files_.ghosts);
    t->strategy->after_shaping(r);
    restore_process_state(r, p, *files_.ghosts);
    restore_sigactions(r, p, false);  // it has its parent's
    step(cat("fds of pid ", p.pid()));
    make_fd_numbers(r, p);
    replace_clone_fds(r, p, files_, -1, transport_netns_, std_fds_);
    step(cat("threads of pid ", p.pid()));
    restore_thread_state(r, r.leader());
    RestoreeRemote remote(r);
    objects::restore_objects(objects::RestorePoint::kBeforeThreads, remote, p);
    for (int i = 1; i < p.threads_size(); i++) {
      ThreadCtl& c = make_thread_with_tid(r, p.threads(i));
      restore_thread_state(r, c);
    }
    objects::restore_objects(objects::RestorePoint::kThreadsExist, remote, p);
    restore_rlimits(r, p);
    // Last: with the image's credentials it may no longer make threads with chosen tids.
    restore_credentials(r, p);
  }
}

void CloneTree::release() {
  for (auto& t : procs_) {
    if (t->p->zombie()) continue;
    Restoree& r = *t->r;
    const image::Process& p = *t->p;
    {
      RestoreeRemote remote(r);
      objects::restore_objects(objects::RestorePoint::kBeforeRelease, remote, p);
    }
    r.unmap_trampoline();
    t->strategy->before_release(r);
    const image::PageStoreReader& store = img_.pages(p.pid());
    for (auto& c : r.threads()) set_final_thread_state(r, c, &store, cpus_);
  }
  // Children before parents, other threads before their leader (as restore() detaches).
  for (size_t k = procs_.size(); k-- > 0;) {
    if (procs_[k]->p->zombie()) continue;
    Restoree& r = *procs_[k]->r;
    for (size_t i = r.threads().size(); i-- > 0;) r.threads()[i].t.detach();
  }
  released_ = true;
  for (auto& t : procs_) {
    if (t->p->zombie()) continue;
    t->r->commit();
    t->strategy->on_running(*t->r);
  }
}

}  // namespace lazycr::restore
