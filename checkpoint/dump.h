// `lazycr dump`: freeze a running process tree from the outside with ptrace, record its state
// and memory into an image directory, then kill it or let it run on.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "image-format/ghost.h"
#include "image-format/page_store.h"

namespace lazycr::checkpoint {

struct DumpOptions {
  pid_t pid = 0;
  std::string dir;
  bool leave_running = false;
  // With leave_running: keep the tree frozen while its memory is read (--frozen-copy), instead
  // of a live dump that reads it from copy-on-write twins once the tree runs again.
  bool frozen_copy = false;
  bool replace = false;  // overwrite an existing image directory
  // --compress: zstd at `level` (frames zstd does not shrink are stored raw), or none.
  image::PageIndex::Compression compression = image::PageIndex::ZSTD;
  int level = image::kDefaultLevel;  // zstd level
  bool auto_codec = false;           // --compress auto (image::PageStoreOptions::auto_codec)
  unsigned threads = 0;              // compression threads, 0 = CPUs
  uint32_t frame_size = image::kDefaultFrameSize;  // page-store frame size
  bool skip_unsupported_fds = false;  // record fds the restore cannot recreate instead of failing
  bool tcp_established = false;       // record established TCP connections (TCP_REPAIR)
  // Record datagram UNIX sockets connected to a bound socket outside the tree (CRIU's flag).
  bool ext_unix_sk = false;
  // Store pages shared between processes of the tree once (same physical page after fork,
  // same shared object); the others refer to them (REF runs).
  bool dedup = true;
  // Incremental dump: the image directory of an earlier dump of this tree (--parent); pages
  // with the same content there are not stored again but referred to (PARENT runs).
  std::string parent_dir;
  // Record a digest of every stored page (--hash-pages; implied by parent_dir), so that a
  // later --parent dump of this image compares digests instead of reading its pages back.
  bool page_hashes = false;
  // --track (with leave_running): arm write tracking after the dump, so that a later --parent
  // dump of this image reads only the pages written since (write_tracking.h).
  bool track = false;
  // Largest deleted file or memfd whose contents the image stores (st_size, bytes).
  uint64_t ghost_limit = image::kDefaultGhostLimit;
  // Tests only: fail at this step ("freeze", "threads", "files", "memory", "commit"), or
  // "kill-target" to SIGKILL the target while its memory is being read, or
  // "stop-before-commit" to SIGSTOP lazycr itself with the image staged, before the rename.
  std::string fault_inject;
};

struct DumpResult {
  uint64_t frozen_ns = 0;  // from the first interrupt to the detach (or kill)
  bool live = false;       // memory read from twins after the tree was let go
  uint64_t total_ns = 0;
  uint64_t processes = 0;  // in the image, zombies included
  uint64_t zombies = 0;
  uint64_t threads = 0;
  uint64_t areas = 0;
  uint64_t data_pages = 0;  // pages with content in the stores (all processes)
  uint64_t zero_pages = 0;
  uint64_t ref_pages = 0;     // pages stored by an earlier process and referred to (dedup)
  uint64_t parent_pages = 0;  // pages unchanged since the parent image, referred to there
  uint64_t unread_pages = 0;  // of those, left unread: not written since (write tracking)
  uint32_t chain_length = 0;  // with a parent: links from the chain's full dump to this one
  uint64_t pipes = 0;         // pipes and FIFOs recorded with their data (shared.pb)
  uint64_t sockets = 0;       // UNIX socket ends recorded with their queues
  uint64_t ghosts = 0;        // deleted files, memfds and directories stored (shared.pb)
  uint64_t image_bytes = 0;   // all files of the image
  uint64_t injected_syscalls = 0;
  std::string replaced;  // with `replace`: what the image replaced ("" if nothing was there)
};

// Dumps the process opts.pid and every process below it. Throws Error with one line naming
// what failed; on any failure every process of the tree is left running exactly as it was
// and no image directory is created.
DumpResult dump(const DumpOptions& opts);

}  // namespace lazycr::checkpoint
