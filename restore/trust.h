// Internal to restore/: whether an image may be restored with the credentials it asks for
// (README "Trust", FORMAT.md "image.mac").
#pragma once

#include <string>

#include "image-format/image_dir.h"
#include "restore/restore.h"

namespace lazycr::restore {

// Why the image would give its processes more than whoever wrote it could have had: a uid or
// gid 0 in any slot, supplementary group 0, any capability (permitted, effective, inheritable,
// ambient), ids other than the restoring user's (lazycr not root), or, for an image lazycr
// did not sign restored by root, ids other than those of the user who owns its files. ""
// when none. Zombies hold nothing: they are not run as the image's user.
std::string privilege_of(const image::ImageReader& img);

// Refuses a privileged image unless this machine signed it (and only root can still change
// its files) or --trust-image was given. Throws Error naming the process and the reason.
void check_trust(const image::ImageReader& img, const RestoreOptions& opts);

}  // namespace lazycr::restore
