// The lazy restore's page server process, and lazycr's handle on it (LazyServerGroup,
// restore/memory.h). The strategy that hands it its processes: restore/lazy.cc.
//
// The page server process ("lazycr-server"): forked by lazycr at [server] with the uffd and
// a pidfd of the process; it reopens the page store, starts its guardian, takes the process
// and says "ready" on a pipe, then serves until nothing is owed or no process is left. lazycr
// sets registers and detaches without waiting for it (the server starts up while the process
// takes its first steps; a fault meanwhile waits on the userfaultfd), then waits for "ready"
// at [server-ready]: an error or end of file there fails the restore, which kills the
// processes (they ran a few instructions, never with a missing page); then it writes the time
// to first instruction on a second pipe (the server needs it only for the stats it writes at
// the end; end of file without it means the restore failed, and the server leaves quietly).
// The server calls setsid(): terminal signals do not reach it and it outlives lazycr with
// --detach. SIGTERM makes it stop serving (the processes still owed pages are killed, with a
// message). It is lazycr's child: foreground lazycr waits for it after the restored process
// exited (so --stats is complete when lazycr returns); with --detach lazycr returns at once
// and the server is re-parented like the restored process (to the nearest child subreaper,
// else PID 1). The restored process's parent is lazycr, exactly as in an eager restore: with
// --detach it is re-parented the same way when lazycr exits (with --pidns, its parent is the
// namespace's reaper, and the reaper's parent is lazycr).
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/signals.h"
#include "restore/eager_preread.h"
#include "restore/memory.h"
#include "uffd/keeper.h"
#include "uffd/page_server.h"

namespace lazycr::restore {
namespace {

constexpr int kAbortWaitMs = 10'000;  // a failed restore waits this long for the server

// The store at `st`'s path, opened again, refused unless its index is the one `st` read:
// the restore checked that one (image.mac covers the index, which holds each frame's digest),
// and a store put in its place since must not have its pages served instead.
std::unique_ptr<image::PageStoreReader> reopen_same_store(const image::PageStoreReader& st) {
  auto again = image::PageStoreReader::open(st.path());
  if (again->mac_digest() != st.mac_digest())
    fail(st.path(), ": the page store was replaced since the restore read its index");
  return again;
}

// Stored pages (DATA or ZERO runs) inside [start, end).
// ---- the server process ----------------------------------------------------------------------

// What lazycr tells the server once the process runs.
struct GoMessage {
  int64_t first_instruction_ns;  // from the command's start
  uint64_t eager_pages;          // pages written before the process ran
  uint64_t hot_pages;
  uint64_t lazy_pages;  // stored pages left to the server
  uint64_t lazy_areas;
};

struct ServerLaunch {
  std::vector<ServedProcess> processes;   // the root first
  pid_t root = 0;                         // for the stats and messages
  std::vector<std::string> other_stores;  // page stores of the image the served ones may read
  LazyOptions opts;
  cpu_set_t cpus;
  uint64_t start_ns = 0;
};

uffd::PageServer* g_server = nullptr;

void on_sigterm(int) {
  if (g_server != nullptr) g_server->stop();
}

// The descriptors open on `path` (the page store's, inherited from lazycr).
std::vector<int> fds_on(const std::string& path) {
  std::vector<int> out;
  char* real = ::realpath(path.c_str(), nullptr);
  if (real == nullptr) return out;
  const std::string want = real;
  std::free(real);
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return out;
  const int dir_fd = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    char* end = nullptr;
    long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != 0 || fd == dir_fd) continue;
    char link[4096];
    ssize_t n = ::readlink(cat("/proc/self/fd/", fd).c_str(), link, sizeof link);
    if (n > 0 && std::string(link, static_cast<size_t>(n)) == want)
      out.push_back(static_cast<int>(fd));
  }
  ::closedir(d);
  return out;
}

// Closes every descriptor but `keep` (and 0-2).
void close_all_but(std::vector<int> keep) {
  keep.push_back(0);
  keep.push_back(1);
  keep.push_back(2);
  std::sort(keep.begin(), keep.end());
  unsigned lo = 0;
  for (int k : keep) {
    if (k < 0) continue;
    const unsigned u = static_cast<unsigned>(k);
    if (u > lo) ::syscall(SYS_close_range, lo, u - 1, 0);
    lo = std::max(lo, u + 1);
  }
  ::syscall(SYS_close_range, lo, ~0u, 0);
}

