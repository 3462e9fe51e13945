// Descriptors an image recorded without being able to restore them (a socket of another
// family, an eventfd, a pipe end whose other end was outside the tree, ...: dump
// --skip-unsupported-fds). Without --skip-unsupported-fds the restore refuses the image, naming
// every one; with it, each comes back as /dev/null at its number, with its access mode, status
// flags and close-on-exec flag, so that the program finds a descriptor it can close, read (EOF)
// or write (discarded) where it had one.
#pragma once

#include <vector>

#include "image-format/process.pb.h"
#include "restore/restore.h"

namespace lazycr::restore {

// Runs before validation: throws Error (one line, every descriptor named) or rewrites each such
// descriptor of `procs` as an ordinary /dev/null descriptor (then restored like any other) and
// prints one warning line listing them. Descriptors --shell-job replaces by lazycr's own fds
// 0-2 are left alone.
void stand_in_for_unsupported_fds(std::vector<image::Process>& procs, const RestoreOptions& opts);

}  // namespace lazycr::restore
