// The lazy page server (DESIGN.md section 6): serves the memory of restored processes through
// their userfaultfds from their page stores, following their layout changes, and prefetches
// what is left, until nothing is owed. It knows nothing of how the processes were created.
//
// Use (restore/ does this):
//   PageServer server(options);
//   server.add_process(pid, std::move(uffd), std::move(pidfd), store, lazy_areas);  // each
//   server.start_guardian();   // optional, recommended: see "Guardian" below
//   ... let the processes run ...
//   const PageServerStats& stats = server.run();  // returns once nothing is owed anywhere
//   server.write_stats_json(path); std::cerr << server.summary();
//
// The uffd given to add_process must have had UFFDIO_API with UFFD_FEATURE_EVENT_FORK,
// EVENT_REMAP, EVENT_REMOVE and EVENT_UNMAP (THREAD_ID optional), and the lazy areas must be
// registered UFFDIO_REGISTER_MODE_MISSING. Without those events the server cannot follow fork,
// mremap, madvise(MADV_DONTNEED) and munmap, and would serve stale image content.
//
// What it does, per process (an "owed set", uffd/owed_set.h: page ranges still owed, each
// with its source address in the store; it starts as every stored page, DATA, REF or ZERO,
// inside the lazy areas; REF pages, whose content lives in another process's store, are
// served like DATA: the store's read() resolves them):
// - PAGEFAULT at A: if A is owed, A's page is filled first, alone (UFFDIO_COPY wakes the
//   faulting thread only when the whole ioctl is done: a 64 KiB copy made it wait for 16
//   page allocations), then the rest of its window: the window-sized aligned block holding A
//   (options.window), clipped to A's owed range (one store run, one kind), above A first,
//   then below. What is read from the store (through its frame cache) before A is filled
//   depends on the fault:
//   - A where the process's last window ended (it reads its memory in order): the whole
//     window, then A, then the rest at once, before the thread gets there (reading only A
//     first woke it while the rest was still being decompressed: it faulted again, a second
//     round trip per window). Then the next window is read ahead (decompressed into the
//     cache, not filled), so that the next in-order fault needs no decompression before
//     its page is filled (bench/RESULTS.md, "Restore (lazy)", prefetch off: fault p50
//     ~20 -> ~10 us; verification in 0.61-1.05x the time, median 0.83).
//   - any other fault: A's page alone (only its frame is decompressed: a window straddling
//     two frames made the thread wait for both), and the rest of the window once every
//     fault read in the same batch has had its page.
//   ZERO-run pages: UFFDIO_ZEROPAGE. A not owed: UFFDIO_ZEROPAGE of that page (never-touched
//   memory, or memory the program dropped).
//   EEXIST: the page is there already: UFFDIO_WAKE (a failed fill wakes nobody). EAGAIN:
//   layout events are pending: read and apply them, then retry. ESRCH: the mm is gone: the
//   process is dropped. ENOENT: no registered area there any more: wake, drop the page. The
//   rest of a window stops at anything unusual (a present page, ENOENT where an mprotect
//   split the area, EAGAIN): what is left stays owed.
//   Latency (stats) is measured from the read of the fault message to the fill that woke
//   the thread.
// - Every batch read from a uffd has its layout events applied before its faults are served:
//   the kernel returns pending faults before pending events, and a fault raised in a range
//   that was just moved must be looked up in the new layout.
// - FORK: the child's uffd arrives in the message (installed in this process by the read);
//   the child owes a copy of what the parent owed then. Its pid is not known yet: the kernel
//   holds the forking thread inside copy_process() until the event is read, before the child
//   has a pid, and lets it go on as soon as the event is read. The fork window: from then
//   until the server has parked the child's uffd in the keeper and handed it to the
//   guardian, the server's descriptor is the child's only one; should the server die there,
//   the kernel unregisters the child's areas and it reads zero pages. So every batch read
//   has its children's uffds parked and handed over before anything else is done with it
//   (a few system calls), and a guardian that outlives the server kills every descendant of
//   the processes it guards that it was never told of. Left: the server and the guardian
//   both killed inside those few system calls (no user space reference can exist earlier:
//   the kernel installs the descriptor in the reader alone, and resumes the fork before the
//   read returns). (/proc/PID/task/TID/children
//   does not exist on our kernel: no CONFIG_PROC_CHILDREN.) So once the fork has returned
//   (on each message from the child's uffd, and on a 1 ms .. 64 ms backoff), the server scans
//   /proc/*/stat for a child of that parent that the server never served, that the parent
//   did not already have when it was handed to the server, and that started no earlier than
//   the event (start times are in 10 ms ticks), and that does not share the parent's mm
//   (kcmp KCMP_VM: vfork/posix_spawn children make no FORK event). Exactly one such
//   candidate, and one unresolved fork of that parent: pidfd_open, checked to still be that
//   parent's child. Should the pid still be the wrong one, the uffd is not closed under the
//   real child: when a pidfd reports an exit, the uffd's mm is probed first, and a live mm is
//   not let go. (A kill for a corrupt frame would reach the wrong pid, though.)
//   Two forks of one process in flight at once are told apart only once one is found.
//   Not found: the child is still served, and dropped when a fill or the idle mm probe
//   answers ESRCH.
// - REMAP (mremap): owed ranges in [from, from+len) move to [to, to+len) keeping their
//   sources. The UNMAP of the old range that follows no longer covers them.
// - REMOVE (MADV_DONTNEED, MADV_REMOVE, ...) and UNMAP: the range is no longer owed; later
//   faults there get zero pages, never the image's old content.
// - Exit: the pidfd becomes readable (there is no EXIT uffd event on this kernel): once a
//   probe confirms the mm is gone, the state is freed.
//   A process that execs keeps its pid but drops its mm: a fill answers ESRCH (prefetch finds
//   it; with prefetch off the server probes each idle process's mm once a second with a
//   copy that cannot succeed: src points nowhere).
// - Prefetch (options.prefetch): whenever no message is waiting, owed pages are pushed in
//   copies of options.prefetch_chunk bytes (one owed range at a time), continuing upward
//   from each process's last fault and wrapping, processes in turn. A chunk is read and
//   filled in pieces that wake nobody (UFFDIO_COPY_MODE_DONTWAKE), then one UFFDIO_WAKE over
//   what was filled. Between pieces the uffds are polled: a fault outside the chunk (or an
//   event, or another process's message) stops the chunk, so it waits for one piece rather
//   than the chunk; a fault inside the chunk (a thread reading just behind prefetch) lets it
//   go on and is answered by its wake-up (stats.prefetch_waits): one wake-up per chunk,
//   where 128 KiB chunks cost the server a wake-up per 128 KiB and a process reading in
//   order 10-15% (bench/RESULTS.md). Pieces are 64 KiB (~30 us) while faults
//   come, the whole chunk once none came for 20 ms (uffd/fill_pipeline.h). With
//   options.prefetch_thread (lazy restores too) the fill pipeline (uffd/fill_pipeline.h) reads
//   and decompresses the next chunks ahead on one thread (at SCHED_IDLE) into four buffers,
//   whole frames straight into them (image-format/page_store_direct.h), while no fault came
//   for 20 ms; the loop never waits for it: it polls the uffds between copies and a fault
//   always goes first, and a chunk the thread has not taken within 1 ms (a busy machine) the
//   loop reads itself. A working set, and chunks while faults come, the loop reads itself.
// - A process whose owed set becomes empty has its uffd closed at once (the kernel then
//   treats its areas as plain memory: no fault can need the server any more), unless it has
//   a keeper (its uffd is parked inside it, uffd/keeper.h): then its areas stay registered
//   until the keeper lets go, so the server keeps answering its faults (zero pages: nothing
//   is owed) until the end. run() returns when no process is left that owes anything (and
//   the release gate is open, see PageServerOptions); then the parked uffds are dropped, the
//   uffds closed, and last the parked descriptors closed inside the processes (keeper.h).
//
// Safety:
// - A page the server cannot serve correctly (the store throws: a corrupt frame, a read
//   error; or a fill fails with an unexpected errno) is never replaced by a zero page: the
//   process is killed with SIGKILL through its pidfd and the message
//   "page server: pid N: <what failed>; killed the process rather than serve wrong memory"
//   is logged (log::write, error level) and kept in stats().errors. Its uffd stays open, its
//   faults unanswered, until its pidfd reports the exit, so that nothing (not even a system
//   call copying from a lazy buffer while the kill is delivered) reads a zero page there.
//   A forked child whose pid was never found cannot be killed: its faults stay unanswered.
// - stop(), or a PageServer destroyed while pages are still owed, kills the processes that
//   still owe pages, with a message, for the same reason.
// - Guardian (start_guardian()): if the server itself dies (crash, SIGKILL, OOM) while it
//   holds the only reference to a uffd, the kernel unregisters the areas and the processes
//   read zero pages in place of their data. The guardian is a small process forked from the
//   server process (raw system calls only: the server may have threads) that receives over a
//   unix socket (SCM_RIGHTS) a duplicate of every uffd and pidfd the server holds, including
//   forked children's, and a "released" note when the server closes one. It watches the
//   server through a pidfd and the socket. If the server dies before it said it finished,
//   the guardian SIGKILLs every process whose uffd it still holds (and, when some forked
//   child's pid was never found, every descendant of that child's parent), writes
//   "lazycr guardian: the page server (pid N) died before it finished; killed pid A, B rather
//   than let them read zero pages in place of their memory" to its log fd (stderr by
//   default), waits for them to exit, and only then closes the uffds. When run() ends
//   normally the server tells the guardian, which exits; the server reaps it.
//   The guardian's copies also keep a released process's areas registered until the
//   guardian has closed its copy: faults in that moment wait, they never read zeros.
//   It holds at most 4096 processes at once (a static table: it may not allocate); beyond
//   that a process is served without its safety net. If the guardian dies, the server goes
//   on without it (one warning).
//
// Threads: run() serves on the calling thread (plus the prefetch thread it owns); stop() may
// be called from any thread or a signal handler; everything else before run() or after it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/fd.h"
#include "common/json.h"
#include "image-format/page_store.h"

