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
// When nothing is owed any more, the server reads every parked uffd back (closing them), and
// closes the parked descriptor inside each live process that still holds it (an injected
// close(2) through ptrace, on one thread: the descriptor table is shared), so that the
// process ends with exactly its image's descriptors and a later dump finds nothing of ours.
#pragma once

#include <sys/types.h>

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
  // Nothing is owed any more: drops every parked uffd, then closes the parked descriptor in
  // each process of `holders` where it is still ours. Failures are logged, never thrown.
  void release(const std::vector<pid_t>& holders);

 private:
  void close_parked_in(pid_t pid);
  UniqueFd send_;
  UniqueFd recv_;
  int parked_fd_;
  unsigned long inode_ = 0;  // of the parked socket: "socket:[inode]" in /proc/PID/fd
  bool released_ = false;
};

// The number restore/ parks the socket at: the highest free number below min(1024, `limit`)
// that is not in `taken` (the image's own descriptors); -1 if none is left above 2.
int choose_parked_fd(const std::vector<int>& taken, unsigned long limit);

}  // namespace lazycr::uffd
