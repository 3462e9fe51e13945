// Which pages of a lazily restored tree come back shared: restore/tree_sharing.h.
#include "restore/tree_sharing.h"

#include <algorithm>
#include <set>

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

std::vector<PageRange> intersect(const std::vector<PageRange>& a, const std::vector<PageRange>& b) {
  return subtract(a, subtract(a, b));
}

TreeSharing::TreeSharing(const image::ImageReader& img) : img_(img) {
  const auto& procs = img.processes();
  std::map<int, const image::Process*> by_pid;
  for (const auto& p : procs) by_pid[p.pid()] = &p;
  std::map<int, std::vector<const image::Process*>> children;
  std::map<int, std::set<uint64_t>> kept;  // by child: the areas it keeps from its parent
  for (const auto& c : procs) {
    auto pit = by_pid.find(c.ppid());
    if (c.zombie() || pit == by_pid.end() || pit->second->zombie()) continue;
    if (!img.has_pages(c.pid()) || !img.has_pages(c.ppid())) continue;
    children[c.ppid()].push_back(&c);
    kept[c.pid()] = inheritable_areas(*pit->second, c);
  }
  // The kept lazy areas of child `c` (that `other`, a sibling, keeps too when given).
  auto areas_of = [&](const image::Process& c, const image::Process* other) {
    std::vector<PageRange> out;
    for (const MemoryArea& a : c.areas())
      if (kept[c.pid()].count(a.start()) && lazy_candidate(a) &&
          (other == nullptr || kept[other->pid()].count(a.start())))
        out.push_back({a.start(), a.end()});
    return out;
  };
  // Parents come first: a parent's inherited pages are known when its children are looked at.
  for (const auto& p : procs) {
    auto cit = children.find(p.pid());
    if (cit == children.end()) continue;
    const auto& cs = cit->second;
    const auto& pstore = img.pages(p.pid());
    const std::vector<PageRange> p_inherited = inherited(p.pid(), 0, ~uint64_t{0});
    // Pages children share with the parent's own: the parent holds them at the forks.
    std::vector<PageRange> own;
    for (const image::Process* c : cs) {
      std::vector<PageRange> shared;
      for (const PageRange& a : areas_of(*c, nullptr))
        for (const PageRange& r :
             same_pages(img.pages(c->pid()), c->pid(), pstore, p.pid(), a.start, a.end))
          add(shared, r.start, r.end);
      inherited_[c->pid()] = unite(std::move(inherited_[c->pid()]), shared);
      own = unite(std::move(own), shared);
    }
    fill_[p.pid()] = subtract(own, p_inherited);
    // Pages siblings share that the parent no longer has (it wrote its own after the forks):
    // the parent holds the first sibling's at the forks, and owes its own to the server.
    std::vector<PageRange> taken = unite(own, p_inherited);
    for (size_t i = 0; i < cs.size(); i++) {
      std::vector<PageRange> assigned;
      for (size_t j = i + 1; j < cs.size(); j++) {
        std::vector<PageRange> equal;
        for (const PageRange& a : areas_of(*cs[i], cs[j]))
          for (const PageRange& r :
               same_pages(img.pages(cs[i]->pid()), cs[i]->pid(), img.pages(cs[j]->pid()),
                          cs[j]->pid(), a.start, a.end))
            add(equal, r.start, r.end);
        equal = subtract(equal, unite(own, p_inherited));
        const std::vector<PageRange> fresh = subtract(equal, taken);
        assigned = unite(std::move(assigned), fresh);
        taken = unite(std::move(taken), fresh);
        const std::vector<PageRange> both = intersect(equal, assigned);
        inherited_[cs[j]->pid()] = unite(std::move(inherited_[cs[j]->pid()]), both);
        inherited_[cs[i]->pid()] = unite(std::move(inherited_[cs[i]->pid()]), both);
      }
      for (const PageRange& r : assigned) foreign_[p.pid()].push_back({r, cs[i]->pid()});
    }
  }
}

std::vector<PageRange> TreeSharing::inherited(int pid, uint64_t start, uint64_t end) const {
  auto it = inherited_.find(pid);
  return it == inherited_.end() ? std::vector<PageRange>{} : clip(it->second, start, end);
}

std::vector<ForeignFill> TreeSharing::foreign_for_children(int pid, uint64_t start,
                                                           uint64_t end) const {
  std::vector<ForeignFill> out;
  auto it = foreign_.find(pid);
  if (it == foreign_.end()) return out;
  for (const ForeignFill& f : it->second)
    for (const PageRange& r : clip({f.range}, start, end)) out.push_back({r, f.source});
  return out;
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
