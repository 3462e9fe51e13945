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
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <utility>

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
namespace {

constexpr uint64_t kPage = 4096;
constexpr int64_t kProbeIntervalNs = 1'000'000'000;  // mm probe of idle processes
constexpr int64_t kMaxResolveBackoffNs = 64'000'000;
constexpr int64_t kEagainGiveUpNs = 10'000'000'000;
constexpr uint64_t kStopKey = 2;  // epoll keys: id << 2 | kind; id 0 is the server's own
constexpr uint64_t kWorkerKey = 3;
constexpr uint64_t kGateKey = 1;
constexpr size_t kMsgBatch = 64;  // uffd messages per read(2)
// Prefetch chunks decompressed ahead at once, and the threads that decompress them: one, so
// that on two CPUs the loop copies while the worker decompresses (a second worker made the
// quiet 2 GiB drain no faster and faults' p99 4x longer: bench/RESULTS.md, "Decompress-ahead
// in real restores"). The worker runs at SCHED_IDLE, and chunks it does not take the loop
// takes back (FillPipeline::take_back): on a busy machine the drain is what it is without it
// (a normal-priority worker there cost it 12%, an idle one without take-back 5x).
constexpr unsigned kPipelineBuffers = 4;
constexpr unsigned kPipelineThreads = 1;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t probe_address(const OwedSet& owed) {
  auto first = owed.first();
  return first ? first->start : 0x10000;
}

std::string hexs(uint64_t v) {
  return hex(v);
}

}  // namespace

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
    WorkingSetQueue ws;  // pushed before the rest of prefetch (use_working_set())
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

  void watch(int fd, uint64_t key) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = key;
    if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
      fail_errno("page server: epoll_ctl ADD fd ", fd);
  }
  void unwatch(int fd) {
    if (fd >= 0) ::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
  }

  int64_t since_start() const { return now_ns() - t0; }

  // ---- processes ---------------------------------------------------------------------------

  Proc& add(std::unique_ptr<Proc> p) {
    if (p->id == 0) p->id = next_id++;  // forked children: reserved by secure_forks()
    Proc& ref = *p;
    const int fl = ::fcntl(ref.uffd.fd(), F_GETFL);
    if (fl < 0 || ::fcntl(ref.uffd.fd(), F_SETFL, fl | O_NONBLOCK) != 0)
      fail_errno("page server: cannot make uffd ", ref.uffd.fd(), " of ", ref.name(),
                 " non-blocking");
    watch(ref.uffd.fd(), ref.id << 2);
    if (ref.pidfd) watch(ref.pidfd.get(), ref.id << 2 | 1);
    auto& slot = stores[ref.store.get()];
    if (!slot.first) slot = {ref.store, ref.store->bytes_decompressed()};
    procs.emplace(ref.id, std::move(p));
    ++stats.processes;
    if (!ref.secured) {
      if (ref.keeper) ref.keeper->park(ref.uffd.fd());
      guardian.add(ref.id, ref.pid, ref.parent_pid, ref.uffd.fd(), ref.pidfd.get());
    }
    return ref;
  }

  // Frees a process's state: its uffd is closed (after the guardian was told).
  void free_proc(Proc& p) {
    unwatch(p.uffd.fd());
    unwatch(p.pidfd.get());
    guardian.release(p.id);
    stats.dropped_pages += p.owed.pages();
    p.owed.clear();
    p.uffd.reset();
    p.pidfd.reset();
  }

  void gone(Proc& p) {
    if (p.gone) return;
    p.gone = true;
    ++stats.exits;
    unwatch(p.uffd.fd());  // freed by reap(); no more wake-ups meanwhile
    unwatch(p.pidfd.get());
  }

  // Removes processes that are gone, and those that owe nothing any more (their uffds are
  // closed: their areas become plain memory).
  void reap() {
    for (auto it = procs.begin(); it != procs.end();) {
      Proc& p = *it->second;
      const bool done = p.gone || (!p.killed && p.owed.empty() && p.faults.empty());
      // A parked uffd keeps its areas registered: its faults need the server until the end.
      if (!done || (!p.gone && p.keeper)) {  // (prefetch jobs for a gone one are dropped)
        ++it;
        continue;
      }
      free_proc(p);
      it = procs.erase(it);
    }
  }

  // Only processes kept for their parked uffd are left, owing nothing.
  bool all_done() const {
    for (const auto& [id, p] : procs)
      if (p->gone || p->killed || !p->owed.empty() || !p->faults.empty()) return false;
    return true;
  }

  // "Nothing owed" is noted when fills or the program's own drops empty the last owed set,
  // not when processes exit or are killed owing pages.
  void note_if_all_served() {
    if (stats.all_served_ns >= 0 || !running) return;
    for (const auto& [id, p] : procs)
      if (!p->gone && (p->killed || !p->owed.empty())) return;
    stats.all_served_ns = since_start();
  }

  uint64_t owed_total() const {
    uint64_t n = 0;
    for (const auto& [id, p] : procs)
      if (!p->killed) n += p->owed.pages();
    return n;
  }

  void kill(Proc& p, const std::string& what) {
    if (p.killed) return;
    std::string msg = cat("page server: ", p.name(), ": ", what);
    bool sent = false;
    if (p.pidfd) {
      sent = send_signal_pidfd(p.pidfd.get(), SIGKILL);
    } else if (p.pid > 0) {
      sent = send_signal(p.pid, SIGKILL);
    }
    if (sent) {
      msg += "; killed the process rather than serve wrong memory";
    } else if (p.pid > 0) {
      msg += cat("; could not kill it (", std::strerror(errno),
                 "): its faults stay unanswered rather than serve wrong memory");
    } else {
      msg +=
          "; its pid is unknown, it cannot be killed: its faults stay unanswered rather "
          "than serve wrong memory";
    }
    p.killed = true;
    p.faults.clear();
    ++stats.killed;
    stats.errors.push_back(msg);
    log::write(log::Level::kError, msg);
  }

  // ---- pids of forked children ---------------------------------------------------------------

  bool unresolved() const {
    for (const auto& [id, p] : procs)
      if (p->pid == 0 && !p->gone) return true;
    return false;
  }

  void resolve_children() {
    bool left = false;
    for (auto& [id, pp] : procs) {
      Proc& p = *pp;
      if (p.pid != 0 || p.gone) continue;
      if (p.parent_pid == 0) {
        auto parent = procs.find(p.parent_id);
        if (parent != procs.end()) p.parent_pid = parent->second->pid;
      }
      if (p.parent_pid <= 0) {
        left = true;
        continue;
      }
      int same_parent = 0;
      for (const auto& [oid, o] : procs)
        if (o->pid == 0 && !o->gone && o->parent_pid == p.parent_pid) ++same_parent;
      const std::vector<pid_t> candidates =
          fork_candidates(p.parent_pid, p.fork_ticks, p.preexisting, seen_pids);
      if (candidates.size() != 1 || same_parent != 1) {
        left = true;
        continue;
      }
      const pid_t c = candidates[0];
      UniqueFd fd(static_cast<int>(::syscall(SYS_pidfd_open, c, 0)));
      if (!fd || parent_of(c) != p.parent_pid) {  // gone, or the pid was reused meanwhile
        left = true;
        continue;
      }
      p.pid = c;
      seen_pids.insert(c);
      p.pidfd = std::move(fd);
      watch(p.pidfd.get(), p.id << 2 | 1);
      guardian.set_pid(p.id, p.pid, p.pidfd.get());
      ++stats.children_found;
      if (p.killed) {  // killed before its pid was known: kill it now
        send_signal_pidfd(p.pidfd.get(), SIGKILL);
      }
    }
    if (left) {
      next_resolve = now_ns() + resolve_backoff;
      resolve_backoff = std::min(resolve_backoff * 2, kMaxResolveBackoffNs);
    }
  }

  // Processes that could have lost their mm without the server hearing of it (exec, or a
  // forked child not found) are probed once a second when prefetch does not find them.
  void probe_mms() {
    for (auto& [id, p] : procs) {
      if (p->gone) continue;
      if (opt.prefetch && p->pidfd && !p->killed) continue;
      if (!mm_alive(p->uffd.fd(), probe_address(p->owed))) gone(*p);
    }
    next_probe = now_ns() + kProbeIntervalNs;
  }

  // The pidfd says the process exited. Its mm is gone then (exit_mm comes before the
  // notification), unless the pid was not this uffd's process after all (a forked child
  // matched to the wrong pid): then its uffd must not be closed under the real one.
  void exited(Proc& p) {
    if (p.killed || !mm_alive(p.uffd.fd(), probe_address(p.owed))) return gone(p);
    unwatch(p.pidfd.get());
    p.pidfd.reset();
    log::warn("page server: ", p.name(), " exited but its mm lives on: ",
              p.parent_id ? "it was not the forked child; looking again"
                          : "serving it until its mm is gone");
    if (p.parent_id != 0) {
      p.pid = 0;
      next_resolve = now_ns();
      resolve_backoff = 1'000'000;
    }
  }

  // ---- events -------------------------------------------------------------------------------

  void apply_event(Proc& p, const uffd_msg& m) {
    switch (m.event) {
      case UFFD_EVENT_FORK: {
        ++stats.events_fork;
        auto child = std::make_unique<Proc>();
        child->id = secured_id(static_cast<int>(m.arg.fork.ufd));
        child->secured = child->id != 0;
        child->uffd = Userfaultfd::adopt(static_cast<int>(m.arg.fork.ufd));
        child->parent_id = p.id;
        child->parent_pid = p.pid;
        child->store = p.store;
        child->keeper = p.keeper;  // the child inherited the parked descriptor
        child->owed = p.owed;      // what the parent owed at this moment
        child->cursor = p.cursor;
        child->killed = p.killed;  // a killed parent's fork is cancelled by the kill
        child->preexisting = p.preexisting;
        child->fork_ticks = boot_ticks();
        add(std::move(child));
        next_resolve = now_ns();  // first try at once (after this batch), then back off
        resolve_backoff = 1'000'000;
        break;
      }
      case UFFD_EVENT_REMAP:
        ++stats.events_remap;
        p.owed.move(m.arg.remap.from, m.arg.remap.to, m.arg.remap.len);
        break;
      case UFFD_EVENT_REMOVE:
        ++stats.events_remove;
        stats.dropped_pages += p.owed.erase(m.arg.remove.start, m.arg.remove.end);
        note_if_all_served();
        break;
      case UFFD_EVENT_UNMAP:
        ++stats.events_unmap;
        stats.dropped_pages += p.owed.erase(m.arg.remove.start, m.arg.remove.end);
        note_if_all_served();
        break;
      default:
        log::warn("page server: ", p.name(), ": unexpected uffd event ", int(m.event));
    }
  }

  // Reads every message pending on p's uffd into msgs. add() made the uffd O_NONBLOCK, so
  // this is one read(2) per kMsgBatch messages (Userfaultfd::read_events() asks fcntl first
  // each time: a system call per fault). msgs has capacity reserved: no allocation here
  // while a process may be forking (see Userfaultfd::read_events()).
  void read_msgs(Proc& p) {
    msgs.clear();
    for (;;) {
      const size_t old = msgs.size();
      msgs.resize(old + kMsgBatch);
      const ssize_t n = ::read(p.uffd.fd(), msgs.data() + old, kMsgBatch * sizeof(uffd_msg));
      if (n < 0) {
        const int err = errno;
        msgs.resize(old);
        if (err == EINTR) continue;
        if (err == EAGAIN) return;
        fail_errno_value(err, cat("read uffd ", p.uffd.fd()));
      }
      const size_t got = static_cast<size_t>(n) / sizeof(uffd_msg);
      msgs.resize(old + got);
      secure_forks(p, old);
      if (got < kMsgBatch) return;
    }
  }

  // The lazy fork window: the kernel lets a forking process go on as soon as the FORK event
  // is read, and the child's uffd exists then only here (installed by the read). If this
  // process dies before another reference exists, the kernel unregisters the child's areas
  // and the child reads zero pages. So, before anything else is done with the batch, each
  // child's uffd is parked in its keeper (inside the processes: it survives the server and
  // the guardian) and handed to the guardian, under an id reserved for apply_event(). What is
  // left of the window (the read's return to these sendmsg calls) is covered by the guardian
  // when it outlives the server: it kills the descendants of the processes it guards that it
  // does not know (uffd/guardian.cc). Both killed inside it, the child loses its uffd: no
  // user space reference can exist sooner (the kernel installs the descriptor in the reader
  // alone, and resumes the fork before the read returns). msgs[from..] were just read.
  void secure_forks(Proc& p, size_t from) {
    for (size_t i = from; i < msgs.size(); ++i) {
      const uffd_msg& m = msgs[i];
      if (m.event != UFFD_EVENT_FORK) continue;
      const int fd = static_cast<int>(m.arg.fork.ufd);
      // Tests (LAZYCR_FAULT_INJECT=server-stop-in-fork-window): stopped inside the window,
      // for a test to kill the server there.
      if (stop_in_fork_window) ::kill(::getpid(), SIGSTOP);
      if (n_secured == secured.size()) continue;  // add() secures it, a little later
      const uint64_t id = next_id++;
      if (p.keeper) p.keeper->park(fd);
      guardian.add(id, 0, p.pid, fd, -1);
      secured[n_secured++] = {fd, id};
    }
  }
  // The id reserved for the child behind `fd` by secure_forks() (forgotten), 0 if none.
  uint64_t secured_id(int fd) {
    for (size_t i = 0; i < n_secured; ++i)
      if (secured[i].first == fd) {
        const uint64_t id = secured[i].second;
        secured[i] = secured[--n_secured];
        return id;
      }
    return 0;
  }
  std::array<std::pair<int, uint64_t>, 4 * kMsgBatch> secured{};
  size_t n_secured = 0;
  bool stop_in_fork_window = [] {
    const char* f = ::getenv("LAZYCR_FAULT_INJECT");
    return f != nullptr && std::strcmp(f, "server-stop-in-fork-window") == 0;
  }();

  // Reads what is pending on p's uffd: layout events are applied at once, faults queued.
  // Returns the number of messages read.
  size_t pull(Proc& p) {
    read_msgs(p);
    const int64_t t = now_ns();
    for (const uffd_msg& m : msgs) {
      if (m.event == UFFD_EVENT_PAGEFAULT) {
        if (stats.first_fault_ns < 0) stats.first_fault_ns = t - t0;
        last_fault_ns = t;  // prefetch fills in small pieces for a while (prefetch_piece())
        if (!p.killed) p.faults.emplace_back(m, t);
      } else {
        apply_event(p, m);
      }
    }
    return msgs.size();
  }

  void service(Proc& p) {
    try {
      // A message from a forked child: its fork has returned, so its pid can be found now
      // (scans of /proc are rate-limited by the backoff).
      // The first message is always a reason to look (the child is blocked in a fault then,
      // so it is visible); later ones are rate-limited by the backoff.
      if (pull(p) > 0 && p.pid == 0 && (!p.looked_on_message || now_ns() >= next_resolve)) {
        p.looked_on_message = true;
        resolve_children();
      }
      // Every queued fault's page first, then the rest of their windows: a thread waits for
      // the pages of the faults read before its own, not for their windows.
      rests.clear();
      while (!p.faults.empty() && !p.killed && !p.gone) {
        auto [m, t] = p.faults.front();
        p.faults.pop_front();
        const int64_t woken = serve_fault(p, m);
        ++stats.faults;
        const int64_t lat = woken - t;
        stats.fault_latency_ns.push_back(static_cast<uint32_t>(std::min<int64_t>(lat, UINT32_MAX)));
      }
      for (const WindowRest& w : rests) {
        fill_owed(p, w.page + kPage, w.end);
        fill_owed(p, w.start, w.page);
      }
      note_if_all_served();
    } catch (const std::exception& e) {
      kill(p, e.what());
    }
  }

  // ---- serving ------------------------------------------------------------------------------

  // Serves one fault's page; returns when the faulting thread was woken (or, if it was not,
  // now). The page is filled alone: UFFDIO_COPY wakes the thread only when the whole ioctl is
  // done (a 64 KiB copy would make it wait for 16 page allocations). Then the rest of its
  // window (the window-sized aligned block holding it, clipped to its owed range):
  // - a fault where the process's last window ended (it reads its memory in order): the
  //   whole window is read first, its page filled, and the rest right after, before the
  //   thread gets to it; then the next window is read ahead into the store's cache;
  // - any other fault: only its page is read first (only its frame is decompressed: a window
  //   straddling two frames made the thread wait for both); the rest is noted in `rests`
  //   for service(), which fills it after every queued fault's page.
  // Reading only the page first for an in-order reader woke it while the rest of its window
  // was still being read and filled: it faulted again there, a second round trip per
  // window (prefetch off, 512 MiB: verification 1.4-1.6x longer, bench/RESULTS.md).
  int64_t serve_fault(Proc& p, const uffd_msg& m) {
    const uint64_t addr = m.arg.pagefault.address & ~(kPage - 1);
    p.cursor = addr;
    const int64_t start = now_ns();
    if (p.ws.contains(addr)) ++stats.working_set_faults;
    for (;;) {
      if (p.killed || p.gone) return now_ns();
      const auto r = p.owed.find(addr);
      const bool zero = !r || r->tag == kTagZero;
      uint64_t ws = addr, we = addr + kPage;
      // Recording a working set: the pages the process touches, not their windows.
      const uint64_t window = recorder && recorder->active() ? kPage : opt.window;
      if (r) {
        const uint64_t bs = addr - addr % window;
        ws = std::max(r->start, bs);
        we = std::min(r->end, bs + window);
      }
      const bool in_order = !zero && addr == p.window_end && we > addr + kPage;
      char* page = window_buf.get() + (addr - ws);
      if (in_order) {
        p.store->read(r->src_of(ws), (we - ws) / kPage, window_buf.get());
      } else if (!zero) {
        p.store->read(r->src_of(addr), 1, page);
      }
      const long res = zero ? p.uffd.zeropage(addr, kPage) : p.uffd.copy(addr, page, kPage);
      if (res > 0) {
        const int64_t woken = now_ns();
        ++stats.copy_ioctls;
        (zero ? stats.zero_pages : stats.fault_pages) += 1;
        if (r) {
          if (recorder) recorder->note(p.id, ws, we, woken);
          p.owed.erase(addr, addr + kPage);
          p.window_end = we;
          if (in_order) {
            fill_from_window(p, addr + kPage, we, ws);
            fill_from_window(p, ws, addr, ws);
            read_ahead(p, we);
          } else if (ws < addr || addr + kPage < we) {
            rests.push_back(WindowRest{ws, addr, we});
          }
        } else {
          ++stats.not_owed_faults;
        }
        return woken;
      }
      if (res == -EEXIST) {  // someone filled it: a failed fill wakes nobody
        ++stats.eexist;
        if (r) p.owed.erase(addr, addr + kPage);
        p.uffd.wake(addr, kPage);
        return now_ns();
      }
      if (res == -EAGAIN) {
        ++stats.eagain;
        if (pull(p) == 0) ::sched_yield();  // the event's writer has not resumed yet
        if (now_ns() - start > kEagainGiveUpNs)
          fail("fills at ", hexs(addr), " keep answering EAGAIN");
        continue;
      }
      if (res == -ESRCH || res == -ENOSPC) {
        gone(p);
        return now_ns();
      }
      if (res == -ENOENT) {  // no registered area there any more
        ++stats.enoent;
        if (r) stats.dropped_pages += p.owed.erase(addr, addr + kPage);
        p.uffd.wake(addr, kPage);
        return now_ns();
      }
      fail("UFFDIO_", zero ? "ZEROPAGE" : "COPY", " at ", hexs(addr), " answered ", res);
    }
  }

  // The next window of a process reading in order, from `from`: read now, so that its frames
  // are in the store's cache when its fault comes (its page is then filled without a
  // decompression). A read that fails here is not this process's fault yet: it fails again
  // when a fault or prefetch needs the page, and that kills the process.
  void read_ahead(Proc& p, uint64_t from) {
    if (p.gone) return;
    const auto r = p.owed.find(from);
    if (!r || r->tag != kTagData) return;
    const uint64_t end = std::min(r->end, from - from % opt.window + opt.window);
    try {
      p.store->read(r->src_of(from), (end - from) / kPage, window_buf.get());
    } catch (const std::exception&) {
    }
  }

  // Fills [from, to) of a fault's window of DATA pages from window_buf, which holds the
  // window from `ws` (uffd/fills.h).
  void fill_from_window(Proc& p, uint64_t from, uint64_t to, uint64_t ws) {
    if (p.gone) return;
    bool lost = false;
    fill_window_part(p.uffd, p.owed, stats, from, to, window_buf.get() + (from - ws), lost);
    if (lost) gone(p);
  }

  // Fills what is still owed in [from, to), part of a fault's window (uffd/fills.h).
  void fill_owed(Proc& p, uint64_t from, uint64_t to) {
    if (p.gone || p.killed) return;
    bool lost = false;
    fill_owed_part(p.uffd, p.owed, *p.store, stats, from, to, window_buf.get(), opt.window, lost);
    if (lost) gone(p);
  }

  // ---- prefetch (the fill pipeline: uffd/fill_pipeline.h) ------------------------------------

  // The next chunk to prefetch, processes in turn, without taking it.
  std::optional<Chunk> peek_chunk() {
    note_working_set_done();
    if (procs.empty()) return std::nullopt;
    auto it = procs.upper_bound(rr_last);
    for (size_t n = 0; n < procs.size(); ++n, ++it) {
      if (it == procs.end()) it = procs.begin();
      Proc& p = *it->second;
      if (p.killed || p.gone || p.owed.empty()) continue;
      if (auto w = p.ws.next(p.owed, opt.prefetch_chunk)) {
        if (use_worker() && pipeline.overlaps(p.id, w->start, w->end - w->start)) continue;
        const uint64_t len = w->end - w->start;
        return Chunk{&p, w->start, w->src, len, w->tag == kTagZero, true, w->record_addr};
      }
      if (!opt.prefetch) continue;  // only the working set is pushed
      auto r = p.owed.next(p.cursor);
      if (!r) r = p.owed.first();
      const uint64_t s = std::max(r->start, p.cursor >= r->end ? r->start : p.cursor);
      const uint64_t len = std::min(r->end - s, opt.prefetch_chunk);
      if (use_worker() && pipeline.overlaps(p.id, s, len)) continue;
      return Chunk{&p, s, r->src_of(s), len, r->tag == kTagZero};
    }
    note_working_set_done();
    return std::nullopt;
  }
  void note_working_set_done() {
    if (!ws_left) return;
    for (const auto& [id, p] : procs)
      if (p->ws.pending() && !p->killed && !p->gone) return;
    ws_left = false;
    stats.working_set_done_ns = since_start();
    log::info("page server: working set pushed: ", stats.working_set_pages, " pages in ",
              stats.working_set_done_ns / 1000, " us");
  }
  void take_chunk(const Chunk& c) {
    c.proc->cursor = c.dst + c.len;
    rr_last = c.proc->id;
  }

  // Fills [dst, dst + len) of p as prefetch (the chunk must still be owed with source src),
  // in pieces of at most prefetch_piece() bytes, none of which wakes anyone; the threads
  // that waited in what was filled are woken once at the end (by the copy itself when it is
  // one piece). `data(off, n)` gives the bytes
  // of [dst + off, dst + off + n) (unused for a ZERO chunk). Between pieces, a fault outside
  // the chunk, a layout event or a message for another process stops it: they wait for one
  // piece at most, not for the chunk. A thread faulting inside the chunk (reading just
  // behind prefetch) waits for its end instead: woken once per chunk, not once per piece
  // (each wake-up costs the server ~8 us here, too much per 128 KiB).
  // Returns the bytes filled.
  template <typename Data>
  uint64_t prefetch_fill(Proc& p, uint64_t dst, uint64_t src, uint64_t len, bool zero,
                         const Data& data) {
    const auto r = p.owed.find(dst);
    if (!r || r->src_of(dst) != src || (r->tag == kTagZero) != zero) return 0;  // stale
    len = std::min(len, r->end - dst);
    const size_t queued = p.faults.size();
    uint64_t done = 0;
    // A chunk of one piece (the working set's runs, mostly) wakes with its copy: one ioctl
    // less per run.
    const bool one_piece = len <= prefetch_piece(now_ns(), last_fault_ns);
    while (done < len) {
      const uint64_t n = std::min(prefetch_piece(now_ns(), last_fault_ns), len - done);
      bool lost = false;
      const uint64_t got = fill_quietly(p.uffd, p.owed, stats, dst + done, n, zero,
                                        zero ? nullptr : data(done, n), lost, one_piece);
      if (lost) gone(p);
      done += got;
      if (got < n || p.gone || done == len || interrupted(p, dst, dst + len)) break;
    }
    if (done > 0 && !p.gone) {
      if (!one_piece) p.uffd.wake(dst, done);
      // Faults read meanwhile on pages now filled were answered by that wake.
      for (size_t i = queued; i < p.faults.size();) {
        const uint64_t a = p.faults[i].first.arg.pagefault.address;
        if (a >= dst && a < dst + done) {
          ++stats.prefetch_waits;
          p.faults.erase(p.faults.begin() + static_cast<long>(i));
        } else {
          ++i;
        }
      }
    }
    if (done < len) p.cursor = dst + done;  // a stopped chunk goes on from there
    note_if_all_served();
    return done;
  }

  // Between two pieces of a prefetch chunk of p covering [lo, hi): must it stop? Yes for a
  // message on another process's uffd, a layout event of p, or a fault of p outside the
  // chunk (p's messages are read here: faults are queued for the loop, events applied).
  bool interrupted(Proc& p, uint64_t lo, uint64_t hi) {
    pfds.clear();
    for (const auto& [id, q] : procs)
      if (!q->gone && q->uffd.valid()) pfds.push_back(pollfd{q->uffd.fd(), POLLIN, 0});
    if (::poll(pfds.data(), pfds.size(), 0) <= 0) return false;
    bool mine = false;
    for (const pollfd& f : pfds) {
      if (f.revents == 0) continue;
      if (f.fd != p.uffd.fd()) return true;
      mine = true;
    }
    if (!mine || p.killed) return false;
    const uint64_t events = events_seen();
    const size_t queued = p.faults.size();
    pull(p);
    if (events_seen() != events || p.gone) return true;
    for (size_t i = queued; i < p.faults.size(); ++i) {
      const uint64_t a = p.faults[i].first.arg.pagefault.address;
      if (a < lo || a >= hi) return true;
    }
    return false;
  }

  // A message (a fault, an event) waits on some process's uffd.
  bool messages_waiting() {
    pfds.clear();
    for (const auto& [id, q] : procs)
      if (!q->gone && q->uffd.valid()) pfds.push_back(pollfd{q->uffd.fd(), POLLIN, 0});
    return ::poll(pfds.data(), pfds.size(), 0) > 0;
  }

  uint64_t events_seen() const {
    return stats.events_fork + stats.events_remap + stats.events_remove + stats.events_unmap;
  }

  bool use_worker() const { return opt.prefetch && opt.prefetch_thread; }
  // The pipeline serves an idle process's drain. A process faulting (reading its memory in
  // order, say) overtook chunks queued ahead and faulted on 40% of its pages (2 GiB, read
  // once: 13,000 faults instead of 50, verified 1.1x later): while faults come, the loop
  // reads the chunks itself, as without the pipeline, and only copies what is ready.
  bool pipelined() const { return use_worker() && !ws_left; }
  bool faults_quiet() const { return now_ns() - last_fault_ns >= kPrefetchQuietNs; }

  void start_worker() {
    if (!use_worker() || pipeline.started()) return;
    pipeline.start();
    watch(pipeline.ready_fd(), kWorkerKey);
  }
  void stop_worker() {
    if (pipeline.started()) unwatch(pipeline.ready_fd());
    pipeline.stop();
  }

  // Hands DATA chunks to the pipeline while it has free buffers; a ZERO chunk met on the way
  // is filled here (once per call). Not the working set: it is wanted now, read here a run at a
  // time; handed over, one wake-up per run of a few pages let node's push reach 224 of its
  // 13,000 pages before node faulted on the rest (bench/RESULTS.md, "Decompress-ahead in real
  // restores").
  void feed_worker() {
    while (pipeline.can_queue()) {
      auto c = peek_chunk();
      if (!c || c->ws) return;
      take_chunk(*c);
      if (c->zero) {
        prefetch_fill(*c->proc, c->dst, c->src, c->len, true,
                      [](uint64_t, uint64_t) { return static_cast<const char*>(nullptr); });
        return;
      }
      pipeline.queue(c->proc->id, c->proc->store, c->dst, c->src, c->len);
    }
  }

  // Whether prefetch has something to do right now without waiting for the pipeline.
  bool prefetch_ready() {
    if (recorder && recorder->active()) return false;  // recording: faults only
    if (!opt.prefetch) return ws_left && peek_chunk().has_value();
    if (pipelined()) {
      if (pipeline.ready() != nullptr) return true;
      if (faults_quiet()) return pipeline.take_back_due() || (pipeline.can_queue() && peek_chunk());
    }
    return peek_chunk().has_value();
  }

  // One prefetch fill (about prefetch_chunk bytes), then back to the loop.
  void prefetch_step() {
    const FillPipeline::Chunk* j = pipelined() ? pipeline.ready() : nullptr;
    if (pipelined() && (j != nullptr || faults_quiet())) {
      if (faults_quiet()) feed_worker();  // decompressed while this chunk is copied
      if (j == nullptr) {
        if (auto c = pipeline.take_back()) {
          auto it = procs.find(c->proc_id);
          if (it != procs.end())
            fill_direct(Chunk{it->second.get(), c->dst, c->src, c->len, false});
        }
        return;
      }
      auto it = procs.find(j->proc_id);
      Proc* p = it == procs.end() ? nullptr : it->second.get();
      if (p != nullptr && !p->killed && !p->gone) {
        try {
          fill_ready(*p, *j);
        } catch (const std::exception& e) {
          kill(*p, e.what());
        }
      }
      pipeline.release(j);
      if (std::exchange(stop_mid_prefetch, false)) ::kill(::getpid(), SIGSTOP);  // (see below)
      return;
    }
    auto c = peek_chunk();
    if (!c) return;
    take_chunk(*c);
    fill_direct(*c);
    // The working set is mostly runs of a page or two (node: 9,931 runs for 13,110 pages): a
    // loop round per run cost more than its copy. More runs in this step, while no message
    // waits (looked for every few runs: a fault waits behind a few pages at most).
    for (int k = 1; c->ws && k < kWorkingSetRunsPerStep; ++k) {
      if (k % 8 == 0 && messages_waiting()) break;
      c = peek_chunk();
      if (!c || !c->ws) break;
      take_chunk(*c);
      fill_direct(*c);
    }
    // Tests (LAZYCR_FAULT_INJECT=server-stop-mid-prefetch): stopped after one chunk, pages
    // still owed, for a test to kill the server and its guardian in a chosen order.
    if (std::exchange(stop_mid_prefetch, false)) ::kill(::getpid(), SIGSTOP);
  }
  // Fills chunk c on the loop thread, reading it piece by piece straight from its store.
  void fill_direct(const Chunk& c) {
    Proc& p = *c.proc;
    if (p.killed || p.gone) return;
    try {
      if (!prefetch_buf) prefetch_buf.reset(new char[kPrefetchPieceQuiet]);
      const uint64_t before = stats.prefetch_pages + stats.zero_pages;
      prefetch_fill(p, c.dst, c.src, c.len, c.zero, [&](uint64_t off, uint64_t n) {
        if (c.ws && p.ws_pages && read_record_pages(p, c.record_addr + off, n))
          return static_cast<const char*>(prefetch_buf.get());
        direct.read(*p.store, c.src + off, n / kPage, prefetch_buf.get());
        return static_cast<const char*>(prefetch_buf.get());
      });
      if (c.ws) stats.working_set_pages += stats.prefetch_pages + stats.zero_pages - before;
    } catch (const std::exception& e) {
      kill(p, e.what());
    }
  }
  // n bytes of p's record pages from `addr` into prefetch_buf. They are only a faster copy of
  // pages the store holds: when they cannot be read (a damaged frame), the store serves the
  // rest of the working set.
  bool read_record_pages(Proc& p, uint64_t addr, uint64_t n) {
    try {
      direct.read(*p.ws_pages, addr, n / kPage, prefetch_buf.get());
      stats.working_set_record_pages += n / kPage;
      return true;
    } catch (const std::exception& e) {
      log::warn("page server: ", p.name(), ": record pages ignored from now on (the page store ",
                "serves the working set): ", e.what());
      p.ws_pages.reset();
      return false;
    }
  }
  // A ready chunk of p: every part of it still owed from the same source is filled, not only
  // a first part (faults served meanwhile split it: a chunk dropped at its first hole was
  // decompressed again later, 2.7-3.0 GiB for 2 GiB read in order, bench/RESULTS.md "Restore
  // (lazy)"). Stops where a fill stops (interrupted, or unusual): the rest stays owed.
  void fill_ready(Proc& p, const FillPipeline::Chunk& j) {
    for (const OwedRange& r : p.owed.still_owed(j.dst, j.len, j.src, kTagData)) {
      if (p.gone || p.killed) return;
      if (!j.error.empty()) fail(j.error);
      const char* buf = j.data + (r.start - j.dst);
      if (prefetch_fill(p, r.start, r.src, r.end - r.start, false,
                        [buf](uint64_t off, uint64_t) { return buf + off; }) < r.end - r.start)
        return;
    }
  }
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

  void kill_owing(const std::string& why) {
    for (auto& [id, p] : procs) {
      if (p->gone || p->killed || p->owed.empty()) continue;
      kill(*p, cat(why, " with ", p->owed.pages(), " pages still owed"));
    }
  }

  // Waits (up to `ms`) for killed processes to exit, so that their uffds outlive them.
  void wait_killed(int ms) {
    const int64_t until = now_ns() + int64_t{ms} * 1'000'000;
    for (auto& [id, p] : procs) {
      if (!p->killed || !p->pidfd) continue;
      for (;;) {
        const int64_t left = (until - now_ns()) / 1'000'000;
        if (left <= 0) break;
        pollfd pfd{p->pidfd.get(), POLLIN, 0};
        int r = ::poll(&pfd, 1, static_cast<int>(left));
        if (r < 0 && errno == EINTR) continue;
        break;
      }
    }
  }

  // Parked uffds first, then ours (and the guardian's copies): the areas are plain memory
  // before any thread is stopped to close a parked descriptor, so no fault can wait for us.
  void release_all() {
    stop_worker();
    std::map<std::shared_ptr<UffdKeeper>, std::vector<pid_t>> holders;
    for (auto& [id, p] : procs)
      if (p->keeper) {
        auto& h = holders[p->keeper];
        if (!p->gone && p->pid > 0) h.push_back(p->pid);
      }
    for (auto& [k, pids] : holders) k->drop_parked();
    for (auto& [id, p] : procs) free_proc(*p);
    procs.clear();
    for (auto& [k, pids] : holders) {
      const UffdKeeper::Released r = k->close_parked(pids);
      stats.parked_closed += r.closed;
      stats.parked_left += r.left;
    }
  }

  const PageServerStats& run() {
    t0 = last_fault_ns = now_ns();  // small pieces while the processes start
    running = true;
    for (auto& [ptr, slot] : stores) slot.second = ptr->bytes_decompressed();
    start_worker();
    if (recorder) recorder->start(t0);
    next_probe = now_ns() + kProbeIntervalNs;
    note_if_all_served();
    bool stopped = false;
    bool gate_open = opt.release_gate_fd < 0;
    if (!gate_open) watch(opt.release_gate_fd, kGateKey);
    epoll_event evs[64];
    for (;;) {
      reap();
      if (procs.empty() || (gate_open && all_done())) break;
      // Faults read between the pieces of a prefetch chunk: their uffd may not be readable
      // any more.
      for (auto& [id, p] : procs)
        if (!p->faults.empty() && !p->gone && !p->killed) service(*p);
      int64_t timeout = -1;  // ms
      const bool pf = prefetch_ready();
      if (pf)
        timeout = 0;
      else if (use_worker() && pipeline.waiting())
        timeout = 1;  // to take back a chunk the worker does not take
      const int64_t now = now_ns();
      if (unresolved()) {
        if (now >= next_resolve) resolve_children();
        timeout = timeout < 0 ? std::max<int64_t>(1, (next_resolve - now) / 1'000'000)
                              : std::min<int64_t>(timeout, (next_resolve - now) / 1'000'000);
      }
      if (now >= next_probe) probe_mms();
      int64_t wake_ns = next_probe;
      if (recorder && recorder->active()) {
        if (now >= recorder->deadline()) recorder->finish("the fault stream went quiet");
        if (recorder->active()) wake_ns = std::min(wake_ns, recorder->deadline());
      }
      const int64_t probe_ms = std::max<int64_t>(1, (wake_ns - now) / 1'000'000);
      timeout = timeout < 0 ? probe_ms : std::min(timeout, probe_ms);
      int n = ::epoll_wait(epoll.get(), evs, 64, static_cast<int>(std::max<int64_t>(0, timeout)));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail_errno("page server: epoll_wait");
      }
      bool busy = false;  // a message or an exit was handled: poll again before prefetching
      for (int i = 0; i < n; ++i) {
        const uint64_t key = evs[i].data.u64;
        if (key == kStopKey) {
          stopped = true;
          continue;
        }
        if (key == kGateKey) {  // (level-triggered: watched no more)
          unwatch(opt.release_gate_fd);
          gate_open = true;
          continue;
        }
        if (key == kWorkerKey) {
          pipeline.consume();
          continue;
        }
        auto it = procs.find(key >> 2);
        if (it == procs.end()) continue;
        Proc& p = *it->second;
        busy = true;
        if (key & 1) {
          if (!p.gone) service(p);  // take what it left (a FORK event, say) first
          if (!p.gone) exited(p);
        } else if (!p.gone) {
          service(p);
        }
      }
      if (stopped) break;
      if (!busy && pf) prefetch_step();
    }
    if (stopped) {
      kill_owing("page server stopped");
      wait_killed(5000);
    }
    if (recorder) recorder->finish("the server finished");
    release_all();
    guardian.finish();
    for (auto& [ptr, slot] : stores)
      stats.bytes_decompressed += ptr->bytes_decompressed() - slot.second;
    stats.bytes_decompressed += pipeline.bytes_loaded() + direct.bytes_loaded();  // (run() once)
    stores.clear();
    stats.run_ns = since_start();
    running = false;
    return stats;
  }
};

