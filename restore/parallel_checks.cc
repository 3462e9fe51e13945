#include "restore/parallel_checks.h"

#include <cerrno>

#include "common/error.h"
#include "common/log.h"
#include "image-format/sha256_load.h"
#include "restore/memory.h"
#include "restore/steps.h"
#include "restore/trust.h"

namespace lazycr::restore {

ParallelChecks::~ParallelChecks() {
  if (thread_.joinable()) thread_.join();
}

void ParallelChecks::start(const image::ImageReader& img, const RestoreOptions& opts,
                           const std::string& who) {
  thread_ = std::thread([this, &img, opts, who] {
    try {
      if (opts.lazy.enabled) {
        const uint64_t t0 = now_ns();
        check_lazy_options(opts.lazy);
        log::debug("restore: lazy feature probe in ", (now_ns() - t0) / 1000, " us");
      }
      check_trust(img, opts);
      // Tests: checks that refuse the image after the tree has been made, as a slow MAC can.
      if (opts.fault_inject == "checks") throw Error("injected fault (--fault-inject=checks)", EIO);
    } catch (const Error& e) {
      error_ = std::make_exception_ptr(
          Error(cat("restore: validate for ", who, ": ", e.what()), e.sys_errno()));
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

void ParallelChecks::join() {
  if (thread_.joinable()) thread_.join();
  if (error_) std::rethrow_exception(error_);
}

Sha256Loader::Sha256Loader() : thread_([] { image::load_sha256(); }) {}

void Sha256Loader::join() {
  if (thread_.joinable()) thread_.join();
}

bool files_reach_outside(const image::ImageReader& img, const RestoreOptions& opts) {
  const auto& s = img.shared();
  if (opts.netns || s.sockets_size() > 0 || s.ghosts_size() > 0 || s.ptys_size() > 0 ||
      s.sysv_shm_size() > 0)
    return true;
  for (const auto& i : img.shared().inet_sockets())
    if (i.local_port() != 0 && i.local_port() < 1024) return true;
  return false;
}

}  // namespace lazycr::restore
