// /proc scans the page server uses to find the pid of a forked child (uffd/page_server.h,
// "FORK"): there is no CONFIG_PROC_CHILDREN on our kernel, so no /proc/PID/task/TID/children.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace lazycr::uffd {

pid_t parent_of(pid_t pid);  // -1 when unknown
// The boot-time clock in the ticks of /proc/PID/stat's starttime.
uint64_t boot_ticks();
// Every process whose parent is `parent`, with its start time, sorted by pid.
std::vector<std::pair<pid_t, uint64_t>> children_of(pid_t parent);
std::vector<pid_t> pids_of(const std::vector<std::pair<pid_t, uint64_t>>& v);
// Do two processes share one mm (CLONE_VM: vfork, posix_spawn)? False when unknown.
bool same_mm(pid_t a, pid_t b);
// The children of `parent` that may be the child of a FORK event read at `fork_ticks`
// (boot_ticks()): one the server never knew (not in `seen`), that the parent did not have
// before the server (not in `preexisting`, sorted), started no earlier than the event (ticks
// are coarse: 10 ms), and not sharing the parent's mm (vfork/posix_spawn children make no
// FORK event). Sorted by pid.
std::vector<pid_t> fork_candidates(pid_t parent, uint64_t fork_ticks,
                                   const std::vector<pid_t>& preexisting,
                                   const std::set<pid_t>& seen);

}  // namespace lazycr::uffd
