// `lazycr restore`: bring a dumped process back from its image directory, with its own PID and
// thread IDs, its exact address space and its recorded state (DESIGN.md section 5).
//
// The memory of the restored process is written by a pluggable strategy (restore/memory.h):
// eager (every stored page is written before the process resumes) or lazy (private anonymous
// memory is served on first touch by a page server process through userfaultfd, DESIGN.md
// sections 5 and 6; see restore/lazy.cc).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/fd.h"

namespace lazycr::restore {

struct HeldTemplate;  // restore/template.h
class EagerPreread;   // restore/eager_preread.h

// Lazy restore (--lazy). The page server runs in its own process ("lazycr-server", forked by
// lazycr once the userfaultfd is registered, in its own session so that terminal signals do
// not reach it) with its guardian; it exits when nothing is owed any more (or no process is
// left to serve), writing the stats.
struct LazyOptions {
  bool enabled = false;
  bool prefetch = true;         // push owed pages in the background
  uint64_t window = 64 * 1024;  // bytes filled per fault
  std::string stats_file;       // JSON written by the server when it finishes ("" = none)
  std::string server_pidfile;   // the server process's pid, written once it is started
  // --record-working-set: the server records the pages the first seconds' faults needed in
  // the image directory (uffd/working_set.h); without it, a record there is used.
  bool record_working_set = false;
  int record_quiet_ms = 1000;  // ... until this long without a fault (at most 10 s)
  // Trees: each child is forked once its parent holds the pages they share, so that they stay
  // shared copy-on-write (restore/tree_sharing.h); the first instruction waits for those pages.
  // false (--no-tree-sharing): every child is forked at once and owes its own copy of them.
  bool tree_sharing = true;
  int server_cpu = -1;  // pin the server (and its prefetch thread) to this CPU
                        // (benchmarks); -1: lazycr's own CPU mask
  // --detach: the server (and its guardian) must not keep lazycr's caller's terminal or pipes:
  // their messages go to --log-file, else to server_log_path(server pid).
  bool detached = false;
};

// Where a detached page server without --log-file writes its messages (the guardian's too):
// /run/lazycr/server-PID.log (/tmp/lazycr-server-PID.log when /run/lazycr cannot be made).
std::string server_log_path(pid_t server);

struct RestoreOptions {
  std::string dir;         // image directory
  bool shell_job = false;  // fds 0-2 pointing to a tty or to anything lazycr cannot restore
                           // become lazycr's own fds 0-2 (a root that led no session stays
                           // in lazycr's session, with or without this)
  // Descriptors the image recorded as not restorable (dump --skip-unsupported-fds) are opened
  // as /dev/null instead of refusing the image (restore/skipped_fds.h).
  bool skip_unsupported_fds = false;
  // Restore the image's established TCP connections (dump --tcp-established).
  bool tcp_established = false;
  bool pidns = false;  // restore into a fresh PID namespace whose PID 1 is a minimal
                       // reaper (the restored process is its child and sees ppid 1)
  // --ext-unix-sk: datagram UNIX sockets the dump recorded connected to a bound socket outside
  // the tree are connected to it again (objects/unix_socket.h).
  bool ext_unix_sk = false;
  bool netns = false;  // restore into a fresh network namespace with loopback up: sockets
                       // are made there and the tree's first process is cloned into it
  // Restore an image that asks for privileges (restore/trust.h) without the check of its MAC.
  bool trust_image = false;
  LazyOptions lazy;
  // When the command started (steady clock, ns; 0 = when restore() starts): the origin of
  // "time to first instruction" and of the lazy stats' times.
  uint64_t start_ns = 0;
  // Internal (set by restore() for a lazy restore): the eager pages, read on a thread.
  std::shared_ptr<const EagerPreread> preread;
  // Called with the restored root's pid (in lazycr's namespace) once everything is built, right
  // before anything runs (e.g. to write a pidfile); an exception fails the restore, which then
  // kills everything it made.
  std::function<void(pid_t)> before_running;
  // Internal, for tests: make the named step fail as if a system call had failed there
  // (see kSteps in restore.cc); everything created so far must be killed and reaped.
  std::string fault_inject;
  // `lazycr template` (restore/template.h): called instead of releasing the built process;
  // when it returns, the process is killed.
  std::function<void(HeldTemplate&)> hold;
};

struct RestoreStats {
  uint64_t total_ns = 0;           // restore() from start to every thread running
  uint64_t validate_ns = 0;        // reading + validating the image
  uint64_t memory_ns = 0;          // mapping areas and writing pages
  uint64_t injected_syscalls = 0;  // system calls run inside the restored process
  uint64_t round_trips = 0;        // ptrace round trips that ran them (one per call or batch)
  uint64_t inject_ns = 0;          // wall time spent in those round trips
  uint64_t threads = 0;
  uint64_t areas = 0;
  uint64_t pages_written = 0;  // pages written into the process before it runs
  uint64_t bytes_written = 0;
  uint64_t lazy_areas = 0;            // --lazy: areas registered with userfaultfd
  uint64_t lazy_pages = 0;            // --lazy: stored pages left to the page server
  uint64_t hot_pages = 0;             // --lazy: pages of lazy areas written eagerly (see lazy.cc)
  uint64_t first_instruction_ns = 0;  // command start (RestoreOptions::start_ns) to running
  uint64_t fill_read_ns = 0;          // of memory_ns: reading (decompressing) pages from the store
  uint64_t fill_write_ns = 0;         // of memory_ns: process_vm_writev into the process
};

// What the caller needs once the process runs. Moves only.
struct Restored {
  pid_t pid = 0;        // the restored process as seen from lazycr's PID namespace
  pid_t image_pid = 0;  // its pid inside its own namespace (== pid without --pidns)
  pid_t reaper = 0;     // --pidns: the namespace's PID 1 (our child); else 0
  // Our child to wait for: the restored process itself, or the reaper with --pidns (which
  // exits with the restored process's status, 128+N for a signal).
  pid_t child = 0;
  UniqueFd pidfd;  // pidfd of the restored process (signals are sent through it)
  // --lazy: the page server process (our child; 0 when nothing was left lazy).
  pid_t server = 0;
  UniqueFd server_pidfd;
  RestoreStats stats;
};

// Validates the whole image, then builds the process and lets it run. Throws Error with one
// line "restore: <step> for pid|tid N: <why>"; on failure everything created so far has been
// killed and reaped.
Restored restore(const RestoreOptions& opts);

// Foreground mode: waits until the restored process exits and returns its exit status
// (0-255, or 128+N when killed by signal N). SIGTERM, SIGHUP, and SIGINT/SIGQUIT sent to
// lazycr by kill(2) (not by the terminal, which already signals the whole process group) are
// passed on to the restored process.
int wait_for_exit(Restored& restored);

// --lazy, foreground: once the restored process has exited, waits for the page server, which
// finishes when nothing is owed or no process is left to serve (a child the restored process
// forked may still owe pages). Returns its exit status (0: every page served or dropped by
// the program; 1: it killed a process rather than serve wrong memory, or failed).
int wait_for_server(Restored& restored);

}  // namespace lazycr::restore
