#include "objects/mdwe.h"

#include <errno.h>
#include <sys/syscall.h>

#include "common/error.h"

namespace lazycr::objects::mdwe {
namespace {
constexpr long kPrSetMdwe = 65;  // <linux/prctl.h>, not in glibc 2.36's <sys/prctl.h>
constexpr long kPrGetMdwe = 66;
}  // namespace

void dump(RemoteProcess& p, image::Process& proc, DumpContext&) {
  long flags = 0;
  try {
    flags = p.call(0, "prctl(PR_GET_MDWE)", SYS_prctl, kPrGetMdwe);
  } catch (const Error& e) {
    if (e.sys_errno() != EINVAL) throw;  // a kernel without it: nobody could have set it
  }
  proc.set_mdwe(static_cast<uint32_t>(flags));
}

void restore(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kBeforeRelease || proc.mdwe() == 0) return;
  p.call(0, cat("prctl(PR_SET_MDWE, ", proc.mdwe(), ")"), SYS_prctl, kPrSetMdwe, proc.mdwe());
}

}  // namespace lazycr::objects::mdwe
