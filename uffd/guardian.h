// Internal to uffd/: the page server's guardian process (see "Guardian" in page_server.h).
//
// The server side (GuardianClient) forks the guardian and then tells it, over a SOCK_SEQPACKET
// unix socket, about every uffd it holds (a duplicate travels with SCM_RIGHTS), every pid it
// learns, every uffd it closes, and finally that it finished. The guardian side runs only raw
// system calls on static storage: the server process may have other threads at fork time.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "common/fd.h"

namespace lazycr::uffd {

class GuardianClient {
 public:
  GuardianClient() = default;
  ~GuardianClient();  // finish() if still running
  GuardianClient(const GuardianClient&) = delete;
  GuardianClient& operator=(const GuardianClient&) = delete;

  // Forks the guardian; its message goes to log_fd. Throws Error if it cannot be started.
  void start(int log_fd);
  bool running() const { return sock_.valid(); }
  pid_t pid() const { return pid_; }

  // Process `id` is served through `uffd`; `pid` (0 if not known yet) with `pidfd` (-1 if
  // none); `parent` is the pid of the process it forked from (0 if none or not known).
  void add(uint64_t id, pid_t pid, pid_t parent, int uffd, int pidfd);
  // The pid of a forked child has been found.
  void set_pid(uint64_t id, pid_t pid, int pidfd);
  // The server closed its uffd for `id` (the guardian closes its copy).
  void release(uint64_t id);
  // The server finished normally: the guardian exits; waits for it and reaps it.
  void finish();
  // For tests of the guardian itself: forget it without telling it (as a dead server would).
  void abandon();

 private:
  void send(uint32_t op, uint64_t id, pid_t pid, pid_t parent, const int* fds, int nfds);
  UniqueFd sock_;
  UniqueFd pidfd_;
  pid_t pid_ = 0;
};

}  // namespace lazycr::uffd