bool read_full(int fd, void* buf, size_t len) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::read(fd, static_cast<char*>(buf) + got, len - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

// The stats file and the -v summary (server side; also the parent's when nothing was lazy).
void write_stats(const std::string& path, pid_t pid, const GoMessage& go,
                 const uffd::PageServerStats& s, int64_t run_from_start_ns) {
  auto from_start = [&](int64_t t) { return t < 0 ? int64_t{-1} : run_from_start_ns + t; };
  std::ofstream f(path, std::ios::trunc);
  if (!f) fail_errno("cannot write lazy restore stats to ", path);
  JsonWriter w(f);
  w.begin_object();
  w.field("pid", static_cast<int64_t>(pid));
  w.field("time_to_first_instruction_ns", go.first_instruction_ns);
  // Nothing owed before the server ran at all: every lazy page was dropped, or none existed.
  w.field("time_until_nothing_owed_ns",
          go.lazy_pages == 0 ? go.first_instruction_ns : from_start(s.all_served_ns));
  w.field("time_to_first_fault_ns", from_start(s.first_fault_ns));
  w.field("server_start_ns", run_from_start_ns);  // the server's loop began (prefetch too)
  w.field("server_run_ns", s.run_ns);
  w.key("restore");
  w.begin_object();
  w.field("eager_pages", go.eager_pages);
  w.field("hot_pages", go.hot_pages);
  w.field("lazy_areas", go.lazy_areas);
  w.field("lazy_pages", go.lazy_pages);
  w.end_object();
  uffd::write_stats_fields(w, s);
  w.end_object();
  f << "\n";
  f.flush();
  if (!f) fail_errno("cannot write lazy restore stats to ", path);
}

std::string ms_text(int64_t ns) {
  if (ns < 0) return "never";
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << ns / 1e6 << " ms";
  return o.str();
}

void log_summary(pid_t pid, const GoMessage& go, const uffd::PageServer* server,
                 int64_t nothing_owed_ns) {
  log::info("lazy restore of pid ", pid, ": first instruction after ",
            ms_text(go.first_instruction_ns), ", nothing owed after ", ms_text(nothing_owed_ns),
            " (", go.eager_pages, " pages written before it ran, ", go.hot_pages, " of them hot; ",
            go.lazy_pages, " pages in ", go.lazy_areas, " lazy areas)");
  if (server != nullptr) log::info(server->summary());
}

// The server process's body (see the top of this file). Never returns.
[[noreturn]] void server_main(const ServerLaunch& l, int ready_wr, int ctl_rd) {
  int code = 1;
  bool ready = false;
  std::string own_log;  // the log file this server made (detached, no --log-file)
  try {
    ::setsid();
    ::prctl(PR_SET_NAME, "lazycr-server", 0, 0, 0);
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    for (int sig : {SIGPIPE, SIGINT, SIGQUIT, SIGHUP, SIGTSTP, SIGTTIN, SIGTTOU})
      ::sigaction(sig, &ign, nullptr);
    // Default for the rest: lazycr's foreground wait blocked some signals.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    // stdin and stdout lead to lazycr's caller: not ours to keep open (a `$(lazycr restore
    // --lazy -d ...)` would wait for the server).
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::close(null);
    }
    // Detached, stderr is not ours either (`out=$(lazycr restore --lazy -d ...)` would wait
    // for the server): messages go to the --log-file, else to a file in a known place.
    if (l.opts.detached) {
      int to = log::output_fd();
      if (to == 2) {
        own_log = server_log_path(::getpid());
        to = ::open(own_log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (to < 0) to = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
      }
      if (to >= 0 && to != 2) {
        ::dup2(to, 2);
        if (to != log::output_fd()) ::close(to);
      }
    }
    // Nothing else of lazycr's (in particular not the --pidns reaper's control pipe), except
    // the page store: its reader is lazycr's, index parsed already (this process is a copy of
    // lazycr, single-threaded at the fork); only its descriptor must stay open.
    const int log_fd = log::output_fd();
    std::vector<int> keep;
    std::vector<bool> store_kept;
    for (const auto& sp : l.processes) {
      std::vector<int> on = fds_on(sp.store->path());
      store_kept.push_back(!on.empty());
      keep.insert(keep.end(), on.begin(), on.end());
      // The stores its read() follows: REF targets and, for an incremental image, the parent
      // chain's stores, which are not in the image's own list.
      for (const auto& path : sp.store->linked_paths()) {
        std::vector<int> linked = fds_on(path);
        keep.insert(keep.end(), linked.begin(), linked.end());
      }
      keep.push_back(sp.uffd);
      keep.push_back(sp.pidfd);
      keep.push_back(sp.keeper_send);
      keep.push_back(sp.keeper_recv);
    }
    // Every other store of the image too: pages of a tree may be stored once, in another
    // process's store (REF runs), which the served stores read through.
    for (const auto& path : l.other_stores) {
      std::vector<int> on = fds_on(path);
      keep.insert(keep.end(), on.begin(), on.end());
    }
    for (int fd : {log_fd, ready_wr, ctl_rd}) keep.push_back(fd);
    close_all_but(keep);
    // Until it is ready, off the CPU lazycr is pinned to (lazycr set that already, right
    // after the fork: the rest of the restore runs there meanwhile); then its own CPUs.
    cpu_set_t cpus = l.cpus;
    if (l.opts.server_cpu >= 0) {
      CPU_ZERO(&cpus);
      CPU_SET(l.opts.server_cpu, &cpus);
    }

    const uint64_t t_fork = now_ns();
    std::vector<std::shared_ptr<const image::PageStoreReader>> stores;
    for (size_t i = 0; i < l.processes.size(); i++) {
      const image::PageStoreReader* st = l.processes[i].store;
      if (store_kept[i])  // never freed: this process ends with _exit
        stores.emplace_back(st, [](const image::PageStoreReader*) {});
      else  // its file was renamed meanwhile: opened (and validated) again
        stores.emplace_back(reopen_same_store(*st).release());
    }
    const uint64_t t_store = now_ns();
    uffd::PageServerOptions o;
    o.window = l.opts.window;
    o.prefetch = l.opts.prefetch;
    o.guardian_log_fd = log_fd;
    // lazycr writes "go" once it has let every process go (or closes the pipe, failing):
    // until then it traces them, and their parked keepers cannot be closed.
    o.release_gate_fd = ctl_rd;
    GoMessage go{};
    uffd::PageServerStats stats;
    int64_t run_from_start = 0;
    bool have_go = false;
    {
      uffd::PageServer server(o);
      g_server = &server;
      struct sigaction term {};
      term.sa_handler = on_sigterm;
      ::sigaction(SIGTERM, &term, nullptr);
      server.start_guardian();
      const uint64_t t_guardian = now_ns();
      for (size_t i = 0; i < l.processes.size(); i++) {
        const ServedProcess& sp = l.processes[i];
        std::shared_ptr<uffd::UffdKeeper> keeper;
        if (sp.keeper_send >= 0)
          keeper = std::make_shared<uffd::UffdKeeper>(UniqueFd(sp.keeper_send),
                                                      UniqueFd(sp.keeper_recv), sp.parked_fd);
        server.add_process(sp.pid, UniqueFd(sp.uffd), UniqueFd(sp.pidfd), stores[i], sp.areas,
                           std::move(keeper));
      }
      server.use_working_set(l.opts.record_working_set, 10'000'000'000,
                             int64_t{l.opts.record_quiet_ms} * 1'000'000);
      log::debug("page server: store ", (t_store - t_fork) / 1000, " us, guardian ",
                 (t_guardian - t_store) / 1000, " us, add_process ", (now_ns() - t_guardian) / 1000,
                 " us");
      // Tests (LAZYCR_FAULT_INJECT=server-start): the server fails before it is ready.
      const char* inject = ::getenv("LAZYCR_FAULT_INJECT");
      if (inject != nullptr && std::strcmp(inject, "server-start") == 0)
        fail("injected fault before the page server was ready");
      // EPIPE: lazycr gave up (the restore failed): the process is being killed, and run()
      // ends as soon as it is gone.
      const char r = 'R';
      (void)!::write(ready_wr, &r, 1);
      ::close(ready_wr);
      ready = true;
      if (::sched_setaffinity(0, sizeof cpus, &cpus) != 0)  // serving goes on regardless
        log::warn("page server: cannot run on the CPUs asked for (sched_setaffinity: ",
                  std::strerror(errno), ")");
      run_from_start = static_cast<int64_t>(now_ns() - l.start_ns);
      stats = server.run();
      g_server = nullptr;
      have_go = read_full(ctl_rd, &go, sizeof go);
      if (have_go) {
        const int64_t owed = go.lazy_pages == 0        ? go.first_instruction_ns
                             : stats.all_served_ns < 0 ? -1
                                                       : run_from_start + stats.all_served_ns;
        log_summary(l.root, go, &server, owed);
      }
    }
    if (have_go) {
      if (!l.opts.stats_file.empty())
        write_stats(l.opts.stats_file, l.root, go, stats, run_from_start);
      code = stats.killed > 0 ? 1 : 0;
    }
    // Without the message the restore failed: lazycr reports that; nothing to add.
    // A log nobody wrote to says nothing: one per detached restore would pile up (the
    // guardian, which shares it, has been reaped by now).
    struct stat st;
    if (!own_log.empty() && ::stat(own_log.c_str(), &st) == 0 && st.st_size == 0)
      ::unlink(own_log.c_str());
  } catch (const std::exception& e) {
    g_server = nullptr;
    if (!ready) {
      std::string msg = e.what();
      (void)!::write(ready_wr, msg.data(), msg.size());
    } else {
      log::write(log::Level::kError, cat("page server: ", e.what()));
    }
    code = 1;
  }
  ::_exit(code);
}

}  // namespace

