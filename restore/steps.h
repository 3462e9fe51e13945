#pragma once
// The named steps of a restore (restore.cc): each adds "restore: <step> for <who>: " to its
// error, fails on purpose when named by --fault-inject, and logs its time (-vv).

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "common/log.h"

namespace lazycr::restore {

class Steps {
 public:
  explicit Steps(std::string fault) : fault_(std::move(fault)) {}

  // Called when a step fails, before its error is thrown: it may throw a better one (the
  // checks running beside the steps, whose failure is the cause; parallel_checks.h).
  // Called in the order given.
  void on_failure(std::function<void()> f) { on_failure_.push_back(std::move(f)); }

  template <typename F>
  void run(const char* step, const std::string& who, F&& f) {
    const uint64_t t0 = now_ns();
    try {
      check(step);
      f();
    } catch (const Error& e) {
      for (const auto& cause : on_failure_) cause();
      throw Error(cat("restore: ", step, " for ", who, ": ", e.what()), e.sys_errno());
    }
    log::debug("restore: ", step, " for ", who, ": ", (now_ns() - t0) / 1000, " us");
  }
  // Fails if `name` is the injected fault (for faults in the middle of a step).
  void check(const char* name) const {
    if (fault_ == name) throw Error(cat("injected fault (--fault-inject=", name, ")"), EIO);
  }

 private:
  std::string fault_;
  std::vector<std::function<void()>> on_failure_;
};

}  // namespace lazycr::restore
