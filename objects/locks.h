// File locks held through descriptors: POSIX (fcntl F_SETLK, owned by the process), OFD
// (F_OFD_SETLK) and flock (owned by the open file description).
// Dump: the "lock:" lines of /proc/PID/fdinfo/N, recorded once per owner (FileLock in
// process.proto says on which descriptor). Refused by name: leases and delegations, locks of a
// kind the kernel does not name, locks on a descriptor the restore cannot reopen.
// Restore: each lock is taken again inside the process that held it, through its descriptor,
// right after the descriptors are in place and before anything of it runs; a lock someone
// else holds now fails the restore by name (pid, fd, path, range).
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::locks {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

// One "lock:" line of fdinfo, as "1: POSIX  ADVISORY  WRITE 4809 fe:00:1234 10 14"; throws
// naming the line for anything else than an advisory POSIX, OFD or FLOCK lock.
image::FileLock parse_fdinfo_lock(const std::string& line);

}  // namespace lazycr::objects::locks
