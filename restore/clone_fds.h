// Internal to restore/: the descriptors of a clone of a template (restore/clone.h) made afresh,
// so that no open file description is shared between clones (or with the template), as if each
// clone were restored on its own.
#pragma once

#include "image-format/image_dir.h"
#include "restore/restoree.h"

namespace lazycr::restore {

// Gives the clone `c` (the fork of the template, leader only) a new description for every
// descriptor of process `p` of `img`: lazycr makes what the restore makes itself (pipes, UNIX
// and inet sockets, eventfds, timerfds, signalfds, ...: restore/shared_files.h) and passes it
// over a transport the clone connects to; files are opened again by path inside the clone;
// epoll sets and the other kinds made inside are made again there (objects/). `netns` >= 0:
// sockets are made in that network namespace, which is passed too: returns its number in the
// clone (for setns), else -1. Else sockets are made in `template_netns` (the template's own,
// which the clone is in until that setns; -1: lazycr's). Ghost files (deleted files, memfds) are recreated
// for the clone from the image's contents: each clone its own file.
// `std_fds`: --shell-job, the requester's fds 0-2 (else all -1).
int replace_clone_fds(Restoree& c, const image::Process& p, const image::ImageReader& img,
                      int netns, int template_netns, const int (&std_fds)[3]);

// Throws, by pid, fd and why, for a descriptor of `p` that clones could not each have on
// their own.
void check_clone_fd(const image::Process& p, const image::FileDescriptor& f,
                    const image::SharedObjects& shared, bool shell_job);

}  // namespace lazycr::restore
