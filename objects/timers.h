// POSIX timers (timer_create) and interval timers (setitimer) of a process.
// Dump: /proc/PID/timers names each POSIX timer (id, signal and sigev_value, notification and
// the thread it targets, clock); timer_gettime and timer_getoverrun injected in the process
// give its time left and interval; getitimer the three interval timers.
// Restore, once every thread exists (SIGEV_THREAD_ID names one): each timer is created with
// its own id (prctl PR_TIMER_CREATE_RESTORE_IDS where the kernel has it, else by creating and
// deleting timers until the kernel hands out the id; refused by id when it cannot be reached)
// and armed relative to now with the time it had left at dump (TIMER_ABSTIME cannot be seen
// from outside). The overrun count cannot be set: a restored timer reports 0 until it expires
// again (a queued signal of it keeps its si_overrun, restored with the pending signals).
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::timers {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

}  // namespace lazycr::objects::timers