namespace lazycr::uffd {

class UffdKeeper;

struct LazyArea {
  uint64_t start = 0;  // page aligned
  uint64_t end = 0;    // page aligned, > start
  // The program had the area in huge pages (MADV_HUGEPAGE): UFFDIO_COPY fills it 4 KiB at a
  // time, so once nothing is owed and the uffd is gone the server collapses its whole 2 MiB
  // blocks into huge pages again (process_madvise MADV_COLLAPSE; khugepaged would take minutes).
  bool huge = false;
};

struct PageServerOptions {
  uint64_t window = 64 * 1024;                // bytes copied per fault (page multiple, >= 4096)
  bool prefetch = true;                       // push owed pages while no fault is waiting
  uint64_t prefetch_chunk = 2 * 1024 * 1024;  // bytes per prefetch chunk (page multiple)
  bool prefetch_thread = true;                // decompress ahead (uffd/fill_pipeline.h)
  int guardian_log_fd = 2;                    // where the guardian writes its message
  // When >= 0: the keepers (uffd/keeper.h) are released, and run() returns, only once this
  // descriptor is readable or hung up (lazycr's restore traces the processes until then, so
  // their parked descriptors could not be closed). Not read; watched until it is.
  int release_gate_fd = -1;
};

// Every time is in nanoseconds from the start of run(); -1 when it did not happen.
struct PageServerStats {
  int64_t first_fault_ns = -1;   // the first fault message read
  int64_t all_served_ns = -1;    // nothing owed any more, anywhere
  int64_t run_ns = 0;            // run() from start to return
  uint64_t processes = 0;        // added + forked children
  uint64_t faults = 0;           // PAGEFAULT messages
  uint64_t fault_pages = 0;      // pages copied to answer faults (whole windows)
  uint64_t prefetch_pages = 0;   // pages copied by prefetch
  uint64_t zero_pages = 0;       // pages filled by UFFDIO_ZEROPAGE (ZERO runs, and pages not owed)
  uint64_t not_owed_faults = 0;  // faults on pages not owed (answered with a zero page)
  // Faults inside a prefetch chunk being filled, read between its pieces and answered by its
  // wake-up (not in `faults` nor in fault_latency_ns: they waited for prefetch, see above).
  uint64_t prefetch_waits = 0;
  uint64_t dropped_pages = 0;  // owed pages dropped by REMOVE / UNMAP / exit / kill / ESRCH
  uint64_t copy_ioctls = 0;    // UFFDIO_COPY + UFFDIO_ZEROPAGE calls that filled something
  uint64_t eexist = 0, eagain = 0, enoent = 0;  // fill answers
  uint64_t bytes_decompressed = 0;              // by the stores during run()
  uint64_t events_fork = 0, events_remap = 0, events_remove = 0, events_unmap = 0;
  uint64_t exits = 0;           // processes seen exiting (pidfd) or gone (ESRCH)
  uint64_t children_found = 0;  // forked children whose pid was found
  uint64_t killed = 0;          // processes killed rather than served wrong memory
  uint64_t parked_closed = 0;   // keeper descriptors closed inside a process
  uint64_t parked_left = 0;     // ... left there (traced by someone else, ...)
  // Working set (use_working_set()): pages pushed first from a record, faults on pages of
  // that record, and when the last of it was pushed (-1: never, or no record).
  uint64_t working_set_pages = 0;
  uint64_t working_set_record_pages = 0;  // of them, read from the record pages, not the store
  uint64_t working_set_faults = 0;
  int64_t working_set_done_ns = -1;
  std::vector<uint32_t> fault_latency_ns;  // per fault: message read -> fill returned
  std::vector<std::string> errors;         // one line per killed process

