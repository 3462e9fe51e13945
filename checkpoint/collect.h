// Internal to checkpoint/: the pieces of a dump, each over a frozen process.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/proc.h"
#include "image-format/page_store.h"
#include "image-format/process.pb.h"

namespace lazycr::checkpoint {

// Memory areas from smaps, classified (kind, file identity). vsyscall is kept (kind
// VSYSCALL) so the listing matches /proc/PID/maps; it is never restored.
std::vector<image::MemoryArea> collect_areas(pid_t pid, const std::vector<proc::MapsEntry>& maps);

struct MemoryStats {
  uint64_t pages_read = 0;
  uint64_t bytes_read = 0;
};

// Finds the pages of each area that the restore cannot get elsewhere (PAGEMAP_SCAN, or
// /proc/PID/pagemap without it), reads them in large batches and feeds the store writer.
// Sets stored_pages on each area. `progress` is called now and then with pages read so far.
MemoryStats dump_memory(pid_t pid, std::vector<image::MemoryArea>& areas,
                        image::PageStoreWriter& writer,
                        const std::function<void(uint64_t pages)>& progress);

// Open file descriptors with kind, flags, position and file identity.
std::vector<image::FileDescriptor> collect_fds(pid_t pid);

// Identity (dev, inode, size, mtime, mode) of a path; `deleted` from a " (deleted)" suffix.
image::FileIdentity file_identity(const std::string& path_as_reported,
                                  const std::string& stat_path);

}  // namespace lazycr::checkpoint
