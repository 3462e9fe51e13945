// Internal to restore/: the checks of a restore that decide nothing about what it creates (the
// lazy restore's kernel probe, the image's MAC and ownership), run on a thread beside the
// creation of the tree instead of before it (2-4 ms of the path to the first instruction).
#pragma once

#include <exception>
#include <functional>
#include <string>
#include <thread>

#include "image-format/image_dir.h"
#include "restore/restore.h"

namespace lazycr::restore {

class ParallelChecks {
 public:
  ParallelChecks() = default;
  ParallelChecks(const ParallelChecks&) = delete;
  ParallelChecks& operator=(const ParallelChecks&) = delete;
  // Waits for the checks (they read the image, which outlives this): never leaves them running.
  ~ParallelChecks();

  // Starts check_lazy_options() (with --lazy) and check_trust() of `img` on a thread; their
  // error is reported as "restore: validate for <who>: ...", as when they ran in line.
  // `img` must not change until join().
  void start(const image::ImageReader& img, const RestoreOptions& opts, const std::string& who);
  // Waits for the checks; throws their error (again on every call). Called before anything of
  // the tree runs, before lazycr makes anything outside the tree from an image they may still
  // refuse, and when a step fails: their refusal is then the cause to report (a kernel without
  // the userfaultfd features the step needed, ...).
  void join();

 private:
  std::thread thread_;
  std::exception_ptr error_;
};

// Loads libcrypto's SHA-256 (image::load_sha256()) on a thread while the image's inventory and
// processes are read, before its page stores, whose index digests need it.
class Sha256Loader {
 public:
  Sha256Loader();
  ~Sha256Loader() { join(); }
  // Before anything forks: the thread, done loading, may still be ending (OpenSSL's
  // thread-exit handlers take locks).
  void join();

 private:
  std::thread thread_;
};

// Whether the "files" step would make anything outside the tree, which a refused image must
// not get made: ghost files, unix sockets, ptys, System V segments, a network namespace, inet
// sockets bound to privileged ports.
bool files_reach_outside(const image::ImageReader& img, const RestoreOptions& opts);

}  // namespace lazycr::restore
