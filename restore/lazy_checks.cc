// Whether this kernel and lazycr's privileges can do a lazy restore (restore/memory.h).
#include <sched.h>
#include <unistd.h>

#include <utility>

#include "common/error.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "restore/memory.h"

namespace lazycr::restore {

const uint64_t kLazyRequiredFeatures = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                                       UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;

void check_lazy_options(const LazyOptions& opts) {
  check_lazy_support();
  // The stats are written at the end, by the page server: a path that cannot be written is
  // refused now, before anything exists.
  if (!opts.stats_file.empty()) {
    std::string dir = opts.stats_file;
    auto slash = dir.rfind('/');
    dir = slash == std::string::npos ? "." : slash == 0 ? "/" : dir.substr(0, slash);
    if (::access(dir.c_str(), W_OK | X_OK) != 0)
      fail_errno("--stats ", opts.stats_file, ": cannot write in ", dir);
  }
  if (opts.server_cpu >= 0) {
    cpu_set_t mine;
    if (::sched_getaffinity(0, sizeof mine, &mine) == 0 && !CPU_ISSET(opts.server_cpu, &mine))
      fail("--server-cpu ", opts.server_cpu, ": lazycr may not run there");
  }
}

void check_lazy_support() {
  const KernelFeatures& k = lazy_restore_features();
  if (!k.userfaultfd_syscall && !k.dev_userfaultfd)
    fail("--lazy: this kernel gives lazycr no userfaultfd (",
         k.notes.count("userfaultfd.syscall") ? k.notes.at("userfaultfd.syscall") : "not available",
         "); restore without --lazy");
  if ((k.uffd_features & kLazyRequiredFeatures) != kLazyRequiredFeatures) {
    std::string missing;
    for (auto [bit, name] : {std::pair{UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"},
                             {UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"},
                             {UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"},
                             {UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"}})
      if (!(k.uffd_features & bit)) missing += cat(missing.empty() ? "" : ", ", name);
    fail("--lazy: this kernel's userfaultfd lacks UFFD_FEATURE_", missing, " (features ",
         hex(k.uffd_features),
         "): the page server could not follow fork, mremap, madvise and munmap; restore "
         "without --lazy");
  }
  if (!k.cap_sys_ptrace)
    fail(
        "--lazy: lazycr needs CAP_SYS_PTRACE (userfaultfd fork events, and userfaultfd(2) "
        "with vm.unprivileged_userfaultfd = ",
        k.unprivileged_userfaultfd, ")");
  if (!k.pidfd_getfd)
    fail("--lazy: pidfd_getfd does not work here (",
         k.notes.count("pidfd.getfd") ? k.notes.at("pidfd.getfd") : "probe failed",
         "): the userfaultfd cannot be taken out of the process");
}

}  // namespace lazycr::restore
