// Internal to restore/: opening the files an image names, as the process they are for.
//
// Images are untrusted input (README "Trust"): a file is opened with the credentials of the
// process of the image that will hold it (its groups, fsuid, fsgid and only its effective
// capabilities), never with lazycr's root on its behalf; nothing is opened that could block or
// act on open (a FIFO, a device) before its identity is checked: each path is opened with O_PATH
// first, checked against the image (type, device, inode; size and mtime for mapped files and
// the executable; a device's number; a terminal's ctime), and only then reopened through
// /proc/self/fd with its real flags.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/process.pb.h"
#include "restore/calls.h"
#include "restore/memory.h"

namespace lazycr::restore {

// One file to open and what it must be.
struct OpenRequest {
  std::string path;                         // absolute
  int flags = 0;                            // of the final descriptor (O_CLOEXEC is added)
  mode_t type = S_IFREG;                    // S_IFREG, S_IFDIR, S_IFCHR or S_IFBLK
  const image::FileIdentity* id = nullptr;  // the file the image names (dev, inode, ...)
  uint64_t rdev = 0;                        // devices: the device number
  bool strict = false;                      // size and mtime too (mapped files, executable)
  std::string what;                         // "fd 3", "executable", ...
};

// The request for a descriptor of the image opened by path; throws for kinds that are never
// opened by path.
OpenRequest request_for_fd(const image::FileDescriptor& f);

// Calls (appended to `calls`) that move each descriptor open_as_process() returned (`fds[k]`,
// opened for `opened[k]`) to its number in the image with its close-on-exec flag, and put a
// regular file at its position.
void push_place_fds(const std::vector<const image::FileDescriptor*>& opened,
                    const std::vector<long>& fds, std::vector<Call>& calls);

// Throws "<what> <path> ..." when `st` is not the file `req` names.
void check_identity(const struct stat& st, const OpenRequest& req);

// Opens every request in the leader of `r` with `creds` (see above). Returns the descriptors
// there, close-on-exec, each at a number >= min_fd.
std::vector<long> open_as_process(RemoteProcess& r, const image::Credentials& creds,
                                  const std::vector<OpenRequest>& reqs, int min_fd);

// Calls (appended to `calls`, arguments pushed to r's arena) that give the leader of `r` the
// file-system identity of `creds`, and that give it lazycr's own back. No-ops unless lazycr
// is root (otherwise the process already is the image's user, validate.cc).
void push_enter_identity(RemoteProcess& r, const image::Credentials& creds,
                         std::vector<Call>& calls);
void push_leave_identity(RemoteProcess& r, std::vector<Call>& calls);

// The same in lazycr itself, for descriptions lazycr opens and hands to processes (the calling
// thread only): opens `req` as `creds` would, O_PATH first.
UniqueFd open_here_as(const image::Credentials& creds, const OpenRequest& req);

// Runs `fn` in the calling thread with the file-system identity of `creds` (as above), for
// files lazycr creates for a process (restore/ghost_files.h).
void run_here_as(const image::Credentials& creds, const std::function<void()>& fn);

}  // namespace lazycr::restore