  // The q-quantile (0..1) of fault_latency_ns, 0 when there was no fault.
  uint64_t latency_ns(double q) const;
};

// The counters of a stats file (processes ... errors) as fields of the object `w` is in; the
// server's own file and the lazy restore's both use it.
void write_stats_fields(JsonWriter& w, const PageServerStats& s);

class PageServer {
 public:
  explicit PageServer(PageServerOptions options = {});
  // Kills the processes that still owe pages (see Safety), tells the guardian, closes all.
  ~PageServer();
  PageServer(const PageServer&) = delete;
  PageServer& operator=(const PageServer&) = delete;

  // Serves process `pid` (> 0) through `uffd` (its file status is made O_NONBLOCK), watching
  // `pidfd` for its exit. It owes every page of `store` (DATA, REF or ZERO runs) inside `areas`;
  // pages of the areas not in the store are zero-filled on fault. Throws Error on a bad
  // argument (areas unaligned or overlapping, a run kind it cannot serve).
  // `keeper` (optional, uffd/keeper.h): the reference parked inside the process; the server
  // parks this uffd and those of its forked children there, and releases them at the end.
  void add_process(pid_t pid, UniqueFd uffd, UniqueFd pidfd,
                   std::shared_ptr<const image::PageStoreReader> store,
                   const std::vector<LazyArea>& areas,
                   std::shared_ptr<UffdKeeper> keeper = nullptr);

