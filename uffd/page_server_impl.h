// Internal to uffd/: the page server's state and steps (uffd/page_server.h is its face).
// page_server.cc holds the processes, their events, fault service and the loop;
// page_server_prefetch.cc the prefetch (the working-set push, the fill pipeline's use).
#pragma once

#include "uffd/page_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <utility>

#include "common/clock.h"
#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/signals.h"
#include "image-format/page_store_direct.h"
#include "uffd/fill_pipeline.h"
#include "uffd/fills.h"
#include "uffd/guardian.h"
#include "uffd/keeper.h"
#include "uffd/owed_areas.h"
#include "uffd/owed_set.h"
#include "uffd/page_server_stats.h"
#include "uffd/proc_scan.h"
#include "uffd/uffd.h"
#include "uffd/working_set.h"

namespace lazycr::uffd {

inline constexpr uint64_t kPage = 4096;
inline constexpr int64_t kProbeIntervalNs = 1'000'000'000;  // mm probe of idle processes
inline constexpr int64_t kMaxResolveBackoffNs = 64'000'000;
inline constexpr int64_t kEagainGiveUpNs = 10'000'000'000;
inline constexpr uint64_t kStopKey = 2;  // epoll keys: id << 2 | kind; id 0 is the server's own
inline constexpr uint64_t kWorkerKey = 3;
inline constexpr uint64_t kGateKey = 1;
inline constexpr size_t kMsgBatch = 64;  // uffd messages per read(2)
// Prefetch chunks decompressed ahead at once, and the threads that decompress them: one, so
// that on two CPUs the loop copies while the worker decompresses (a second worker made the
// quiet 2 GiB drain no faster and faults' p99 4x longer: bench/RESULTS.md, "Decompress-ahead
// in real restores"). The worker runs at SCHED_IDLE, and chunks it does not take the loop
// takes back (FillPipeline::take_back): on a busy machine the drain is what it is without it
// (a normal-priority worker there cost it 12%, an idle one without take-back 5x).
inline constexpr unsigned kPipelineBuffers = 4;
inline constexpr unsigned kPipelineThreads = 1;

inline int64_t now_ns() {
  return monotonic_ns();
}

inline uint64_t probe_address(const OwedSet& owed) {
  auto first = owed.first();
  return first ? first->start : 0x10000;
}

inline std::string hexs(uint64_t v) {
  return hex(v);
}

struct PageServer::Impl {
  struct Proc {
    uint64_t id = 0;
    pid_t pid = 0;           // 0: a forked child whose pid is not found yet
    uint64_t parent_id = 0;  // forked children: the process they forked from
    pid_t parent_pid = 0;    // its pid when known
    // Children of this process that are not its forks seen through the uffd: those it had
    // when handed to the server (sorted). A forked child inherits its parent's list.
    std::vector<pid_t> preexisting;
    uint64_t fork_ticks = 0;         // forked children: boot clock (ticks) when the event was read
    bool looked_on_message = false;  // looked for its pid on a message from its uffd
    Userfaultfd uffd;
    UniqueFd pidfd;
    std::shared_ptr<UffdKeeper> keeper;  // its parked reference (forked children: the parent's)
    std::shared_ptr<const image::PageStoreReader> store;
    OwedSet owed;
    uint64_t cursor = 0;      // prefetch continues upward from here
    uint64_t window_end = 0;  // the end of the last fault's window
    bool killed = false;      // killed rather than served wrong memory: faults stay unanswered
    bool gone = false;        // exited (or its mm is gone): to be freed
    bool secured = false;     // forked children: parked and with the guardian already
    std::deque<std::pair<uffd_msg, int64_t>> faults;  // read, not served yet (msg, read time)
    WorkingSetQueue ws;          // pushed before the rest of prefetch (use_working_set())
    std::vector<LazyArea> huge;  // its areas with LazyArea::huge, collapsed at release_all()
    // Its record pages (working-set-<pid>.lzp): where the push reads ws's pages, or nullptr.
    std::shared_ptr<const image::PageStoreReader> ws_pages;

    std::string name() const {
      if (pid > 0) return cat("pid ", pid);
      return cat("forked child of ", parent_pid > 0 ? cat("pid ", parent_pid) : "a forked child");
    }
  };

  struct Chunk {
    Proc* proc;
    uint64_t dst, src, len;
    bool zero;
    bool ws = false;           // from the working set
    uint64_t record_addr = 0;  // ws: where its pages are in proc->ws_pages
  };

  PageServerOptions opt;
  PageServerStats stats;
  std::map<uint64_t, std::unique_ptr<Proc>> procs;
  uint64_t next_id = 1;
  UniqueFd epoll;
  UniqueFd stop_fd;
  GuardianClient guardian;
  std::unique_ptr<char[]> window_buf;
  std::vector<uffd_msg> msgs;
  // The rest of the windows of the faults being served: [start, end) but the faulting page.
  struct WindowRest {
    uint64_t start, page, end;
  };
  std::vector<WindowRest> rests;
  std::unique_ptr<WorkingSetRecorder> recorder;  // --record-working-set
  bool ws_left = false;                          // a working set is still being pushed
  bool running = false;
  int64_t t0 = 0;
  int64_t next_resolve = 0, resolve_backoff = 1'000'000, next_probe = 0;
  uint64_t rr_last = 0;       // round robin of prefetch: the last process served
  std::set<pid_t> seen_pids;  // every pid the server ever served (found children too)
  std::map<const image::PageStoreReader*,
           std::pair<std::shared_ptr<const image::PageStoreReader>, uint64_t>>
      stores;  // bytes decompressed at the start of run()

