// Which pages of a lazily restored tree come back shared: restore/tree_sharing.h.
#include "restore/tree_sharing.h"

#include <algorithm>

#include "restore/eager_preread.h"
#include "restore/process_steps.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;
using image::PageRun;

// A stretch of pages that resolve to consecutive stored pages of process `pid`, the page at
// address a being `pid`'s page at a + delta.
struct Identity {
  uint64_t start, end;
  int pid;
  int64_t delta;
};

std::vector<Identity> identities(const image::PageStoreReader& store, int pid, uint64_t start,
                                 uint64_t end) {
  const auto& runs = store.index().runs();
  auto it = std::upper_bound(runs.begin(), runs.end(), start,
                             [](uint64_t a, const PageRun& r) { return a < r.start(); });
  if (it != runs.begin()) --it;
  std::vector<Identity> out;
  for (; it != runs.end() && it->start() < end; ++it) {
    const uint64_t s = std::max<uint64_t>(it->start(), start);
    const uint64_t e = std::min<uint64_t>(it->start() + it->pages() * kPageSize, end);
    if (s >= e) continue;
    switch (it->kind()) {
      case PageRun::DATA:
      case PageRun::ZERO:
        out.push_back({s, e, pid, 0});
        break;
      case PageRun::REF:
        out.push_back({s, e, it->ref_pid(),
                       static_cast<int64_t>(it->ref_addr()) - static_cast<int64_t>(it->start())});
        break;
      default:  // PARENT (incremental images): content, not identity; never shared
        break;
    }
  }
  return out;
}

void add(std::vector<PageRange>& v, uint64_t s, uint64_t e) {
  if (!v.empty() && v.back().end == s)
    v.back().end = e;
  else
    v.push_back({s, e});
}

std::vector<PageRange> clip(const std::vector<PageRange>& v, uint64_t start, uint64_t end) {
  std::vector<PageRange> out;
  auto it = std::upper_bound(v.begin(), v.end(), start,
                             [](uint64_t a, const PageRange& r) { return a < r.end; });
  for (; it != v.end() && it->start < end; ++it)
    out.push_back({std::max(it->start, start), std::min(it->end, end)});
  return out;
}

uint64_t pages_in(const std::vector<PageRange>& v) {
  uint64_t n = 0;
  for (const auto& r : v) n += (r.end - r.start) / kPageSize;
  return n;
}

}  // namespace

std::vector<PageRange> same_pages(const image::PageStoreReader& child, int child_pid,
                                  const image::PageStoreReader& parent, int parent_pid,
                                  uint64_t start, uint64_t end) {
  const std::vector<Identity> c = identities(child, child_pid, start, end);
  const std::vector<Identity> p = identities(parent, parent_pid, start, end);
  std::vector<PageRange> out;
  size_t j = 0;
  for (const Identity& a : c) {
    if (a.pid == child_pid) continue;  // the child's own page: never the parent's
    while (j < p.size() && p[j].end <= a.start) j++;
    for (size_t k = j; k < p.size() && p[k].start < a.end; k++) {
      const Identity& b = p[k];
      if (b.pid != a.pid || b.delta != a.delta) continue;
      add(out, std::max(a.start, b.start), std::min(a.end, b.end));
    }
  }
  return out;
}

std::vector<PageRange> subtract(const std::vector<PageRange>& ranges,
                                const std::vector<PageRange>& minus) {
  std::vector<PageRange> out;
  size_t j = 0;
  for (const PageRange& r : ranges) {
    uint64_t pos = r.start;
    while (j < minus.size() && minus[j].end <= pos) j++;
    for (size_t k = j; k < minus.size() && minus[k].start < r.end; k++) {
      if (minus[k].start > pos) out.push_back({pos, minus[k].start});
      pos = std::max(pos, minus[k].end);
    }
    if (pos < r.end) out.push_back({pos, r.end});
  }
  return out;
}

bool contains(const std::vector<PageRange>& ranges, uint64_t addr) {
  auto it = std::upper_bound(ranges.begin(), ranges.end(), addr,
                             [](uint64_t a, const PageRange& r) { return a < r.end; });
  return it != ranges.end() && it->start <= addr;
}

std::vector<PageRange> unite(std::vector<PageRange> a, const std::vector<PageRange>& b) {
  a.insert(a.end(), b.begin(), b.end());
  std::sort(a.begin(), a.end(),
            [](const PageRange& x, const PageRange& y) { return x.start < y.start; });
  std::vector<PageRange> out;
  for (const PageRange& r : a) {
    if (!out.empty() && r.start <= out.back().end)
      out.back().end = std::max(out.back().end, r.end);
    else
      out.push_back(r);
  }
  return out;
}

TreeSharing::TreeSharing(const image::ImageReader& img) {
  const auto& procs = img.processes();
  std::map<int, const image::Process*> by_pid;
  for (const auto& p : procs) by_pid[p.pid()] = &p;
  // Parents come first: a parent's inherited pages are known when its children are looked at.
  for (const auto& c : procs) {
    auto pit = by_pid.find(c.ppid());
    if (c.zombie() || pit == by_pid.end() || pit->second->zombie()) continue;
    if (!img.has_pages(c.pid()) || !img.has_pages(c.ppid())) continue;
    const image::Process& p = *pit->second;
    const std::set<uint64_t> kept = inheritable_areas(p, c);
    const auto& cstore = img.pages(c.pid());
    const auto& pstore = img.pages(p.pid());
    std::vector<PageRange> shared;
    for (const MemoryArea& a : c.areas()) {
      if (kept.count(a.start()) == 0 || !lazy_candidate(a)) continue;
      for (const PageRange& r : same_pages(cstore, c.pid(), pstore, p.pid(), a.start(), a.end()))
        add(shared, r.start, r.end);
    }
    if (shared.empty()) continue;
    inherited_[c.pid()] = shared;
    fill_[p.pid()] = unite(std::move(fill_[p.pid()]), shared);
  }
  for (auto& [pid, v] : fill_) {
    auto it = inherited_.find(pid);
    if (it != inherited_.end()) v = subtract(v, it->second);
  }
}

std::vector<PageRange> TreeSharing::inherited(int pid, uint64_t start, uint64_t end) const {
  auto it = inherited_.find(pid);
  return it == inherited_.end() ? std::vector<PageRange>{} : clip(it->second, start, end);
}

std::vector<PageRange> TreeSharing::filled_for_children(int pid, uint64_t start,
                                                        uint64_t end) const {
  auto it = fill_.find(pid);
  return it == fill_.end() ? std::vector<PageRange>{} : clip(it->second, start, end);
}

uint64_t TreeSharing::inherited_pages() const {
  uint64_t n = 0;
  for (const auto& [pid, v] : inherited_) n += pages_in(v);
  return n;
}

}  // namespace lazycr::restore
