// Ghost files of an image (shared.pb GhostFile, FORMAT.md "Ghost files"): deleted files, memfds
// and deleted working directories whose contents the image stores. The bounds and the checks
// the reader applies to them, and to the references the processes make to them.
#pragma once

#include <cstdint>
#include <vector>

#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"

namespace lazycr::image {

// dump --ghost-limit: the default and the largest allowed, per file (st_size). Every ghost's
// contents live in shared.pb (64 MiB decoded at most, kMaxSharedBytes), so all of them together
// are bounded below that too.
inline constexpr uint64_t kDefaultGhostLimit = 16ull << 20;
inline constexpr uint64_t kMaxGhostBytes = 48ull << 20;
inline constexpr uint64_t kMaxGhostTotalBytes = 48ull << 20;
inline constexpr int kMaxGhosts = 1 << 16;
inline constexpr size_t kMaxMemfdName = 249;   // memfd_create: 255 with its "memfd:" prefix
inline constexpr size_t kMaxGhostPath = 4095;  // PATH_MAX without its NUL
// F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC
inline constexpr uint32_t kKnownSeals = 0x3f;

// The ghosts of shared.pb: ids 1..n in order, known kinds, bounded sizes, names and paths.
void validate_ghosts(const SharedObjects& shared);

// Every ghost a process refers to (descriptor, area, executable, working directory) exists and
// is of a kind that fits the reference. Throws naming the process and the reference.
void check_ghost_refs(const std::vector<Process>& processes, const SharedObjects& shared);

}  // namespace lazycr::image
