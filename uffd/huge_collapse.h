// A lazily restored process's huge-page areas (LazyArea::huge), collapsed again once served:
// UFFDIO_COPY fills them 4 KiB at a time. Internal to uffd/ (the page server's release).
#pragma once

#include <sys/types.h>

#include <vector>

#include "uffd/page_server.h"

namespace lazycr::uffd {

// The whole 2 MiB blocks of `areas`, collapsed into huge pages in the process of `pidfd`
// (process_madvise MADV_COLLAPSE, Linux 6.1). A refusal (no THP, no free huge page, the
// process gone) leaves them in 4 KiB pages, with a -vv line.
void collapse_huge_areas(pid_t pid, int pidfd, const std::vector<LazyArea>& areas);

}  // namespace lazycr::uffd
