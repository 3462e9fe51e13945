// Internal to restore/: shared anonymous memory made afresh in each clone of a template. A fork
// leaves the clone mapping the template's objects, which every other clone would then share
// (one clone's writes seen by all); each clone gets objects of its own holding the template's
// bytes (the image's: the template never runs).
#pragma once

#include "image-format/process.pb.h"
#include "restore/address_space.h"

namespace lazycr::restore {

class Restoree;

// Shared anonymous areas that a clone gets its own object for: not SysV segments nor memfds
// (check_clonable refuses those).
bool remade_in_clones(const image::MemoryArea& a);

// Maps in `clone` (just forked from `tpl`) a new object for each shared anonymous object of
// `p` over every area of it, with the template's bytes, protections and VMA flags. Returns
// where each object now is in the clone, for the tree's other processes (clone_tree.h).
SharedObjectMap remake_shared_memory(Restoree& tpl, Restoree& clone, const image::Process& p);

}  // namespace lazycr::restore
