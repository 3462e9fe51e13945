#include "uffd/owed_areas.h"

#include <algorithm>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::uffd {

OwedSet owed_in_areas(pid_t pid, const image::PageStoreReader& store,
                      const std::vector<LazyArea>& areas) {
  constexpr uint64_t kPage = 4096;
  std::vector<LazyArea> sorted = areas;
  std::sort(sorted.begin(), sorted.end(),
            [](const LazyArea& a, const LazyArea& b) { return a.start < b.start; });
  for (size_t i = 0; i < sorted.size(); ++i) {
    const LazyArea& a = sorted[i];
    if ((a.start | a.end) % kPage || a.end <= a.start)
      fail("page server: pid ", pid, ": lazy area ", hex(a.start), "-", hex(a.end),
           " is empty or not page aligned");
    if (i > 0 && a.start < sorted[i - 1].end)
      fail("page server: pid ", pid, ": lazy areas ", hex(sorted[i - 1].start), "-",
           hex(sorted[i - 1].end), " and ", hex(a.start), "-", hex(a.end), " overlap");
  }
  // REF and PARENT pages (in another store) are served like DATA: the store's read() resolves
  // them.
  OwedSet owed;
  size_t ai = 0;
  for (const image::PageRun& run : store.index().runs()) {
    uint32_t tag = kTagData;
    switch (run.kind()) {
      case image::PageRun::DATA:
      case image::PageRun::REF:
      case image::PageRun::PARENT:
        break;
      case image::PageRun::ZERO:
        tag = kTagZero;
        break;
      default:
        fail("page server: pid ", pid, ": page store ", store.path(), " has a run of kind ",
             static_cast<int>(run.kind()), " at ", hex(run.start()), " that it cannot serve");
    }
    const uint64_t rs = run.start(), re = run.start() + run.pages() * kPage;
    while (ai < sorted.size() && sorted[ai].end <= rs) ++ai;
    for (size_t k = ai; k < sorted.size() && sorted[k].start < re; ++k) {
      const uint64_t s = std::max(rs, sorted[k].start), e = std::min(re, sorted[k].end);
      if (s < e) owed.insert(s, e, s, tag);
    }
  }
  return owed;
}

}  // namespace lazycr::uffd
