// Reads pages of a page store straight into the caller's buffer, bypassing the frame cache:
// for the background fill of a lazy restore (uffd/fill_pipeline.h), where each page is read
// once and the cache only cost a copy (bench/RESULTS.md "Fill pipeline": 5% of the server's
// CPU in memmove) and evicted the frames that faults need.
//
// Every whole frame inside the range goes straight to `out`: a raw frame by one pread from the
// file (the page cache) into `out`, a zstd frame by one pread into a scratch buffer and one
// decompression into `out`. Each is checked against its SHA-256 in the index before its bytes
// are used (two frames at a time, PageStoreReader::check_frame_pair: their digests are computed
// together, ~2x faster; a last odd frame alone): a frame that does not match throws, naming the
// store and the frame, and `out` must then not be used. Pages of partial frames (the chunk's
// ends), ZERO and REF pages, and every page of a store without frame digests (its frames are
// vouched for only by a MAC over the file the reader opened) go through PageStoreReader::read.
//
// Not thread-safe: one DirectPageReader per thread (it owns scratch buffers, a zstd context
// and one descriptor per store, opened again through the store's own, never by path, and
// checked to have its size).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "image-format/page_store.h"

namespace lazycr::image {

class DirectPageReader {
 public:
  DirectPageReader();
  ~DirectPageReader();
  DirectPageReader(const DirectPageReader&) = delete;
  DirectPageReader& operator=(const DirectPageReader&) = delete;

  // Pages [addr, addr + npages * 4096) of `store` into `out`, as store.read() would give them;
  // throws Error as it would (a page not in the store, a corrupt frame, a read error).
  void read(const PageStoreReader& store, uint64_t addr, size_t npages, void* out);

  // Bytes of content loaded by whole frames (raw or decompressed) so far; the rest is counted
  // by the stores themselves (PageStoreReader::bytes_decompressed()).
  uint64_t bytes_loaded() const;
  uint64_t frames_direct() const;  // whole frames read straight into `out`

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazycr::image
