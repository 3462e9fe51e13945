// `lazycr template` (issue 13): the restore built once and held, never released. Every process
// of the image stays stopped under ptrace with the trampoline in place; clones are forked
// from it (restore/clone.h). Internal to restore/ and tools/template.cc.
#pragma once

#include <sched.h>

#include "image-format/image_dir.h"
#include "restore/restore.h"

namespace lazycr::restore {

class Restoree;

// What the holder gets, valid for as long as RestoreOptions::hold runs.
struct HeldTemplate {
  const RestoreOptions& opts;
  const image::ImageReader& img;
  Restoree& root;         // stopped at an event stop, trampoline mapped, every thread made
  const cpu_set_t& cpus;  // lazycr's CPU mask before the restore pinned it (clones get it)
};

// Called by restore() once everything but the release is done: runs opts.hold and returns an
// empty Restored; restore()'s unwinding then kills the template and reaps it.
Restored hold_template(const RestoreOptions& opts, const image::ImageReader& img, Restoree& root,
                       const cpu_set_t& cpus);

}  // namespace lazycr::restore
