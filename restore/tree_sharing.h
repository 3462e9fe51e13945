// Internal to restore/: which pages of a lazily restored tree come back shared copy-on-write.
//
// A page that a fork left shared at dump time is stored once, by the first process of the
// inventory that has it; the others record a REF run to it (image-format/FORMAT.md). Private
// anonymous memory can only be shared again by fork, so a lazy restore of a tree forks each
// child once its parent has, in place, the pages the child shares with it (restore.cc):
// - the child keeps the parent's area (restore/process_steps.h inheritable_areas()), and
//   its page at X is "inherited" when the image says it is the same page as the parent's at
//   X (both resolve to the same stored page: same pid and address once REF runs are
//   followed) and the parent holds that page at the fork: inherited itself the same way, or
//   filled before its children are forked ("filled for children"); pages that siblings share
//   but the parent rewrote after its forks are written in the parent with the siblings'
//   content before the forks, and owed to the parent (its own content) afterwards;
// - userfaultfd cannot put a page into two processes: a UFFDIO_COPY into the parent after the
//   fork would not reach the child. So the pages filled for children are written eagerly
//   (before the first instruction, like an eager restore's) and the areas are registered with
//   userfaultfd only once every process exists (a fork of a registered area would be a FORK
//   event nobody reads yet);
// - every other page of a lazy area is owed by the page server as before (the inherited
//   copy of the parent's content there is dropped before registering).
// Only lazy candidates (restore/eager_preread.h) are computed here; other areas follow the
// eager filler's own rule for inherited areas (restore/memory.h).
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "image-format/image_dir.h"

namespace lazycr::restore {

struct PageRange {
  uint64_t start = 0, end = 0;  // page aligned, start < end
};

// Pages a parent writes before its forks with a child's content, not its own (see
// foreign_for_children()).
struct ForeignFill {
  PageRange range;
  int source = 0;  // the child whose store holds them
};

class TreeSharing {
 public:
  // Processes of `img` (parents first); zombies have neither.
  explicit TreeSharing(const image::ImageReader& img);

  // Pages of process `pid` inside [start, end) that it holds from its parent at its fork,
  // sorted and disjoint.
  std::vector<PageRange> inherited(int pid, uint64_t start, uint64_t end) const;
  // Pages of process `pid` inside [start, end) that its children share with it and that it
  // did not inherit: written before its children are forked.
  std::vector<PageRange> filled_for_children(int pid, uint64_t start, uint64_t end) const;

  // Pages of process `pid` inside [start, end) that two or more of its children share while
  // it has its own there (it wrote them after its forks): written with the first such child's
  // content before its children are forked, then owed to `pid` itself like any other page.
  std::vector<ForeignFill> foreign_for_children(int pid, uint64_t start, uint64_t end) const;
  const image::PageStoreReader& store(int pid) const { return img_.pages(pid); }

  // Pages, over the tree, inherited by children (for the log and tests).
  uint64_t inherited_pages() const;

 private:
  const image::ImageReader& img_;
  std::map<int, std::vector<PageRange>> inherited_, fill_;
  std::map<int, std::vector<ForeignFill>> foreign_;
};

// The ranges inside [start, end) in which `child` (process `child_pid`) resolves to the same
// stored page as `parent` (`parent_pid`, or a sibling) at the same address (REF runs
// followed). Exposed for unit tests.
std::vector<PageRange> same_pages(const image::PageStoreReader& child, int child_pid,
                                  const image::PageStoreReader& parent, int parent_pid,
                                  uint64_t start, uint64_t end);

// `ranges` without the pages of `minus` (both sorted and disjoint); sorted and disjoint.
std::vector<PageRange> subtract(const std::vector<PageRange>& ranges,
                                const std::vector<PageRange>& minus);
// Whether `addr` lies in one of `ranges` (sorted and disjoint).
bool contains(const std::vector<PageRange>& ranges, uint64_t addr);
// `a` and `b` together, sorted, neighbours merged.
std::vector<PageRange> unite(std::vector<PageRange> a, const std::vector<PageRange>& b);

}  // namespace lazycr::restore