PageServer::PageServer(PageServerOptions options) : impl_(std::make_unique<Impl>(options)) {}

PageServer::~PageServer() {
  try {
    impl_->kill_owing("page server closed");
    impl_->wait_killed(5000);
    impl_->release_all();
    impl_->guardian.finish();
  } catch (const std::exception& e) {
    log::write(log::Level::kError, cat("page server: ", e.what()));
  }
}

void PageServer::add_process(pid_t pid, UniqueFd uffd, UniqueFd pidfd,
                             std::shared_ptr<const image::PageStoreReader> store,
                             const std::vector<LazyArea>& areas,
                             std::shared_ptr<UffdKeeper> keeper) {
  if (pid <= 0) fail("page server: refusing pid ", pid);
  if (!uffd) fail("page server: pid ", pid, ": no uffd");
  if (!store) fail("page server: pid ", pid, ": no page store");
  OwedSet owed = owed_in_areas(pid, *store, areas);
  auto p = std::make_unique<Impl::Proc>();
  p->pid = pid;
  p->uffd = Userfaultfd::adopt(uffd.release());
  p->pidfd = std::move(pidfd);
  p->owed = std::move(owed);
  p->cursor = p->owed.first() ? p->owed.first()->start : 0;
  p->preexisting = pids_of(children_of(pid));
  impl_->seen_pids.insert(pid);
  p->store = std::move(store);
  p->keeper = std::move(keeper);
  impl_->add(std::move(p));
}

