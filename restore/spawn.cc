// Creating the process to restore: clone3 with set_tid, directly or under a PID-namespace
// reaper.
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/linux_abi.h"
#include "common/proc.h"
#include "restore/internal.h"

namespace lazycr::restore {

// Choosing a PID (clone3 set_tid) needs CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) over the PID
// namespace; without it the kernel's EPERM says nothing of that.
constexpr const char kSetTidNeedsPrivilege[] =
    "restoring a process with its own PID needs root (or CAP_CHECKPOINT_RESTORE), which lazycr "
    "does not have: clone3 with set_tid refused (EPERM) for pid ";
namespace {

// Everything below that runs in a new process (child_main, reaper_main) uses raw system calls
// only: it is a copy of lazycr made by clone3, without glibc's fork handlers.

long raw_clone3(abi::clone_args& args) {
  return ::syscall(SYS_clone3, &args, sizeof args);
}

// The process to restore, right after clone3. It dies with its parent until the restorer has
// seized it (PTRACE_O_EXITKILL takes over from there), waits until the restorer closes the
// last write end of the `go` pipe, and stops itself: the restorer sees that SIGSTOP as a
// signal-delivery-stop, suppresses it and drives the process from there. (Stopping before
// being seized would put the process into a group-stop that PTRACE_DETACH re-enters at the
// end of the restore; see DESIGN notes in restore.cc.)
[[noreturn]] void child_main(int go_rd, int go_wr, pid_t expected_parent) {
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (::syscall(SYS_getppid) != expected_parent) ::syscall(SYS_exit_group, 126);
  ::syscall(SYS_close, go_wr);
  char c;
  long n;
  do {
    n = ::syscall(SYS_read, go_rd, &c, 1);
  } while (n < 0 && errno == EINTR);
  // Not raise(): glibc's raise blocks every signal around the kill, and the restorer would
  // find the process with that mask in the middle of raise().
  ::syscall(SYS_kill, ::syscall(SYS_getpid), SIGSTOP);
  // Only reached if the restorer let the process go without restoring it.
  ::syscall(SYS_exit_group, 127);
  __builtin_unreachable();
}

// PID 1 of the new namespace. Creates the process to restore with the image's pid, reports
// {result, pidfd number} on `report`, then waits for the restorer's verdict on `ctl`: 'D'
// (restored) makes it a plain reaper that exits with the restored process's status (0-255,
// 128+N for signal N); anything else (EOF: the restorer failed or died) makes it exit, which
// kills everything in the namespace.
[[noreturn]] void reaper_main(pid_t image_pid, int go_rd, int go_wr, int ctl, int report) {
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  // getppid() is 0 here (the restorer lives in the parent namespace); if the restorer is gone
  // already, `ctl` reads EOF below and we leave.
  int pidfd = -1;
  pid_t tid = image_pid;
  abi::clone_args args;
  std::memset(&args, 0, sizeof args);
  args.flags = CLONE_PIDFD;
  args.pidfd = reinterpret_cast<uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  args.set_tid = reinterpret_cast<uint64_t>(&tid);
  args.set_tid_size = 1;
  long r = raw_clone3(args);
  if (r == 0) child_main(go_rd, go_wr, 1);
  int32_t msg[2] = {r < 0 ? -errno : static_cast<int32_t>(r), pidfd};
  // The new process has its copy of our fds 0-2 (lazycr's, for --shell-job); the reaper must
  // not keep lazycr's stdio open (a detached restore would hold its caller's pipes).
  for (int fd = 0; fd <= 2; fd++) ::syscall(SYS_close, fd);
  ::syscall(SYS_close, go_rd);
  ::syscall(SYS_close, go_wr);
  ::syscall(SYS_write, report, msg, sizeof msg);
  ::syscall(SYS_close, report);
  if (r < 0) ::syscall(SYS_exit_group, 1);
  char c = 0;
  long n;
  do {
    n = ::syscall(SYS_read, ctl, &c, 1);
  } while (n < 0 && errno == EINTR);
  if (n != 1 || c != 'D') ::syscall(SYS_exit_group, 1);
  ::syscall(SYS_prctl, PR_SET_PDEATHSIG, 0, 0, 0, 0);
  ::syscall(SYS_close_range, 0, ~0u, 0);  // ctl, pidfd, and whatever lazycr had open
  for (;;) {
    int status = 0;
    long w = ::syscall(SYS_wait4, -1, &status, 0, nullptr);
    if (w < 0) {
      if (errno == EINTR) continue;
      ::syscall(SYS_exit_group, 1);  // ECHILD: cannot happen before r exits
    }
    if (w != r) continue;  // an orphan of the restored process, reaped
    if (WIFEXITED(status)) ::syscall(SYS_exit_group, WEXITSTATUS(status));
    if (WIFSIGNALED(status)) ::syscall(SYS_exit_group, 128 + WTERMSIG(status));
  }
}

}  // namespace

pid_t pid_of_pidfd(int pidfd) {
  std::string path = cat("/proc/self/fdinfo/", pidfd);
  std::string text = proc::read_file(path);
  auto pos = text.find("\nPid:");
  if (pos == std::string::npos) fail(path, ": no Pid: line");
  long pid = std::strtol(text.c_str() + pos + 5, nullptr, 10);
  if (pid <= 0) fail(path, ": process has exited (Pid: ", pid, ")");
  return static_cast<pid_t>(pid);
}

void spawn_process(pid_t image_pid, bool pidns, SpawnState& st) {
  int go[2];
  if (::pipe2(go, O_CLOEXEC) != 0) fail_errno("pipe2");
  UniqueFd go_rd(go[0]);
  st.go.reset(go[1]);

  if (!pidns) {
    int pidfd = -1;
    pid_t tid = image_pid;
    abi::clone_args args;
    std::memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD;
    args.pidfd = reinterpret_cast<uint64_t>(&pidfd);
    args.exit_signal = SIGCHLD;
    args.set_tid = reinterpret_cast<uint64_t>(&tid);
    args.set_tid_size = 1;
    pid_t self = ::getpid();
    long r = raw_clone3(args);
    if (r == 0) child_main(go[0], go[1], self);
    if (r < 0) {
      int err = errno;
      if (err == EEXIST) fail("clone3 with set_tid ", image_pid, ": pid ", image_pid, " is in use");
      if (err == EPERM) fail(kSetTidNeedsPrivilege, image_pid);
      fail_errno_value(err, cat("clone3 with set_tid ", image_pid));
    }
    st.s.pid = st.s.vpid = static_cast<pid_t>(r);
    st.s.pidfd.reset(pidfd);
    return;
  }

  int ctl[2], report[2];
  if (::pipe2(ctl, O_CLOEXEC) != 0) fail_errno("pipe2");
  UniqueFd ctl_rd(ctl[0]), ctl_wr(ctl[1]);
  if (::pipe2(report, O_CLOEXEC) != 0) fail_errno("pipe2");
  UniqueFd report_rd(report[0]), report_wr(report[1]);
  int reaper_pidfd = -1;
  abi::clone_args args;
  std::memset(&args, 0, sizeof args);
  args.flags = CLONE_NEWPID | CLONE_PIDFD;
  args.pidfd = reinterpret_cast<uint64_t>(&reaper_pidfd);
  args.exit_signal = SIGCHLD;
  long r = raw_clone3(args);
  if (r == 0) {
    ::syscall(SYS_close, ctl[1]);
    ::syscall(SYS_close, report[0]);
    reaper_main(image_pid, go[0], go[1], ctl[0], report[1]);
  }
  if (r < 0) fail_errno("clone3(CLONE_NEWPID) for the namespace's reaper");
  st.s.reaper = static_cast<pid_t>(r);
  st.s.reaper_pidfd.reset(reaper_pidfd);
  st.s.reaper_ctl = std::move(ctl_wr);
  ctl_rd.reset();
  report_wr.reset();

  int32_t msg[2] = {0, -1};
  size_t got = 0;
  while (got < sizeof msg) {
    ssize_t n = ::read(report_rd.get(), reinterpret_cast<char*>(msg) + got, sizeof msg - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno("reading the reaper's report");
    if (n == 0) fail("the namespace's reaper (pid ", r, ") exited before creating the process");
    got += static_cast<size_t>(n);
  }
  if (msg[0] < 0) {
    if (msg[0] == -EPERM) fail(kSetTidNeedsPrivilege, image_pid, " in the new PID namespace");
    fail_errno_value(-msg[0], cat("clone3 with set_tid ", image_pid, " in the new PID namespace"));
  }
  if (msg[0] != image_pid)
    fail("clone3 with set_tid ", image_pid, " in the new PID namespace gave pid ", msg[0]);
  long fd = ::syscall(SYS_pidfd_getfd, reaper_pidfd, msg[1], 0);
  if (fd < 0) fail_errno("pidfd_getfd of the new process's pidfd from the reaper");
  st.s.pidfd.reset(static_cast<int>(fd));
  st.s.vpid = image_pid;
  st.s.pid = pid_of_pidfd(st.s.pidfd.get());
}

void release_child(SpawnState& st) {
  st.go.reset();
}

}  // namespace lazycr::restore
