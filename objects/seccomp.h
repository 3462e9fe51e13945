// Seccomp state of every thread (strict mode, classic BPF filters with their flags).
// Dump: the mode from /proc/TID/status and each filter through PTRACE_SECCOMP_GET_FILTER; the
// filters all threads have in common (oldest first) go to Process.seccomp_shared, the rest to
// each Thread. Refused by name: a filter that can hand calls to a user-space supervisor
// (SECCOMP_RET_USER_NOTIF: its listener cannot be given back).
// Restore: the shared filters in the leader right before the other threads are created (they
// inherit them, shared as in the original), then each thread's own filters and strict mode;
// checked against /proc afterwards. Injected calls bypass the filters
// (PTRACE_O_SUSPEND_SECCOMP) until the process is released.
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::seccomp {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

}  // namespace lazycr::objects::seccomp