std::string server_log_path(pid_t server) {
  if (::mkdir("/run/lazycr", 0755) == 0 || errno == EEXIST)
    if (::access("/run/lazycr", W_OK) == 0) return cat("/run/lazycr/server-", server, ".log");
  return cat("/tmp/lazycr-server-", server, ".log");
}

namespace {

// lazycr's handle on the server process.
class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() { abort(); }

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Forks the server. The caller is single-threaded here (the eager filler has not started
  // its helper thread yet): the child may allocate.
  void start(const ServerLaunch& l, const cpu_set_t* setup_cpus) {
    int ready[2], ctl[2];
    if (::pipe2(ready, O_CLOEXEC) != 0) fail_errno("pipe2");
    UniqueFd ready_rd(ready[0]), ready_wr(ready[1]);
    if (::pipe2(ctl, O_CLOEXEC) != 0) fail_errno("pipe2");
    UniqueFd ctl_rd(ctl[0]), ctl_wr(ctl[1]);
    std::fflush(nullptr);
    pid_t pid = ::fork();
    if (pid < 0) fail_errno("fork of the page server");
    if (pid == 0) server_main(l, ready_wr.get(), ctl_rd.get());
    pid_ = pid;
    if (setup_cpus != nullptr) ::sched_setaffinity(pid, sizeof *setup_cpus, setup_cpus);
    pidfd_.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd_) {  // it cannot be watched: it goes (the process is not running yet)
      const int err = errno;
      send_signal(pid, SIGKILL);
      int status;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      pid_ = 0;
      fail_errno_value(err, cat("pidfd_open of the page server (pid ", pid, ")"));
    }
    ready_rd_ = std::move(ready_rd);
    ctl_wr_ = std::move(ctl_wr);
  }

