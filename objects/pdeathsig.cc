#include "objects/pdeathsig.h"

#include <sys/prctl.h>
#include <sys/syscall.h>

#include "common/error.h"

namespace lazycr::objects::pdeathsig {

ThreadRead thread_read(uint64_t slot) {
  return {{SYS_prctl, {PR_GET_PDEATHSIG, slot}}, [](image::Thread& t, uint64_t value) {
            // PR_GET_PDEATHSIG writes an int.
            const auto sig = static_cast<int32_t>(static_cast<uint32_t>(value));
            if (sig != 0) t.set_pdeathsig(sig);
          }};
}

void dump(RemoteProcess&, image::Process&, DumpContext&) {}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kBeforeRelease) return;
  for (size_t i = 0; i < p.thread_count(); i++)
    for (const auto& t : proc.threads())
      if (t.tid() == p.image_tid(i) && t.pdeathsig() != 0)
        p.call(i, cat("prctl(PR_SET_PDEATHSIG, ", t.pdeathsig(), ") of thread ", t.tid()),
               SYS_prctl, PR_SET_PDEATHSIG, static_cast<uint64_t>(t.pdeathsig()));
}

}  // namespace lazycr::objects::pdeathsig
