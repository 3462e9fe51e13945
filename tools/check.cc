// `lazycr check [--json]`: what this kernel offers lazycr, from the same probes the code paths
// read (common/kernel_features.h).
#include <sys/utsname.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/json.h"
#include "common/kernel_features.h"
#include "objects/net_lock.h"
#include "tools/commands.h"

namespace lazycr::cli {
namespace {

constexpr int kExitNotReady = 3;

const char* status_of(const FeatureReport& r) {
  return r.ok ? "ok" : r.required ? "missing" : "optional-missing";
}

std::string pad(const std::string& s, size_t width) {
  return s.size() >= width ? s : s + std::string(width - s.size(), ' ');
}

std::string machine() {
  utsname u{};
  return ::uname(&u) == 0 ? std::string(u.machine) : std::string("?");
}

void write_out(const std::string& text) {
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size() || std::fflush(stdout) != 0)
    fail_errno("cannot write the check report to stdout");
}

std::string text_report(const KernelFeatures& f, const std::vector<FeatureReport>& reports,
                        const std::vector<std::string>& missing) {
  size_t w_status = 0, w_name = 0, w_detail = 0;
  for (const auto& r : reports) {
    w_status = std::max(w_status, std::string(status_of(r)).size());
    w_name = std::max(w_name, r.name.size());
    w_detail = std::max(w_detail, r.detail.size());
  }
  std::ostringstream out;
  out << "kernel " << f.release << " (" << machine() << ")\n";
  for (const auto& r : reports) {
    out << pad(status_of(r), w_status) << "  " << pad(r.name, w_name) << "  "
        << pad(r.detail, w_detail) << "  " << r.why << "\n";
  }
  if (missing.empty()) {
    out << "verdict: ready for lazy restore (every required feature is present)\n";
  } else {
    out << "verdict: NOT ready for lazy restore: missing";
    for (size_t i = 0; i < missing.size(); ++i) out << (i ? ", " : " ") << missing[i];
    out << "\n";
  }
  return out.str();
}

std::string json_report(const KernelFeatures& f, const std::vector<FeatureReport>& reports,
                        bool ready) {
  std::ostringstream out;
  JsonWriter j(out);
  j.begin_object();
  j.field("kernel", f.release);
  j.field("lazy_restore_ready", ready);
  j.key("features");
  j.begin_array();
  for (const auto& r : reports) {
    j.begin_object();
    j.field("name", r.name);
    j.field("ok", r.ok);
    j.field("required", r.required);
    j.field("detail", r.detail);
    j.field("why", r.why);
    j.end_object();
  }
  j.end_array();
  j.hex_field("uffd_features", f.uffd_features);
  j.hex_field("uffd_ioctls", f.uffd_ioctls);
  j.hex_field("xcr0", f.xsave_features);
  j.field("xsave_size", f.xsave_size);
  j.field("xstate_regset_size", f.xstate_regset_size);
  j.end_object();
  return out.str();
}

}  // namespace

int run_check(const CheckOptions& opts) {
  const KernelFeatures& f = kernel_features();
  std::vector<FeatureReport> reports = describe_features(f);
  FeatureReport lock{"net.nftables_lock", false, false, "", ""};
  lock.ok = objects::network_lock_available(lock.detail);
  lock.why =
      "dump --tcp-established of a tree it kills drops the connections' packets until the "
      "restore (else a peer that sends in between gets a reset)";
  reports.push_back(std::move(lock));
  std::vector<std::string> missing;
  for (const auto& r : reports) {
    if (r.required && !r.ok) missing.push_back(r.name);
  }
  const bool ready = missing.empty();
  write_out(opts.json ? json_report(f, reports, ready) : text_report(f, reports, missing));
  return ready ? 0 : kExitNotReady;
}

}  // namespace lazycr::cli