  // True once the server has answered (ready, its error, or its end), waiting up to `ms`.
  bool answered(int ms) const {
    if (!ready_rd_) return false;  // it said what it had to
    pollfd pf{ready_rd_.get(), POLLIN, 0};
    int n;
    do {
      n = ::poll(&pf, 1, ms);
    } while (n < 0 && errno == EINTR);
    return n != 0;
  }

  // Waits until the server holds the process (its guardian too); throws with the server's
  // own error otherwise.
  void wait_ready() {
    std::string msg;
    char buf[512];
    for (;;) {
      ssize_t n = ::read(ready_rd_.get(), buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail_errno("reading the page server's answer");
      if (n == 0) break;
      msg.append(buf, static_cast<size_t>(n));
      if (msg == "R") break;
    }
    ready_rd_.reset();
    if (msg == "R") return;
    if (!msg.empty()) fail("page server (pid ", pid_, "): ", msg);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_t was = pid_;
    pid_ = 0;
    pidfd_.reset();
    fail("the page server (pid ", was, ") exited before it was ready (",
         WIFSIGNALED(status) ? cat("signal ", WTERMSIG(status))
                             : cat("status ", WEXITSTATUS(status)),
         ")");
  }

  // The process runs: tells the server (for its stats), then hands it over to the caller.
  ServerHandle go(const GoMessage& m) noexcept {
    if (::write(ctl_wr_.get(), &m, sizeof m) != static_cast<ssize_t>(sizeof m))
      log::warn("cannot tell the page server (pid ", pid_,
                ") that the process runs: ", std::strerror(errno),
                " (it serves on, without stats)");
    ctl_wr_.reset();
    ServerHandle h;
    h.pid = pid_;
    h.pidfd = std::move(pidfd_);
    pid_ = 0;
    return h;
  }

  // The restore failed (the process has been killed by now): the server sees the process
  // gone and ends; it says nothing, finding no "go" message. Reaped here.
  void abort() noexcept {
    if (pid_ <= 0) return;
    ready_rd_.reset();
    ctl_wr_.reset();
    if (pidfd_) {
      pollfd p{pidfd_.get(), POLLIN, 0};
      int r;
      do {
        r = ::poll(&p, 1, kAbortWaitMs);
      } while (r < 0 && errno == EINTR);
      if (r == 0) {
        log::warn("the page server (pid ", pid_, ") did not end after the failed restore: killed");
        send_signal_pidfd(pidfd_.get(), SIGKILL);
      }
    }
    int status;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = 0;
    pidfd_.reset();
  }

 private:
  pid_t pid_ = 0;
  UniqueFd pidfd_;
  UniqueFd ready_rd_;
  UniqueFd ctl_wr_;
};

void write_pidfile(const std::string& path, pid_t pid) {
  std::string tmp = cat(path, ".tmp-", ::getpid());
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << pid << "\n";
    if (!f.flush()) fail_errno("cannot write the server pidfile ", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail_errno("cannot rename ", tmp, " to ", path);
}

}  // namespace

// How long a failed step waits for the page server's answer before reporting its own error:
// the server's end waits up to 5 s for the processes it killed.
constexpr int kServerVerdictMs = 8000;

struct LazyServerGroup::Impl {
  RestoreOptions opts;
  cpu_set_t cpus;
  std::vector<ServedProcess> processes;
  ServerProcess server;
  bool ready = false;
  uint64_t running_ns = 0;  // when wait_ready() began: the processes run from then on
};

LazyServerGroup::LazyServerGroup(const RestoreOptions& opts, const cpu_set_t& cpus)
    : impl_(std::make_unique<Impl>()) {
  impl_->opts = opts;
  impl_->cpus = cpus;
}

LazyServerGroup::~LazyServerGroup() = default;

void LazyServerGroup::add(ServedProcess p) {
  impl_->processes.push_back(std::move(p));
}

void LazyServerGroup::start(pid_t root, const std::vector<std::string>& stores) {
  if (impl_->processes.empty()) return;
  // The server is a fork that uses the stores: no other thread may be in them then.
  if (impl_->opts.preread) impl_->opts.preread->wait();
  ServerLaunch l;
  l.processes = impl_->processes;
  l.root = root;
  l.other_stores = stores;
  l.opts = impl_->opts.lazy;
  l.cpus = impl_->cpus;
  l.start_ns = impl_->opts.start_ns;
  // The server starts up on the other CPUs, not on the one this thread is pinned to (the
  // restore goes on there): measured, that step otherwise took 0.7-1.6 ms instead of 0.15.
  cpu_set_t pinned, setup;
  CPU_ZERO(&setup);
  if (::sched_getaffinity(0, sizeof pinned, &pinned) == 0) CPU_XOR(&setup, &impl_->cpus, &pinned);
  CPU_AND(&setup, &setup, &impl_->cpus);
  impl_->server.start(l, CPU_COUNT(&setup) > 0 ? &setup : nullptr);
  if (!impl_->opts.lazy.server_pidfile.empty())
    write_pidfile(impl_->opts.lazy.server_pidfile, impl_->server.pid());
}

void LazyServerGroup::wait_ready() {
  if (impl_->running_ns == 0) impl_->running_ns = now_ns();  // the processes were let go
  if (impl_->ready || !impl_->server.started()) return;
  impl_->server.wait_ready();
  impl_->ready = true;
}

bool LazyServerGroup::server_pending() const {
  return !impl_->ready && impl_->server.started();
}

void LazyServerGroup::raise_server_failure() {
  if (!server_pending()) return;
  if (!impl_->server.answered(kServerVerdictMs)) return;
  impl_->server.wait_ready();
  impl_->ready = true;
}

ServerHandle LazyServerGroup::go(pid_t root, const MemoryStats& total) noexcept {
  GoMessage m{};
  const uint64_t running = impl_->running_ns != 0 ? impl_->running_ns : now_ns();
  m.first_instruction_ns = static_cast<int64_t>(running - impl_->opts.start_ns);
  m.eager_pages = total.pages_written;
  m.hot_pages = total.hot_pages;
  m.lazy_pages = total.lazy_pages;
  m.lazy_areas = total.lazy_areas;
  if (impl_->server.started()) return impl_->server.go(m);
  // Nothing lazy: no server; the stats say so.
  log_summary(root, m, nullptr, m.first_instruction_ns);
  if (!impl_->opts.lazy.stats_file.empty()) {
    try {
      write_stats(impl_->opts.lazy.stats_file, root, m, uffd::PageServerStats{}, 0);
    } catch (const Error& e) {
      log::warn(e.what());
    }
  }
  return {};
}

}  // namespace lazycr::restore
