// Clones of a held template (issue 13, DESIGN.md section 10): each clone is a fork of the
// template's root made by an injected clone3 (a tree's other processes are then made inside
// the clone: clone_tree.h), so that its private memory is shared
// copy-on-write with the template and with every other clone. Each clone lives in a fresh PID
// namespace (PID 1 there is a small reaper made by lazycr) with the image's PIDs and TIDs.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "common/fd.h"
#include "image-format/image_dir.h"
#include "restore/template.h"

namespace lazycr::restore {

// Refuses, by name, what a clone could not have as a separate restore would: in trees, what
// clone_tree.h does not make (zombies, credentials other than the root's); state a fork does not
// copy (pending signals, timers, record locks), memory it drops or shares (MADV_DONTFORK areas,
// shared anonymous memory) and descriptors not yet made afresh per clone (restore/clone_fds.h:
// established TCP connections, deleted files, terminals, locks). `shell_job`: fds 0-2 leading
// outside the image are each clone's requester's (clone --shell-job).
void check_clonable(const image::ImageReader& img, bool shell_job);

struct Clone {
  pid_t pid = 0;        // in lazycr's PID namespace
  pid_t image_pid = 0;  // in its own namespace
  pid_t reaper = 0;     // PID 1 of that namespace (our child)
  UniqueFd pidfd;       // of the clone (our child: the template's parent is us)
  UniqueFd reaper_pidfd;
  uint64_t threads = 0;
  uint64_t running_ns = 0;  // steady clock when every thread was released
};

struct CloneRequest {
  bool netns = false;  // a fresh network namespace (loopback up) for the clone
  // --shell-job: the requester's fds 0-2 (valid during make_clone), given to the clone's
  // descriptors whose description leads outside the image (as restore --shell-job); -1: none.
  int std_fds[3] = {-1, -1, -1};
};

// A clone's PID namespace and its PID 1 (clone.cc); killed and reaped unless given to a clone.
struct NsReaper;
struct NsReaperDeleter {
  void operator()(NsReaper* r) const noexcept;
};
using PreparedNs = std::unique_ptr<NsReaper, NsReaperDeleter>;

// The next clone's PID namespace, made and entered by the template (for its children) ahead of
// the request, so that a request starts at the fork: making the namespace and its reaper and
// the injected setns cost a few ms.
PreparedNs prepare_clone_namespace(HeldTemplate& t);

// Makes one clone of the held template, in `prepared` if given and still there (else in a new
// namespace); on failure nothing of it is left (the clone and its reaper are killed and
// reaped). Throws Error "clone: <step>: <why>".
Clone make_clone(HeldTemplate& t, const CloneRequest& req, PreparedNs prepared = nullptr);

}  // namespace lazycr::restore
