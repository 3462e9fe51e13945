// Internal to restore/: validation and process creation, used by the sequence in restore.cc.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/fd.h"
#include "image-format/image_dir.h"
#include "restore/restore.h"
#include "restore/skipped_fds.h"  // the validation step runs it first

namespace lazycr::restore {

// Checks everything that can be checked before anything is created: one live process, same
// kernel release and vdso, xsave state this CPU supports, every mapped file (and the exe)
// unchanged, every descriptor restorable, nothing the restore cannot do, and (without
// --pidns) every PID/TID free. Throws Error with the reason (the caller adds the prefix).
void validate_image(const image::ImageReader& img, const RestoreOptions& opts);

// The new process, stopped by its own SIGSTOP and seized by us (PTRACE_O_TRACECLONE |
// PTRACE_O_EXITKILL) but not yet waited for.
struct Spawned {
  pid_t pid = 0;     // as seen by us
  pid_t vpid = 0;    // in its own PID namespace (the image's pid)
  pid_t reaper = 0;  // --pidns: our child, PID 1 of the new namespace
  UniqueFd pidfd;    // the new process
  UniqueFd reaper_pidfd;
  UniqueFd reaper_ctl;  // --pidns: write end the reaper waits on ('D' = restored, detach)
};

// How far spawn_process() got, so that a failure can clean up exactly that.
struct SpawnState {
  Spawned s;
  UniqueFd go;  // write end: closing it lets the child stop itself
};

// Creates the process with the image's pid via clone3(set_tid): directly as our child, or
// (pidns) as the child of a new reaper that is PID 1 of a fresh PID namespace. The child
// blocks until release_child() closes `go`; the caller seizes it in between. Throws Error;
// what was created is in `st` for the caller's cleanup.
void spawn_process(pid_t image_pid, bool pidns, SpawnState& st);
// Lets the child run on: it sends itself SIGSTOP (syscall(SYS_kill, getpid(), SIGSTOP)).
void release_child(SpawnState& st);

// Reads "Pid:" of /proc/self/fdinfo/<pidfd> (the pid in our namespace).
pid_t pid_of_pidfd(int pidfd);

}  // namespace lazycr::restore
