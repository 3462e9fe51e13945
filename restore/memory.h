// Internal to restore/: how the contents of the restored address space get there.
//
// The restore maps every area itself (restore.cc); a MemoryStrategy decides what goes into the
// areas and when. The sequence, for one process (step names of restore.cc in brackets):
//   1. [map-areas] for each area: mmap it with shaping_prot(area), then prepare_area(area);
//   2. [uffd] register_lazy(): every area is mapped, none has its final protection yet (a
//      lazy strategy creates its userfaultfd here and fills eagerly whatever it refuses);
//   3. [server] start_server(): the page server is started (lazy; lazycr is single-threaded
//      here, the server is a fork);
//   4. [fill] fill_mapped(): still before final protections;
//   5. [protect] every area gets its final protection (mprotect where shaping_prot differed);
//   6. [after-shaping] after_shaping(): the address space is final, mm fields set, only the
//      leader thread exists and it still sits in the trampoline (injection works);
//   7. [release] before_release(): every thread exists with its state; registers are set
//      and the threads detached right after (lazy: the server's readiness is awaited only
//      after that, at [server-ready]: a fault before it waits on the userfaultfd);
//   8. on_running(): every thread has been detached and runs.
// EagerFiller writes every stored page in step 2 and has nothing to do in the others. The
// lazy strategy (restore/lazy.cc) is described there.
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/page_store.h"
#include "image-format/process.pb.h"
#include "restore/calls.h"
#include "restore/eager_preread.h"
#include "restore/restore.h"
#include "uffd/page_server.h"

namespace lazycr::restore {

// The process under construction, as a memory strategy sees it.
class RemoteProcess {
 public:
  virtual ~RemoteProcess() = default;
  // The process as seen from lazycr (process_vm_writev, pidfd_getfd).
  virtual pid_t pid() const = 0;
  virtual int pidfd() const = 0;
  // Runs one system call in the leader thread (from the trampoline); throws naming `what` on
  // failure, returns the result otherwise.
  virtual long inject(const std::string& what, long nr, uint64_t a1 = 0, uint64_t a2 = 0,
                      uint64_t a3 = 0, uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) = 0;
  // A scratch buffer inside the process (in the trampoline mapping) for syscall arguments:
  // writes `len` bytes there and returns their address in the process.
  virtual uint64_t put_data(const void* data, size_t len) = 0;
  // The same arena for the arguments of the calls of one batch: reset_arena() starts it over,
  // push() appends.
  virtual void reset_arena() = 0;
  virtual uint64_t push(const void* data, size_t len) = 0;
  // Runs `calls` in order in the leader, with one ptrace round trip for many; stops at the
  // first failing call and throws naming it. Returns every result.
  virtual std::vector<long> batch(const std::vector<Call>& calls) = 0;
};

struct MemoryStats {
  uint64_t pages_written = 0;
  uint64_t bytes_written = 0;
  uint64_t write_calls = 0;  // process_vm_writev calls
  uint64_t fill_ns = 0;      // whole fill
  uint64_t read_ns = 0;      // of which reading (decompressing) pages from the store
  uint64_t write_ns = 0;     // of which writing them into the process
  uint64_t lazy_areas = 0;   // lazy: areas registered with userfaultfd
  uint64_t lazy_pages = 0;   // lazy: stored pages (DATA and ZERO) left to the page server
  uint64_t hot_pages = 0;    // lazy: pages of lazy areas written before the process runs
};

// The page server process of a lazy restore, handed to the caller once the process runs.
struct ServerHandle {
  pid_t pid = 0;
  UniqueFd pidfd;
};

class MemoryStrategy {
 public:
  virtual ~MemoryStrategy() = default;
  virtual const char* name() const = 0;
  // Protection to mmap `area` with while the address space is shaped: its final protection
  // plus whatever this strategy needs to fill it.
  virtual uint32_t shaping_prot(const image::MemoryArea& area) const = 0;
  // `area` is mapped at its address with shaping_prot(area).
  virtual void prepare_area(RemoteProcess& target, const image::MemoryArea& area) = 0;
  // `area` was inherited at fork from the parent (image pid `parent_pid`), whose restored
  // pages it holds, and has shaping_prot(area) (eager restores of trees; see restore.cc).
  virtual void prepare_inherited_area(RemoteProcess& target, const image::MemoryArea& area,
                                      int parent_pid) {
    (void)parent_pid;
    prepare_area(target, area);
  }
  // Every area is mapped (none has its final protection yet).
  virtual void fill_mapped(RemoteProcess& target) = 0;
  // The address space is final; the leader can still run injected calls; no other thread yet.
  virtual void after_shaping(RemoteProcess& target) = 0;
  // Every thread runs. Must not throw: the process cannot be taken back any more.
  virtual void on_running(RemoteProcess& target) = 0;
  virtual MemoryStats stats() const = 0;

