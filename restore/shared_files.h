// Open file descriptions the processes of a tree share, and pipes, FIFOs and sockets (UNIX:
// objects/unix_socket.h; IPv4/IPv6: objects/inet_socket.h) with the data buffered in them at dump
// time: lazycr creates them itself, before any process runs, and the restore hands each process its
// descriptors through an SCM_RIGHTS socket.
//
// How each descriptor of the image is restored (plan()):
// - kShared: every PIPE, FIFO and SOCKET descriptor, and every other descriptor whose open file
//   description (file_id) is held by more than one descriptor of the image (dup'ed, or
//   inherited at fork): one description, one position, one set of status flags, created here.
// - kLazycrStd: with --shell-job, a descriptor 0-2 whose description leads outside the tree
//   (a pipe of which the image holds only one end, a socket whose peer no process of the
//   image holds, a terminal, anything not restorable), and every other descriptor of that same
//   description: the process gets lazycr's own standard descriptor.
// - kShared too: every descriptor of a ghost file (a deleted file or a memfd, ghost_files.h).
// - kObjects: an EPOLL descriptor, made inside the process by its objects/ unit once every
//   other descriptor is in place (restore_objects at RestorePoint::kFilesInPlace).
// - kOpenInside: everything else, opened inside the process by path as before.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "common/fd.h"
#include "image-format/process.pb.h"
#include "image-format/shared.pb.h"

namespace lazycr::restore {

class GhostFiles;

struct FdPlan {
  enum Source { kOpenInside, kLazycrStd, kShared, kObjects } source = kOpenInside;
  // kShared: lazycr's descriptor of that description (owned by SharedFiles; close-on-exec in
  // lazycr: the recipient sets its own; position and status flags are already the image's,
  // do not lseek it again). kLazycrStd: which of lazycr's fds 0-2 to give (the descriptor's
  // own number for fds 0-2; for a dup of one of them at another number, that one's number).
  int fd = -1;
};

class SharedFiles {
 public:
  // Creates, in lazycr, every description that must be created here; throws Error naming the
  // object (pipe inode, socket inode, file id, path, or pid and fd) and why. Nothing created
  // is left open on a throw.
  // Every descriptor of a ghost file (FileDescriptor.ghost_id) is kShared: its description is
  // opened from `ghosts`, which must then be given.
  // `ext_unix_sk`: restore --ext-unix-sk (objects/unix_socket.h).
  SharedFiles(const std::vector<image::Process>& processes, const image::SharedObjects& shared,
              bool shell_job, const GhostFiles* ghosts = nullptr, bool ext_unix_sk = false);
  SharedFiles(const SharedFiles&) = delete;
  SharedFiles& operator=(const SharedFiles&) = delete;
  ~SharedFiles() = default;  // closes every description it holds

  // The plan for descriptor f of process pid (both from the processes given to the
  // constructor); throws Error for a descriptor it was not given.
  FdPlan plan(int pid, const image::FileDescriptor& f) const;

  // Descriptions held (kShared), for diagnostics.
  size_t size() const { return descriptions_.size(); }

 private:
  std::map<std::pair<int, int>, FdPlan> plans_;  // (pid, fd) -> plan
  std::map<uint64_t, UniqueFd> descriptions_;    // file_id -> lazycr's descriptor
};

}  // namespace lazycr::restore
