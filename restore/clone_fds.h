// Internal to restore/: the descriptors of a clone of a template (restore/clone.h) made afresh,
// so that no open file description is shared between clones (or with the template), as if each
// clone were restored on its own.
#pragma once

#include <memory>

#include "image-format/image_dir.h"
#include "restore/restoree.h"

namespace lazycr::restore {

class GhostFiles;
class SharedFiles;

// Every description lazycr makes for one clone (sockets in `sockets_netns`, -1: ours), shared
// by the clone's processes: a pipe between two processes of a tree stays one pipe, each clone
// its own. Ghost files are recreated for this clone (always with `ghosts_always`, which the
// memory of a tree's other processes needs; else only for ghost descriptors).
struct CloneFiles {
  CloneFiles(const image::ImageReader& img, int sockets_netns, bool shell_job, bool ghosts_always);
  ~CloneFiles();
  std::unique_ptr<GhostFiles> ghosts;
  std::unique_ptr<SharedFiles> shared;
};

// Gives the process `c` of a clone (the fork of the template, or a process forked inside the
// clone; leader only) a new description for every descriptor of process `p`: the ones lazycr
// makes (pipes, UNIX and inet sockets, eventfds, timerfds, signalfds, ...: `files`) are passed
// over a transport `c` connects to in network namespace `transport_netns` (the one it is in;
// -1: lazycr's); files are opened again by path inside; epoll sets and the other kinds made
// inside are made again there (objects/). Every number of `p` must be open in `c` already (the
// new descriptions are dup3'ed over them). `netns` >= 0: passed too, returns its number in
// `c` (for setns), else -1. `std_fds`: --shell-job, the requester's fds 0-2 (else all -1).
int replace_clone_fds(Restoree& c, const image::Process& p, const CloneFiles& files, int netns,
                      int transport_netns, const int (&std_fds)[3]);

// Throws, by pid, fd and why, for a descriptor of `p` that clones could not each have on
// their own.
void check_clone_fd(const image::Process& p, const image::FileDescriptor& f,
                    const image::SharedObjects& shared, bool shell_job);

}  // namespace lazycr::restore
