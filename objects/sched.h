// Scheduling of every thread: policy (SCHED_OTHER, BATCH, IDLE, FIFO, RR) with its priority
// and SCHED_RESET_ON_FORK, nice value, CPU affinity.
// Dump: sched_getattr and sched_getaffinity on each tid from outside. Refused by name:
// SCHED_DEADLINE (its bandwidth reservation is not recorded).
// Restore: policy, priority and nice from outside once every thread exists (a thread created
// later would inherit its creator's); a policy the restore cannot set (a realtime one without
// the privilege or the runtime for it) fails the restore, naming the thread and the policy.
// The affinity is set as the thread is released (objects::restore_affinity), since the restore
// keeps the process on lazycr's CPU while it builds it. CPUs of the image that do not exist
// here are left out with a warning; a thread none of whose CPUs exists (or may be used: a
// cpuset) here is refused, naming the thread and its CPUs.
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::sched {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

// "0-3,6": the CPUs of a sched_getaffinity mask of `bytes` bytes, "none" if empty.
std::string cpu_list(const uint8_t* mask, size_t bytes);

}  // namespace lazycr::objects::sched
