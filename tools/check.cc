// `lazycr check [--json]`: what this kernel offers lazycr, from the same probes the code paths
// read (common/kernel_features.h).
#include <sys/utsname.h>

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/kernel_features.h"
#include "tools/commands.h"

namespace lazycr::cli {
namespace {

constexpr int kExitNotReady = 3;

// A JSON string literal: quotes, backslash and every control character escaped; other bytes
// (UTF-8 included) pass through.
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
  return out;
}

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
  out << "{\n";
  out << "  \"kernel\": " << json_string(f.release) << ",\n";
  out << "  \"lazy_restore_ready\": " << (ready ? "true" : "false") << ",\n";
  out << "  \"features\": [\n";
  for (size_t i = 0; i < reports.size(); ++i) {
    const auto& r = reports[i];
    out << "    {\"name\": " << json_string(r.name) << ", \"ok\": " << (r.ok ? "true" : "false")
        << ", \"required\": " << (r.required ? "true" : "false")
        << ", \"detail\": " << json_string(r.detail) << ", \"why\": " << json_string(r.why) << "}"
        << (i + 1 < reports.size() ? "," : "") << "\n";
  }
  out << "  ],\n";
  out << "  \"uffd_features\": \"0x" << std::hex << f.uffd_features << "\",\n";
  out << "  \"uffd_ioctls\": \"0x" << f.uffd_ioctls << "\",\n";
  out << "  \"xcr0\": \"0x" << f.xsave_features << std::dec << "\",\n";
  out << "  \"xsave_size\": " << f.xsave_size << ",\n";
  out << "  \"xstate_regset_size\": " << f.xstate_regset_size << "\n";
  out << "}\n";
  return out.str();
}

}  // namespace

int run_check(const CheckOptions& opts) {
  const KernelFeatures& f = kernel_features();
  const std::vector<FeatureReport> reports = describe_features(f);
  std::vector<std::string> missing;
  for (const auto& r : reports) {
    if (r.required && !r.ok) missing.push_back(r.name);
  }
  const bool ready = missing.empty();
  write_out(opts.json ? json_report(f, reports, ready) : text_report(f, reports, missing));
  return ready ? 0 : kExitNotReady;
}

}  // namespace lazycr::cli
