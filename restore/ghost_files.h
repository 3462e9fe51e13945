// Internal to restore/: the ghost files of an image (FORMAT.md "Ghost files"), recreated by
// lazycr before any process exists, unlinked, with their contents: a deleted regular file is
// created at the path it had (so that /proc/PID/fd/N reads "path (deleted)" again) as the first
// process of the image that had it, and unlinked at once; a memfd by memfd_create(name) with
// its seals; a deleted directory made at its path and removed. lazycr keeps one read-only
// descriptor of each (a writable one would make PR_SET_MM_EXE_FILE fail with ETXTBSY). The
// processes reach them through /proc/<lazycr>/fd/N while they still run as lazycr's user
// (mappings, the executable, the working directory), and their descriptors get descriptions
// lazycr opens (shared_files.h).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"
#include "restore/calls.h"
#include "restore/memory.h"

namespace lazycr::restore {

class GhostFiles {
 public:
  // Recreates every ghost of `shared`; throws Error naming the ghost and why. Nothing created
  // is left on a throw (each is unlinked as soon as it exists).
  GhostFiles(const std::vector<image::Process>& processes, const image::SharedObjects& shared);
  GhostFiles(const GhostFiles&) = delete;
  GhostFiles& operator=(const GhostFiles&) = delete;

  bool empty() const { return fds_.empty(); }
  // The path a restored process (running as lazycr's user) opens ghost `id` by.
  std::string path_in_process(uint64_t id) const;
  // The call (arguments pushed to r's arena) that opens ghost `id` in the process with `flags`
  // (O_CLOEXEC added); `what` names the use in a failure.
  Call open_call(RemoteProcess& r, uint64_t id, int flags, const std::string& what) const;
  // Opens ghost `id` in the process now; returns the descriptor there.
  long open_in(RemoteProcess& r, uint64_t id, int flags, const std::string& what) const;
  // The call that makes the deleted working directory of `p` the process's.
  Call chdir_call(RemoteProcess& r, const image::Process& p) const;
  // A new open file description of the ghost of descriptor `f`: its access mode, status flags
  // and position.
  UniqueFd open_description(const image::FileDescriptor& f, const std::string& what) const;

 private:
  int fd_of(uint64_t id) const;
  std::map<uint64_t, UniqueFd> fds_;  // ghost id -> lazycr's read-only descriptor
};

}  // namespace lazycr::restore
