// Memory-deny-write-execute (prctl PR_SET_MDWE, Linux 6.3+): once set, the process can never
// again make memory both writable and executable, nor gain execute on a mapping.
// Dump: prctl(PR_GET_MDWE) injected in the leader (EINVAL: a kernel without it, recorded as 0).
// Restore: set as one of the last calls before release, once the restore's own executable
// trampoline is in place and every child of a tree is forked (it is inherited, unless
// PR_MDWE_NO_INHERIT); it cannot be taken back.
#pragma once

#include "objects/objects.h"

namespace lazycr::objects::mdwe {

void dump(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc);

}  // namespace lazycr::objects::mdwe
