// `lazycr dump`: runs the dump and prints its summary line.
#include <cstdio>
#include <string>

#include "checkpoint/interrupt.h"
#include "tools/commands.h"

namespace lazycr::cli {

int run_dump(const checkpoint::DumpOptions& opts) {
  checkpoint::DumpResult r;
  try {
    r = checkpoint::dump(opts);
  } catch (const checkpoint::Interrupted& e) {
    // The dump rolled back; exit as a shell expects of a command stopped by that signal.
    std::fprintf(stderr, "lazycr: %s\n", e.what());
    return 128 + e.signo();
  }
  auto u = [](uint64_t v) { return static_cast<unsigned long long>(v); };
  double resident_mib =
      (r.data_pages + r.zero_pages + r.ref_pages + r.parent_pages) * 4096.0 / (1 << 20);
  double image_mib = r.image_bytes / double(1 << 20);
  std::string tree;
  if (r.processes > 1) {
    char buf[160];
    std::snprintf(buf, sizeof buf, " and %llu process(es) below it (%llu zombie(s))",
                  u(r.processes - 1), u(r.zombies));
    tree = buf;
  }
  std::string parent;
  if (r.chain_length > 0) {
    char buf[200];
    std::snprintf(buf, sizeof buf,
                  ", %llu in the parent image (link %u of its chain; %llu not written since, "
                  "left unread)",
                  u(r.parent_pages), r.chain_length, u(r.unread_pages));
    parent = buf;
  }
  std::fprintf(
      stderr,
      "lazycr: dumped pid %d%s to %s: %llu thread(s), %llu areas, %.1f MiB of pages: "
      "%llu stored, %llu zero, %llu deduped%s; %.1f MiB image, frozen %.1f ms, total "
      "%.1f ms, %s%s\n",
      opts.pid, tree.c_str(), opts.dir.c_str(), u(r.threads), u(r.areas), resident_mib,
      u(r.data_pages), u(r.zero_pages), u(r.ref_pages), parent.c_str(), image_mib,
      r.frozen_ns / 1e6, r.total_ns / 1e6,
      opts.leave_running ? (r.live ? "left running (live dump)" : "left running") : "killed",
      r.replaced.empty() ? "" : ("; replaced " + r.replaced).c_str());
  return 0;
}

}  // namespace lazycr::cli
