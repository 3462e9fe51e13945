// `lazycr dump`: runs the dump and prints its summary line.
#include <cstdio>

#include "tools/commands.h"

namespace lazycr::cli {

int run_dump(const checkpoint::DumpOptions& opts) {
  auto r = checkpoint::dump(opts);
  double resident_mib = (r.data_pages + r.zero_pages) * 4096.0 / (1 << 20);
  double image_mib = r.image_bytes / double(1 << 20);
  std::fprintf(stderr,
               "lazycr: dumped pid %d to %s: %llu thread(s), %llu areas, %.1f MiB of pages "
               "(%llu zero) in %.1f MiB, frozen %.1f ms, total %.1f ms, %s\n",
               opts.pid, opts.dir.c_str(), static_cast<unsigned long long>(r.threads),
               static_cast<unsigned long long>(r.areas), resident_mib,
               static_cast<unsigned long long>(r.zero_pages), image_mib, r.frozen_ns / 1e6,
               r.total_ns / 1e6, opts.leave_running ? "left running" : "killed");
  return 0;
}

}  // namespace lazycr::cli
