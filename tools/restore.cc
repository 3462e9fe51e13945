// `lazycr restore`: runs the restore, then waits for the process (foreground) or leaves it
// running (--detach).
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "tools/commands.h"

namespace lazycr::cli {
namespace {

void write_pidfile(const std::string& path, pid_t pid) {
  std::string text = cat(pid, "\n");
  std::string tmp = cat(path, ".tmp-", ::getpid());
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) fail_errno("cannot create pidfile ", tmp);
  if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
    fail_errno("cannot write pidfile ", tmp);
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail_errno("cannot rename ", tmp, " to ", path);
}

}  // namespace

int run_restore(const RestoreCliOptions& opts) {
  restore::RestoreOptions ro = opts.restore;
  ro.lazy.detached = opts.detach;
  auto r = restore::restore(ro);
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
  if (!opts.pidfile.empty()) write_pidfile(opts.pidfile, r.pid);
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
