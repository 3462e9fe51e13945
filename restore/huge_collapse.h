// Huge pages for a held template (issue 13): a clone is a fork of the template, and fork
// copies one page-table entry per 4 KiB page but a single PMD per PMD-mapped transparent huge
// page. Collapsing the template's populated private anonymous memory into huge pages makes a
// clone of 512 MiB copy 256 entries instead of 131072. Internal to restore/ and tools/.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "restore/template.h"

namespace lazycr::restore {

struct CollapseStats {
  uint64_t candidate_bytes = 0;  // 2 MiB-aligned, fully populated private anonymous ranges
  uint64_t collapsed_bytes = 0;  // in ranges the kernel collapsed whole
  uint64_t huge_bytes = 0;       // AnonHugePages of the template afterwards
  uint64_t refused_calls = 0;    // MADV_COLLAPSE calls the kernel refused (left as they were)
  int last_errno = 0;            // of the last refusal
};

// MADV_COLLAPSE, injected in the template's root, over every 2 MiB-aligned range of its private
// anonymous areas whose 512 pages are all present (nothing is populated that the image did not
// hold). Areas marked VM_NOHUGEPAGE ("nh") are left alone. MADV_COLLAPSE does not touch the
// areas' VmFlags (MADV_HUGEPAGE would set "hg"), so clones keep the image's. A refusal (no THP
// in the kernel, THP disabled, no memory for a huge page) leaves the range as it was: clones
// are then slower to make, never different.
CollapseStats collapse_huge_pages(HeldTemplate& t);

// AnonHugePages of smaps_rollup, in bytes (0 if unknown).
uint64_t anon_huge_bytes(pid_t pid);

}  // namespace lazycr::restore
