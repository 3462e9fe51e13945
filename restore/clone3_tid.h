// Internal to restore/: clone3 injected in a process being built, asking for one given ID
// (set_tid of length 1): the one way the restore, clones of a template and forks of a tree's
// children make a task with the image's PID or TID.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "image-format/process.pb.h"
#include "restore/restoree.h"

namespace lazycr::restore {

// Runs clone3(flags, exit_signal, set_tid = {id}) in r's leader; returns the raw result
// (the new task's ID in r's PID namespace, or -errno).
long inject_clone3_with_id(Restoree& r, uint64_t flags, uint64_t exit_signal, pid_t id);

// One more thread of r with the image's TID, adopted and stopped before its first instruction.
// Throws "clone3 of thread <tid>: <why>".
ThreadCtl& make_thread_with_tid(Restoree& r, const image::Thread& th);

}  // namespace lazycr::restore