void PageServer::use_working_set(bool record, int64_t max_ns, int64_t quiet_ns) {
  auto& procs = impl_->procs;
  if (record) {
    impl_->recorder = std::make_unique<WorkingSetRecorder>(max_ns, quiet_ns);
    for (auto& [id, p] : procs)
      impl_->recorder->add_process(id, p->store->path(), p->store->mac_digest(), p->store);
    return;
  }
  std::vector<WorkingSetTarget> targets;
  for (auto& [id, p] : procs)
    targets.push_back(WorkingSetTarget{p->store->path(), p->store->mac_digest(), &p->owed});
  std::vector<LoadedWorkingSet> plans = load_working_set(targets);
  size_t i = 0;
  for (auto& [id, p] : procs) {
    p->ws = WorkingSetQueue(plans[i].runs);
    p->ws_pages = std::move(plans[i++].pages);
    impl_->ws_left = impl_->ws_left || p->ws.pending();
  }
}

void PageServer::start_guardian() {
  if (impl_->guardian.running()) return;
  impl_->guardian.start(impl_->opt.guardian_log_fd);
  for (auto& [id, p] : impl_->procs)
    impl_->guardian.add(p->id, p->pid, p->parent_pid, p->uffd.fd(), p->pidfd.get());
}

pid_t PageServer::guardian_pid() const {
  return impl_->guardian.pid();
}

const PageServerStats& PageServer::run() {
  return impl_->run();
}

void PageServer::stop() {
  uint64_t one = 1;
  (void)!::write(impl_->stop_fd.get(), &one, sizeof(one));
}

uint64_t PageServer::owed_pages() const {
  return impl_->owed_total();
}

const PageServerStats& PageServer::stats() const {
  return impl_->stats;
}

std::string PageServer::summary() const {
  return stats_summary(impl_->stats);
}

void PageServer::write_stats_json(const std::string& path) const {
  write_stats_file(impl_->stats, path);
}

}  // namespace lazycr::uffd
