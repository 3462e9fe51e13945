// Internal to restore/: the pages a lazy restore writes before the process runs, read early.
//
// A lazy restore still writes some pages eagerly (restore/lazy.cc): those of private file
// areas (userfaultfd's MISSING mode does not take them), shared memory, and locked or
// wipe-on-fork areas. Reading them means decompressing every frame of the store that holds
// one, which on a small server is most frames (redis, 20,000 keys: 295 pages, 3.8 ms). The
// image says which pages they are, so a thread reads them into memory right after the image
// is validated, while lazycr creates and shapes the process (mostly waiting on ptrace stops);
// the eager filler then copies them from here instead of reading the store.
// The thread must be gone before lazycr forks anything that uses the stores or allocates (the
// page server: restore/lazy.cc waits for it first); clone3 of the process to restore runs raw
// system calls only and is safe.
#pragma once

#include <cstdint>
#include <memory>

#include "image-format/image_dir.h"

namespace lazycr::restore {

// Whether a lazy restore leaves `area` to the page server (restore/lazy.cc has the rules).
bool lazy_candidate(const image::MemoryArea& area);

class EagerPreread {
 public:
  // Starts reading the eager pages of every live process of `img` (a lazy restore; `img`
  // outlives this). Stores too big to hold in memory are left to the filler.
  static std::shared_ptr<EagerPreread> start(const image::ImageReader& img);
  ~EagerPreread();  // waits for the thread
  EagerPreread(const EagerPreread&) = delete;
  EagerPreread& operator=(const EagerPreread&) = delete;

  // Waits until the thread is done (before a fork). Errors stay for copy() to ignore: the
  // filler then reads the store itself and reports them.
  void wait() const;
  // Copies `pages` pages at `addr` of the process whose store is `store` to `out` and returns
  // true if they were all read here; false (out untouched) otherwise. Waits for the thread.
  bool copy(const image::PageStoreReader& store, uint64_t addr, uint64_t pages, char* out) const;

 private:
  EagerPreread();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazycr::restore
