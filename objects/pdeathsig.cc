#include "objects/pdeathsig.h"

#include <sys/prctl.h>
#include <sys/syscall.h>

#include "common/error.h"

namespace lazycr::objects::pdeathsig {

void dump(RemoteProcess& p, image::Process& proc, DumpContext&) {
  for (size_t i = 0; i < p.thread_count(); i++) {
    int32_t sig = 0;
    const uint64_t at = p.put(&sig, sizeof sig);
    p.call(i, "prctl(PR_GET_PDEATHSIG)", SYS_prctl, PR_GET_PDEATHSIG, at);
    p.read(at, &sig, sizeof sig);
    if (sig == 0) continue;
    for (auto& t : *proc.mutable_threads())
      if (t.tid() == p.image_tid(i)) t.set_pdeathsig(sig);
  }
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kBeforeRelease) return;
  for (size_t i = 0; i < p.thread_count(); i++)
    for (const auto& t : proc.threads())
      if (t.tid() == p.image_tid(i) && t.pdeathsig() != 0)
        p.call(i, cat("prctl(PR_SET_PDEATHSIG, ", t.pdeathsig(), ") of thread ", t.tid()),
               SYS_prctl, PR_SET_PDEATHSIG, static_cast<uint64_t>(t.pdeathsig()));
}

}  // namespace lazycr::objects::pdeathsig