  // Working-set prefetch (uffd/working_set.h), after add_process() of every process, before
  // run(): each process whose store's directory holds a record that fits it gets the
  // record's pages pushed first, in its order (even with prefetch off), then prefetch goes on
  // as usual; a record that does not fit is ignored with one warning. With `record`, the
  // faults served in the first seconds of run() are recorded there instead (prefetch waits
  // until the recording ends: `quiet_ns` without a fault, or `max_ns`; or run() ends).
  void use_working_set(bool record, int64_t max_ns = 10'000'000'000,
                       int64_t quiet_ns = 1'000'000'000);

  // Forks the guardian (see Safety) and hands it the processes added so far; later ones are
  // handed over as they come. Call before run().
  void start_guardian();
  pid_t guardian_pid() const;

  // Serves until nothing is owed anywhere and no process needs the server (each uffd is
  // closed as its process stops owing), or until stop(). Throws Error only for failures of
  // the server itself (epoll, eventfd); a process the server cannot serve is killed and
  // reported in stats().errors instead.
  const PageServerStats& run();
  // Makes run() return soon; the processes still owed pages are killed. Async-signal-safe.
  void stop();

  uint64_t owed_pages() const;  // over all processes (not while run() is running)
  const PageServerStats& stats() const;
  // One paragraph for people: what was served, how fast, what went wrong.
  std::string summary() const;
  // The stats as JSON (common/json.h); throws Error naming the path on failure.
  void write_stats_json(const std::string& path) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazycr::uffd
