// `lazycr restore`: runs the restore, then waits for the process (foreground) or leaves it
// running (--detach).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <utility>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "tools/commands.h"

namespace lazycr::cli {
namespace {

// --pidfile, made ready before anything is restored (a path that cannot be written fails the
// command before any process exists) and filled in right before the process runs (a failure
// then still fails the restore, which kills what it made).
class PidFile {
 public:
  explicit PidFile(std::string path) : path_(std::move(path)) {
    if (path_.empty()) return;
    struct stat st;
    if (::stat(path_.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      fail("--pidfile ", path_, ": is a directory");
    tmp_ = cat(path_, ".tmp-", ::getpid());
    fd_.reset(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd_) fail_errno("--pidfile ", path_, ": cannot create ", tmp_);
  }
  ~PidFile() {
    if (fd_) ::unlink(tmp_.c_str());
  }
  PidFile(const PidFile&) = delete;
  PidFile& operator=(const PidFile&) = delete;

  void commit(pid_t pid) {
    if (!fd_) return;
    std::string text = cat(pid, "\n");
    if (::write(fd_.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
      fail_errno("--pidfile: cannot write ", tmp_);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0)
      fail_errno("--pidfile: cannot rename ", tmp_, " to ", path_);
    fd_.reset();
  }

 private:
  std::string path_, tmp_;
  UniqueFd fd_;
};

}  // namespace

int run_restore(const RestoreCliOptions& opts) {
  PidFile pidfile(opts.pidfile);
  restore::RestoreOptions ropts = opts.restore;
  ropts.lazy.detached = opts.detach;
  ropts.before_running = [&](pid_t pid) { pidfile.commit(pid); };
  auto r = restore::restore(ropts);
  const auto& s = r.stats;
  log::info("restored pid ", r.pid,
            r.reaper ? cat(" (pid ", r.image_pid, " in a new PID namespace, reaper ", r.reaper, ")")
                     : std::string(),
            ": ", s.threads, " thread(s), ", s.areas, " areas, ", s.pages_written, " pages written",
            " in ", s.total_ns / 1000, " us (validate ", s.validate_ns / 1000, " us, memory ",
            s.memory_ns / 1000, " us: store reads ", s.fill_read_ns / 1000, " us, writes ",
            s.fill_write_ns / 1000, " us); ", s.injected_syscalls, " injected syscalls in ",
            s.round_trips, " ptrace round trips, ", s.inject_ns / 1000,
            " us; first instruction after ", s.first_instruction_ns / 1000,
            " us from the command's start");
  if (opts.restore.lazy.enabled)
    log::info("restored pid ", r.pid, " lazily: ", s.lazy_pages, " pages of ", s.lazy_areas,
              " areas left to the page server",
              r.server > 0 ? cat(" (pid ", r.server, ")") : std::string(), ", ", s.hot_pages,
              " hot pages written");
  if (opts.detach && r.server > 0 && log::output_fd() == 2)
    log::info("the page server (pid ", r.server, ") writes its messages to ",
              restore::server_log_path(r.server));
  if (opts.detach) {
    std::printf("%d\n", r.pid);
    std::fflush(stdout);
    return 0;
  }
  int code = restore::wait_for_exit(r);
  // --lazy: the page server ends once nothing is owed or nobody is left to serve; its stats
  // are complete when we return.
  restore::wait_for_server(r);
  return code;
}

}  // namespace lazycr::cli
