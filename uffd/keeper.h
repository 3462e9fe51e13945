// The reference to a restored process's userfaultfds that lives inside the process itself, so
// that they cannot all disappear while it runs (DESIGN.md section 7: when every reference to
// a uffd is gone, the kernel unregisters its areas and the process reads zero pages).
//
// The page server and its guardian hold the other references, but both are processes that
// can be SIGKILLed at the same instant (a group kill, kill -9 of both): only a reference that
// dies with the restored process itself keeps its faults waiting instead of reading zeros.
//
// How: restore/ creates a SOCK_SEQPACKET socket pair inside the process, keeps one end there
// at a high descriptor number ("parked", O_CLOEXEC) and hands duplicates of both ends to the
// server. The server sends a duplicate of every uffd of that process, and of every child it
// forks (the child inherits the parked end), into the socket (SCM_RIGHTS): a descriptor in
// flight is held by the receiving socket, which lives as long as some process holds it. The
// program sees one extra descriptor while the server runs; exec drops it (O_CLOEXEC), a
// process that closes descriptors it did not open (close_range(3, ~0U)) drops it too, and is
// then guarded by the guardian alone.
// When nothing is owed any more, the server reads every parked uffd back (closing them), closes
// its own and has the guardian close its copy (the areas are plain memory from then on: no fault of
// the process can wait for the server while it is stopped below), and only then closes the parked
// descriptor inside each live process that still holds it. That is done from outside, as a
// debugger would: every thread seized and stopped (so that no thread can reuse the number
// between the check and the close), close(2) injected into one thread of each descriptor
// table, registers, signal mask and the interrupted system call put back, every thread
// detached (a stopped job stays stopped: the kernel puts a thread of a stopped group back into
// its stop on detach). Whatever prevents that leaves the descriptor where it is (an idle,
// empty socket, O_CLOEXEC) and says why; it never fails the server nor waits for long: the
// process is traced by someone else (a debugger, strace), a thread does not stop within
// kStopTimeoutMs (an uninterruptible sleep), the process or a thread is gone.
// The server releases only once lazycr has let the process go (PageServerOptions::
// release_gate_fd): before that lazycr's restore still traces it.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/fd.h"

namespace lazycr::uffd {

class UffdKeeper {
 public:
  // `send_end`, `recv_end`: duplicates of the two ends of the socket pair whose `recv_end` side
  // is parked in the restored process as descriptor `parked_fd`.
  UffdKeeper(UniqueFd send_end, UniqueFd recv_end, int parked_fd);
  UffdKeeper(const UffdKeeper&) = delete;
  UffdKeeper& operator=(const UffdKeeper&) = delete;

  int parked_fd() const { return parked_fd_; }
  // Parks a duplicate of `uffd` in the socket. False (logged) if it could not.
  bool park(int uffd);
  // Nothing is owed any more: reads every parked uffd back and closes it; parks no more.
  void drop_parked();
  // Then (once the server's and the guardian's uffds are closed too): closes the parked
  // descriptor in each process of `holders` where it is still ours. Never throws; what could
  // not be closed is logged (one warning a process) and counted.
  struct Released {
    uint64_t closed = 0;  // parked descriptors closed inside a process
    uint64_t left = 0;    // left in a process (traced by someone else, ...)
  };
  Released close_parked(const std::vector<pid_t>& holders);

 private:
  enum class Outcome { kClosed, kAbsent, kLeft };
  // kLeft comes with `why`. kAbsent: exec'd, closed by the program, or the process is gone.
  Outcome close_parked_in(pid_t pid, std::string& why);
  bool held_by(pid_t pid, pid_t tid) const;
  UniqueFd send_;
  UniqueFd recv_;
  int parked_fd_;
  unsigned long inode_ = 0;  // of the parked socket: "socket:[inode]" in /proc/PID/fd
  bool dropped_ = false;
  bool closed_ = false;
};

// The number restore/ parks the socket at: the highest free number below min(1024, `limit`)
// that is not in `taken` (the image's own descriptors); -1 if none is left above 2.
int choose_parked_fd(const std::vector<int>& taken, unsigned long limit);

}  // namespace lazycr::uffd
