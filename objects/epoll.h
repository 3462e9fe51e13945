// epoll instances: the interest list of each (target descriptor, events mask with EPOLLET,
// EPOLLONESHOT, EPOLLWAKEUP, EPOLLEXCLUSIVE, the 64-bit data), nested instances included.
// Dump: the "tfd:" lines of /proc/PID/fdinfo/N, each checked with kcmp(KCMP_EPOLL_TFD) to
// still be the file at that number in the process; a registration whose target was closed
// (the kernel keeps it while the file lives on elsewhere) or whose number now holds another
// file is refused by name (pid, epoll fd, target fd). One open file description shared by
// several descriptors (dup, fork) is recorded once, on its first holder in the image.
// Restore, once every other descriptor is in place: epoll_create1 inside the first holder,
// moved to its number, and EPOLL_CTL_ADD of each registration with the same target number,
// events and data (an instance that is a target of another is built first); the other
// holders dup it, or pull it from the first holder with pidfd_getfd inside themselves.
#pragma once

#include <string>
#include <vector>

#include "objects/objects.h"

namespace lazycr::objects::epoll {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

// The "tfd:" lines of an epoll descriptor's fdinfo text, in order; throws naming a malformed
// line.
std::vector<image::EpollTarget> parse_fdinfo_targets(const std::string& fdinfo);

// "EPOLLIN|EPOLLET|..." for a mask (unknown bits in hex), for messages and `lazycr show`.
std::string events_name(uint32_t events);

}  // namespace lazycr::objects::epoll
