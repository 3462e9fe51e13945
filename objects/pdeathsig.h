// The parent-death signal of every thread (prctl PR_SET_PDEATHSIG; each thread has its own).
// Dump: prctl(PR_GET_PDEATHSIG) in each thread, in the round trip that reads its other state
// (thread_read, objects.h thread_reads()).
// Restore: set in each thread as the last call before the process is released: the restore
// clears the one it uses itself (so that a restore that dies kills what it built) right before.
// The root of a restored tree has lazycr as its parent: with --detach (or once a foreground
// lazycr exits) it gets its signal, as a parent died.
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::pdeathsig {

ThreadRead thread_read(uint64_t slot);
void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);  // nothing left to do
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

}  // namespace lazycr::objects::pdeathsig
