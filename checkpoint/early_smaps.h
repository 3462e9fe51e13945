// Internal to checkpoint/: a live dump reads /proc/PID/smaps before the freeze, because smaps
// walks the page tables (its cost grows with memory) and the frozen time must not. What may
// have changed between that read and the freeze is found here and put right.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <map>
#include <vector>

#include "common/proc.h"
#include "image-format/process.pb.h"

namespace lazycr::checkpoint {

// smaps of the root and every process found below it; a process gone meanwhile is left out
// (the freeze finds out).
std::map<pid_t, std::vector<proc::MapsEntry>> read_smaps_ahead(pid_t root);

// The areas of a frozen process with their smaps fields: those read ahead while
// /proc/PID/maps (no page-table walk) still lists the same areas and /proc/PID/status counts
// as many locked bytes (mlock over whole areas), else smaps read again now. A flag given over
// a whole area meanwhile (madvise) is not seen here: refresh_vmflags() puts it right.
std::vector<proc::MapsEntry> smaps_while_frozen(
    pid_t pid, std::map<pid_t, std::vector<proc::MapsEntry>>& ahead);

// The VmFlags of `areas` (as recorded for `pid`) from smaps read later: from `pid` itself while
// still frozen, or from its copy-on-write twin (twin.h) once the tree runs again: fork copies
// the flags of every area it copies, except the locking and userfaultfd ones (those stay as
// recorded; smaps_while_frozen checked the locking) and MADV_DONTFORK areas, which the twin
// lacks (mark_what_twin_lacks checked those). Returns the number of areas whose flags changed.
size_t refresh_vmflags(pid_t pid, pid_t read_from, std::vector<image::MemoryArea>& areas);

}  // namespace lazycr::checkpoint
