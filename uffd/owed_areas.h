// Internal to uffd/: what a restored process owes when it is handed to the page server
// (PageServer::add_process), and the tags the server gives owed ranges.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "image-format/page_store.h"
#include "uffd/owed_set.h"
#include "uffd/page_server.h"

namespace lazycr::uffd {

// The owed-set tags (uffd/owed_set.h) the page server gives a range: the kind of its store run.
inline constexpr uint32_t kTagData = 0;  // DATA, REF, PARENT: store.read() gives the bytes
inline constexpr uint32_t kTagZero = 1;  // ZERO: UFFDIO_ZEROPAGE

// Every page of `store` inside `areas`, one range per (run, area) piece, each with its own
// address as source. Throws Error naming pid `pid` when an area is empty, not page aligned or
// overlaps another, or the store has a run of a kind the server cannot serve.
OwedSet owed_in_areas(pid_t pid, const image::PageStoreReader& store,
                      const std::vector<LazyArea>& areas);

}  // namespace lazycr::uffd
