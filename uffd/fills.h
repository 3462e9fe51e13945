// Internal to uffd/: the page server's fills (UFFDIO_COPY, UFFDIO_ZEROPAGE) and what their
// answers mean for a process's owed set (uffd/owed_set.h). They never throw for an answer the
// page server expects (see Userfaultfd::copy()):
// - EEXIST: the page is there already: it is owed no more (a failed fill wakes nobody: the
//   callers wake where a thread may wait);
// - EAGAIN: layout events are pending: the caller reads them first; nothing changes;
// - ESRCH, ENOSPC: the mm is gone: `gone` is set;
// - ENOENT: no registered area there any more (an mprotect split the area, or it is gone).
// Anything else throws Error naming the ioctl, the address and the answer.
#pragma once

#include <cstdint>

#include "image-format/page_store.h"
#include "uffd/owed_areas.h"
#include "uffd/owed_set.h"
#include "uffd/page_server.h"
#include "uffd/uffd.h"

namespace lazycr::uffd {

// Is the mm behind uffd `fd` still there? (A copy that cannot succeed, at `dst`.)
bool mm_alive(int fd, uint64_t dst);

// One fill of [dst, dst + n) that wakes nobody unless `wake` (ZERO: UFFDIO_ZEROPAGE, else
// UFFDIO_COPY from `buf`), counted in `stats` as prefetch and erased from `owed`. Returns the bytes
// filled: 0 when the chunk must stop (a page already there, layout events pending, the mm gone).
// Shrinks on ENOENT (an area split by mprotect) down to one page, which is then owed no more.
uint64_t fill_quietly(Userfaultfd& uffd, OwedSet& owed, PageServerStats& stats, uint64_t dst,
                      uint64_t n, bool zero, const char* buf, bool& gone, bool wake = false);

// The rest of a fault's window, [from, to) of DATA pages whose bytes are at `buf`: one
// UFFDIO_COPY that wakes the threads waiting there, counted as fault pages. Anything unusual
// stops it: what is left stays owed for a later fault or prefetch.
void fill_window_part(Userfaultfd& uffd, OwedSet& owed, PageServerStats& stats, uint64_t from,
                      uint64_t to, const char* buf, bool& gone);

// What is still owed in [from, to) (at most `buf_bytes`, the size of `buf`), range by range,
// looked up afresh (faults served since, or events read meanwhile, may have changed it): DATA
// read from `store` into `buf` and copied, ZERO zero-filled, waking the threads waiting there.
// Anything unusual stops it, as above.
void fill_owed_part(Userfaultfd& uffd, OwedSet& owed, const image::PageStoreReader& store,
                    PageServerStats& stats, uint64_t from, uint64_t to, char* buf,
                    uint64_t buf_bytes, bool& gone);

}  // namespace lazycr::uffd