  // Lazy strategies (see the sequence above); no-ops for the eager filler.
  virtual void register_lazy(RemoteProcess&) {}
  virtual void start_server(RemoteProcess&) {}
  virtual void before_release(RemoteProcess&) {}
};

// Writes every stored page with process_vm_writev before the process resumes. The pages are
// cut into batches of up to 8 MiB and 1024 ranges; two workers (the calling thread and a
// helper thread) each take the next batch, read (decompress) it from the page store into their
// own reused buffer and write it with one call. Pages the store records as ZERO are written
// only where the fresh mapping is not already zero (private file mappings). The helper thread
// runs on `helper_cpus` when given (the restorer itself is pinned to one CPU while it shapes).
// `preread`: pages read ahead (lazy restores); the filler copies those it has from there.
std::unique_ptr<MemoryStrategy> make_eager_filler(const image::PageStoreReader& store,
                                                  const cpu_set_t* helper_cpus = nullptr,
                                                  const EagerPreread* preread = nullptr);

// One restored process for the lazy page server.
struct ServedProcess {
  pid_t pid = 0;                                  // the restored process, in our namespace
  int uffd = -1;                                  // lazycr's (the server inherits it)
  int pidfd = -1;                                 // the process's (inherited)
  const image::PageStoreReader* store = nullptr;  // lazycr's, parsed already (a copy after fork)
  std::vector<uffd::LazyArea> areas;
  // The keeper socket parked inside the process (restore/park.h): lazycr's duplicates of its
  // ends (the server inherits them) and its number in the process; -1 when none.
  int keeper_send = -1;
  int keeper_recv = -1;
  int parked_fd = -1;
};

// The page server of a lazy restore, one for every process of the tree (restore/lazy.cc): each
// process's lazy strategy hands it its userfaultfd at [server] (add()), then start() forks the
// server for all of them; wait_ready() at [server-ready], after the processes were let go (a
// failure there fails the restore, which kills them); go() once every process runs.
class LazyServerGroup {
 public:
  LazyServerGroup(const RestoreOptions& opts, const cpu_set_t& cpus);
  // Without go(): the restore failed; the server (which finds its processes killed) is reaped.
  ~LazyServerGroup();
  LazyServerGroup(const LazyServerGroup&) = delete;
  LazyServerGroup& operator=(const LazyServerGroup&) = delete;

  void add(ServedProcess p);
  // No server when nothing was added. `stores`: every page store of the image (the served
  // processes' stores may read pages stored in the others).
  void start(pid_t root, const std::vector<std::string>& stores);
  void wait_ready();
  // A server was started and has not said it is ready yet.
  bool server_pending() const;
  // Called when a step fails, the processes killed: if the server failed to start, throws
  // its error (the cause); else returns.
  void raise_server_failure();
  // Tells the server the processes run (and the totals, for its stats) and hands it over.
  // Without a server, writes the stats itself. Never throws.
  ServerHandle go(pid_t root, const MemoryStats& total) noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The lazy strategy (--lazy, restore/lazy.cc): private anonymous areas with stored pages are
// registered with a userfaultfd and served by a page server process; everything else is
// filled by an eager filler. `cpus` is the CPU mask the server and the process run on
// (lazycr's own before it pinned itself); the eager helper thread runs there too. `sharing`
// (trees): the pages the process holds from its parent's fork, and those it writes before
// forking its children (restore/tree_sharing.h); none are owed.
class TreeSharing;
std::unique_ptr<MemoryStrategy> make_lazy_strategy(const image::Process& proc,
                                                   const image::PageStoreReader& store,
                                                   const RestoreOptions& opts,
                                                   const cpu_set_t& cpus, LazyServerGroup& group,
                                                   const TreeSharing* sharing = nullptr);

// The userfaultfd events a lazy restore needs: FORK, REMAP, REMOVE, UNMAP (lazy_checks.cc).
extern const uint64_t kLazyRequiredFeatures;
// Throws Error saying what is missing when this kernel or lazycr's privileges cannot do a lazy
// restore (userfaultfd and its fork/remap/remove/unmap events, pidfd_getfd, CAP_SYS_PTRACE).
void check_lazy_support();
// check_lazy_support(), and the options: --stats writable, --server-cpu allowed.
void check_lazy_options(const LazyOptions& opts);

// Areas whose stored pages an eager fill writes: everything with contents in the store (the
// eager filler, and the read-ahead of a lazy restore's eager pages, which must match it).
bool eager_fills(const image::MemoryArea& area);

// Whether `vmflags` (an smaps VmFlags line: two-letter flags, one space apart) holds `f`.
bool has_vmflag(const std::string& vmflags, const char* f);

}  // namespace lazycr::restore
