// What an image may hold that this lazycr refuses to restore on any machine: the part of the
// restore's validation that depends on the image alone. The dump asks it before it kills a
// tree (a program must never be killed into an image the restore refuses) and the restore's
// validation asks it first, so that the two cannot drift apart. Descriptors are not here: the
// dump decides restorable for each (and --skip-unsupported-fds handles the rest).
#pragma once

#include <string>
#include <vector>

#include "image-format/process.pb.h"

namespace lazycr::image {

// Why the restore refuses this area, or "" if it does not.
std::string area_refusal(const MemoryArea& area);

// Why the restore refuses this process (executable, pending signals, and each of its areas
// already in `process`), each reason one phrase; empty if nothing.
std::vector<std::string> process_refusals(const Process& process);

}  // namespace lazycr::image
