// Internal to restore/: parks the page server's keeper socket inside a process being restored
// lazily (uffd/keeper.h says why and what happens to it).
#pragma once

#include "common/fd.h"
#include "image-format/process.pb.h"
#include "restore/memory.h"

namespace lazycr::restore {

struct ParkedKeeper {
  UniqueFd send_end;  // lazycr's duplicates of the two ends, for the page server
  UniqueFd recv_end;
  int parked_fd = -1;  // the receiving end's number inside the process (O_CLOEXEC)
};

// Creates the socket pair inside `target`, parks one end at a free high number (neither one
// of `proc`'s image descriptors nor at or above its RLIMIT_NOFILE) and takes duplicates of both
// ends out. Returns an empty ParkedKeeper (logged) when no number is free; throws Error when a
// system call fails.
ParkedKeeper park_keeper(RemoteProcess& target, const image::Process& proc);

// True while descriptor `fd` of `pid` is still the socket `recv_end` refers to.
bool still_parked(pid_t pid, int fd, int recv_end);

}  // namespace lazycr::restore
