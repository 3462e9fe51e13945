// Internal to uffd/: the page server's background fill (page_server.h, "Prefetch").
//
// - FillPipeline: decompresses prefetch chunks ahead, on worker threads, into ready buffers
//   (whole frames straight into them, image-format/page_store_direct.h),
//   so that the server's loop only copies (UFFDIO_COPY) and never waits for zstd. The loop
//   queues chunks while buffers are free and takes them back, filled, in any order; it
//   never blocks on the workers (their eventfd wakes its epoll).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/page_store.h"
#include "uffd/owed_set.h"
#include "uffd/page_server.h"
#include "uffd/uffd.h"

namespace lazycr::uffd {

class FillPipeline {
 public:
  // A chunk to decompress: `len` bytes of `store` at `src`, to be filled at `dst` of process
  // `proc_id`; `data` holds them once ready (or `error` says why not).
  struct Chunk {
    uint64_t proc_id = 0;
    std::shared_ptr<const image::PageStoreReader> store;
    uint64_t dst = 0, src = 0, len = 0;
    const char* data = nullptr;
    std::string error;
  };

  // `chunk_bytes`: the largest chunk; `buffers` chunks in flight at most; `threads` workers.
  FillPipeline(uint64_t chunk_bytes, unsigned buffers, unsigned threads);
  ~FillPipeline();  // stop()
  FillPipeline(const FillPipeline&) = delete;
  FillPipeline& operator=(const FillPipeline&) = delete;

  void start();  // throws Error if the eventfd or a thread cannot be made
  void stop();   // joins the workers; every chunk is dropped
  bool started() const;
  // Bytes of whole frames the workers read or decompressed straight into chunk buffers
  // (image-format/page_store_direct.h): not counted by the stores' bytes_decompressed().
  uint64_t bytes_loaded() const;
  // Readable when a chunk became ready; consume() clears it.
  int ready_fd() const;
  void consume();

  bool can_queue() const;  // a buffer is free
  void queue(uint64_t proc_id, std::shared_ptr<const image::PageStoreReader> store, uint64_t dst,
             uint64_t src, uint64_t len);
  // A ready chunk (the oldest queued of those ready), or nullptr; give it back with release().
  const Chunk* ready();
  void release(const Chunk* c);
  // The workers run at SCHED_IDLE: on a busy machine they may not run at all. A chunk that
  // waited kTakeBackNs for them is then taken back, its buffer freed, for the caller to read
  // itself; after one take-back the next ones at once (a wait per chunk made a 2 GiB
  // verification 13% longer), until a worker makes a chunk ready again (ready()).
  static constexpr int64_t kTakeBackNs = 1'000'000;
  bool take_back_due() const;  // take_back() would give a chunk now
  std::optional<Chunk> take_back();
  bool waiting() const;  // a chunk waits for a worker
  // Is a chunk of `proc_id` overlapping [dst, dst + len) queued, being read or ready?
  bool overlaps(uint64_t proc_id, uint64_t dst, uint64_t len) const;
  bool busy(uint64_t proc_id) const;  // any chunk of proc_id in flight

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The quiet fills of a prefetch chunk are made in pieces of kPrefetchPiece bytes while faults
// come: a fault outside the chunk waits for one piece at most (~30 us here; 128 KiB before,
// but once whole frames went straight into the chunk buffers the loop was copying more of the
// time, and faults waited longer: bench/RESULTS.md, "Idle drain against CRIU lazy-pages"). Pieces
// that grew while the uffds stayed quiet between two pieces made faults wait up to ~10x longer (a
// process touching a page every 50 us leaves the uffds quiet in between, bench/RESULTS.md "Fill
// pipeline"); so pieces grow to kPrefetchPieceQuiet only once no fault was read for
// kPrefetchQuietNs: an idle drain pays one ioctl and one poll per 2 MiB, not per 128 KiB.
inline constexpr uint64_t kPrefetchPiece = 64 * 1024;
inline constexpr uint64_t kPrefetchPieceQuiet = 2 * 1024 * 1024;
inline constexpr int64_t kPrefetchQuietNs = 20'000'000;
inline uint64_t prefetch_piece(int64_t now_ns, int64_t last_fault_ns) {
  return now_ns - last_fault_ns >= kPrefetchQuietNs ? kPrefetchPieceQuiet : kPrefetchPiece;
}

}  // namespace lazycr::uffd
