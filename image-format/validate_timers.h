// Bounds of what objects/timers, objects/sched and objects/pdeathsig record (process.proto:
// PosixTimer, Itimer, ThreadSched, Thread.pdeathsig), checked with the rest of a process.
#pragma once

#include <string>

#include "image-format/process.pb.h"

namespace lazycr::image {

// Throws Error naming `who` and the field out of bounds.
void validate_timers_and_sched(const Process& p, const std::string& who);

}  // namespace lazycr::image