  FillPipeline pipeline;  // decompresses prefetch chunks ahead

  explicit Impl(PageServerOptions o)
      : opt(o), pipeline(o.prefetch_chunk, kPipelineBuffers, kPipelineThreads) {
    if (opt.window < kPage || opt.window % kPage)
      fail("page server: window ", opt.window, " is not a multiple of ", kPage);
    if (opt.prefetch_chunk < kPage || opt.prefetch_chunk % kPage)
      fail("page server: prefetch chunk ", opt.prefetch_chunk, " is not a multiple of ", kPage);
    epoll.reset(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll) fail_errno("page server: epoll_create1");
    stop_fd.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!stop_fd) fail_errno("page server: eventfd");
    watch(stop_fd.get(), kStopKey);
    window_buf.reset(new char[opt.window]);
    msgs.reserve(4 * kMsgBatch);
    rests.reserve(4 * kMsgBatch);
  }

  ~Impl() { stop_worker(); }
  void watch(int fd, uint64_t key);
  void unwatch(int fd);

  int64_t since_start() const { return now_ns() - t0; }

  // ---- processes ---------------------------------------------------------------------------
  Proc& add(std::unique_ptr<Proc> p);
  void free_proc(Proc& p);
  void gone(Proc& p);
  void reap();
  bool all_done() const;
  void note_if_all_served();
  uint64_t owed_total() const;
  void kill(Proc& p, const std::string& what);

  // ---- pids of forked children ---------------------------------------------------------------
  bool unresolved() const;
  void resolve_children();
  void probe_mms();
  void exited(Proc& p);

  // ---- events -------------------------------------------------------------------------------
  void apply_event(Proc& p, const uffd_msg& m);
  void read_msgs(Proc& p);
  void secure_forks(Proc& p, size_t from);
  uint64_t secured_id(int fd);
  std::array<std::pair<int, uint64_t>, 4 * kMsgBatch> secured{};
  size_t n_secured = 0;
  bool stop_in_fork_window = [] {
    const char* f = ::getenv("LAZYCR_FAULT_INJECT");
    return f != nullptr && std::strcmp(f, "server-stop-in-fork-window") == 0;
  }();
  size_t pull(Proc& p);
  void service(Proc& p);

  // ---- serving ------------------------------------------------------------------------------
  int64_t serve_fault(Proc& p, const uffd_msg& m);
  void read_ahead(Proc& p, uint64_t from);
  void fill_from_window(Proc& p, uint64_t from, uint64_t to, uint64_t ws);
  void fill_owed(Proc& p, uint64_t from, uint64_t to);

  // ---- prefetch (the fill pipeline: uffd/fill_pipeline.h) ------------------------------------
  std::optional<Chunk> peek_chunk();
  void note_working_set_done();
  void take_chunk(const Chunk& c);
  template <typename Data>
  uint64_t prefetch_fill(Proc& p, uint64_t dst, uint64_t src, uint64_t len, bool zero,
                         const Data& data);
  bool interrupted(Proc& p, uint64_t lo, uint64_t hi);
  bool messages_waiting();
  uint64_t events_seen() const;

  bool use_worker() const { return opt.prefetch && opt.prefetch_thread; }
  // The pipeline serves an idle process's drain. A process faulting (reading its memory in
  // order, say) overtook chunks queued ahead and faulted on 40% of its pages (2 GiB, read
  // once: 13,000 faults instead of 50, verified 1.1x later): while faults come, the loop
  // reads the chunks itself, as without the pipeline, and only copies what is ready.
  bool pipelined() const { return use_worker() && !ws_left; }
  bool faults_quiet() const { return now_ns() - last_fault_ns >= kPrefetchQuietNs; }
  void start_worker();
  void stop_worker();
  void feed_worker();
  bool prefetch_ready();
  void prefetch_step();
  void fill_direct(const Chunk& c);
  bool read_record_pages(Proc& p, uint64_t addr, uint64_t n);
  void fill_ready(Proc& p, const FillPipeline::Chunk& j);
  static constexpr int kWorkingSetRunsPerStep = 64;
  std::unique_ptr<char[]> prefetch_buf;  // prefetch without the pipeline: one piece
  // Prefetch without the pipeline reads whole frames straight into prefetch_buf, checked two
  // at a time, not through the frame cache (a copy less, and the frames faults need stay
  // cached): page_store_direct.h.
  image::DirectPageReader direct;
  int64_t last_fault_ns = 0;  // when a fault message was last read (or run() began)
  bool stop_mid_prefetch = [] {
    const char* f = ::getenv("LAZYCR_FAULT_INJECT");
    return f != nullptr && std::strcmp(f, "server-stop-mid-prefetch") == 0;
  }();
  std::vector<pollfd> pfds;

  // ---- the loop -----------------------------------------------------------------------------
  void kill_owing(const std::string& why);
  void wait_killed(int ms);
  void release_all();
  const PageServerStats& run();
};

}  // namespace lazycr::uffd
