// `lazycr dump`: freeze a running process from the outside with ptrace, record its state and
// memory into an image directory, then kill it or let it run on.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "image-format/page_store.h"

namespace lazycr::checkpoint {

struct DumpOptions {
  pid_t pid = 0;
  std::string dir;
  bool leave_running = false;
  bool replace = false;                            // overwrite an existing image directory
  int level = 1;                                   // zstd level
  unsigned threads = 0;                            // compression threads, 0 = CPUs
  uint32_t frame_size = image::kDefaultFrameSize;  // page-store frame size
  bool skip_unsupported_fds = false;  // record fds the restore cannot recreate instead of failing
  // Tests only: fail at this step ("freeze", "threads", "memory", "commit"), or
  // "kill-target" to SIGKILL the target while its memory is being read.
  std::string fault_inject;
};

struct DumpResult {
  uint64_t frozen_ns = 0;  // from the first interrupt to the detach (or kill)
  uint64_t total_ns = 0;
  uint64_t threads = 0;
  uint64_t areas = 0;
  uint64_t data_pages = 0;  // pages with content in the store
  uint64_t zero_pages = 0;
  uint64_t image_bytes = 0;  // all files of the image
  uint64_t injected_syscalls = 0;
};

// Throws Error with one line naming what failed; on any failure the target is left running
// exactly as it was and no image directory is created.
DumpResult dump(const DumpOptions& opts);

}  // namespace lazycr::checkpoint
