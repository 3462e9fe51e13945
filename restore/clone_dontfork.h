// Internal to restore/: MADV_DONTFORK memory of a clone of a template (restore/clone.h). A
// fork does not copy such areas (node's V8, for one, marks some), so the clone would miss
// them: they are mapped again in the clone, filled from the template, and marked again.
#pragma once

#include <string>

#include "image-format/process.pb.h"
#include "restore/restoree.h"

namespace lazycr::restore {

// Throws, naming the area, for a MADV_DONTFORK area a clone cannot be given (not private
// anonymous memory).
void check_dontfork_area(const image::MemoryArea& a);

// Gives the fresh fork `c` of the template `tpl` every MADV_DONTFORK area of `p`, with the
// template's contents.
void copy_dontfork_areas(Restoree& tpl, Restoree& c, const image::Process& p);

}  // namespace lazycr::restore
