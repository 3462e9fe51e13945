#include "uffd/page_server.h"

#include "uffd/page_server_impl.h"

#include <fcntl.h>

#include "uffd/huge_collapse.h"

namespace lazycr::uffd {

void PageServer::Impl::watch(int fd, uint64_t key) {
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = key;
  if (::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    fail_errno("page server: epoll_ctl ADD fd ", fd);
}

void PageServer::Impl::unwatch(int fd) {
  if (fd >= 0) ::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
}

auto PageServer::Impl::add(std::unique_ptr<Proc> p) -> Proc& {
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
void PageServer::Impl::free_proc(Proc& p) {
  unwatch(p.uffd.fd());
  unwatch(p.pidfd.get());
  guardian.release(p.id);
  stats.dropped_pages += p.owed.pages();
  p.owed.clear();
  p.uffd.reset();
  p.pidfd.reset();
}

void PageServer::Impl::gone(Proc& p) {
  if (p.gone) return;
  p.gone = true;
  ++stats.exits;
  unwatch(p.uffd.fd());  // freed by reap(); no more wake-ups meanwhile
  unwatch(p.pidfd.get());
}

// Removes processes that are gone, and those that owe nothing any more (their uffds are
// closed: their areas become plain memory).
void PageServer::Impl::reap() {
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
bool PageServer::Impl::all_done() const {
  for (const auto& [id, p] : procs)
    if (p->gone || p->killed || !p->owed.empty() || !p->faults.empty()) return false;
  return true;
}

// "Nothing owed" is noted when fills or the program's own drops empty the last owed set,
// not when processes exit or are killed owing pages.
void PageServer::Impl::note_if_all_served() {
  if (stats.all_served_ns >= 0 || !running) return;
  for (const auto& [id, p] : procs)
    if (!p->gone && (p->killed || !p->owed.empty())) return;
  stats.all_served_ns = since_start();
}

uint64_t PageServer::Impl::owed_total() const {
  uint64_t n = 0;
  for (const auto& [id, p] : procs)
    if (!p->killed) n += p->owed.pages();
  return n;
}

void PageServer::Impl::kill(Proc& p, const std::string& what) {
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

bool PageServer::Impl::unresolved() const {
  for (const auto& [id, p] : procs)
    if (p->pid == 0 && !p->gone) return true;
  return false;
}

void PageServer::Impl::resolve_children() {
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
void PageServer::Impl::probe_mms() {
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
void PageServer::Impl::exited(Proc& p) {
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

void PageServer::Impl::apply_event(Proc& p, const uffd_msg& m) {
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
void PageServer::Impl::read_msgs(Proc& p) {
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
void PageServer::Impl::secure_forks(Proc& p, size_t from) {
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
uint64_t PageServer::Impl::secured_id(int fd) {
  for (size_t i = 0; i < n_secured; ++i)
    if (secured[i].first == fd) {
      const uint64_t id = secured[i].second;
      secured[i] = secured[--n_secured];
      return id;
    }
  return 0;
}

// Reads what is pending on p's uffd: layout events are applied at once, faults queued.
// Returns the number of messages read.
size_t PageServer::Impl::pull(Proc& p) {
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

void PageServer::Impl::service(Proc& p) {
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
int64_t PageServer::Impl::serve_fault(Proc& p, const uffd_msg& m) {
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
void PageServer::Impl::read_ahead(Proc& p, uint64_t from) {
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
void PageServer::Impl::fill_from_window(Proc& p, uint64_t from, uint64_t to, uint64_t ws) {
  if (p.gone) return;
  bool lost = false;
  fill_window_part(p.uffd, p.owed, stats, from, to, window_buf.get() + (from - ws), lost);
  if (lost) gone(p);
}

// Fills what is still owed in [from, to), part of a fault's window (uffd/fills.h).
void PageServer::Impl::fill_owed(Proc& p, uint64_t from, uint64_t to) {
  if (p.gone || p.killed) return;
  bool lost = false;
  fill_owed_part(p.uffd, p.owed, *p.store, stats, from, to, window_buf.get(), opt.window, lost);
  if (lost) gone(p);
}

void PageServer::Impl::kill_owing(const std::string& why) {
  for (auto& [id, p] : procs) {
    if (p->gone || p->killed || p->owed.empty()) continue;
    kill(*p, cat(why, " with ", p->owed.pages(), " pages still owed"));
  }
}

// Waits (up to `ms`) for killed processes to exit, so that their uffds outlive them.
void PageServer::Impl::wait_killed(int ms) {
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
void PageServer::Impl::release_all() {
  stop_worker();
  struct Collapse {
    pid_t pid;
    UniqueFd pidfd;
    std::vector<LazyArea> areas;
  };
  // Collapsed once the uffds are closed: while one is open its areas stay registered.
  std::vector<Collapse> collapses;
  for (auto& [id, p] : procs)
    if (!p->gone && !p->killed && p->pid > 0 && p->owed.pages() == 0 && !p->huge.empty() &&
        p->pidfd)
      collapses.push_back({p->pid, UniqueFd(::fcntl(p->pidfd.get(), F_DUPFD_CLOEXEC, 0)), p->huge});
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
  for (const Collapse& c : collapses)
    if (c.pidfd) collapse_huge_areas(c.pid, c.pidfd.get(), c.areas);
}

const PageServerStats& PageServer::Impl::run() {
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
  if (recorder) recorder->wait();  // the record is in the image when run() returns
  for (auto& [ptr, slot] : stores)
    stats.bytes_decompressed += ptr->bytes_decompressed() - slot.second;
  stats.bytes_decompressed += pipeline.bytes_loaded() + direct.bytes_loaded();  // (run() once)
  stores.clear();
  stats.run_ns = since_start();
  running = false;
  return stats;
}

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
  for (const LazyArea& a : areas)
    if (a.huge) p->huge.push_back(a);
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
    p->ws = WorkingSetQueue(plans[i].runs, plans[i].push_slice_pages);
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
