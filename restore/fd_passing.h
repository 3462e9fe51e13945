// Internal to restore/: descriptions made by lazycr passed into the process being built, over
// the descriptor transport (a UNIX socket pair whose one end the process holds).
#pragma once

#include <cstddef>
#include <vector>

#include "restore/memory.h"

namespace lazycr::restore {

inline constexpr size_t kFdsPerMessage = 200;  // below SCM_MAX_FD (253)

// Sends `fds` (up to kFdsPerMessage) as one SCM_RIGHTS message on lazycr's end.
void send_fds(int sock, const std::vector<int>& fds);

// Receives one message of `count` descriptors inside the process; returns their numbers there
// (close-on-exec, lowest free numbers).
std::vector<int> receive_fds(RemoteProcess& r, int sock, size_t count);

}  // namespace lazycr::restore
