// The pages a restored process is still owed by the page server: an interval set of page
// ranges, each carrying the address its bytes come from in the page store (its SOURCE) and a
// small tag (the page server stores the kind of the store run: DATA or ZERO).
//
// A range [start, end) with source src owes page p (start <= p < end) the store's page at
// src + (p - start). After an mremap the range lives at a new address but keeps its source.
//
// Ranges never overlap. They are never merged: each range the page server inserts lies inside
// one store run and one mapped area, and splits and moves keep that true, so a window clipped
// to one range is one source run of one kind (DATA or ZERO) and usually one VMA.
//
// Cost: find/next are one O(log n) map search; erase and move are O(log n + k) for k ranges
// touched. Nothing here scans the whole set, except copying it (FORK) and ranges().
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

namespace lazycr::uffd {

inline constexpr uint64_t kOwedPage = 4096;

struct OwedRange {
  uint64_t start = 0;  // page aligned
  uint64_t end = 0;    // page aligned, > start
  uint64_t src = 0;    // source address of `start` in the page store
  uint32_t tag = 0;    // opaque to the set

  uint64_t pages() const { return (end - start) / kOwedPage; }
  uint64_t src_of(uint64_t addr) const { return src + (addr - start); }
  bool operator==(const OwedRange&) const = default;
};

class OwedSet {
 public:
  // Adds [start, end) with source `src`. Throws Error if it is empty, not page aligned, wraps,
  // or overlaps a range already owed.
  void insert(uint64_t start, uint64_t end, uint64_t src, uint32_t tag = 0);

  // The range holding addr (any byte of a page), or nullopt.
  std::optional<OwedRange> find(uint64_t addr) const;
  // The first range that ends above addr (the one holding addr, else the next one up), or
  // nullopt when none does.
  std::optional<OwedRange> next(uint64_t addr) const;
  // The lowest range, or nullopt when nothing is owed.
  std::optional<OwedRange> first() const;
  // What is still owed of [start, start + len) as it was when it was owed from `src` on with
  // tag `tag`: the pieces (clipped to it, in address order) whose source is still
  // src + (addr - start) and whose tag is still `tag`. Pages filled meanwhile are gone from
  // the set, and pages moved there by an mremap have other sources: neither is returned.
  std::vector<OwedRange> still_owed(uint64_t start, uint64_t len, uint64_t src, uint32_t tag) const;

  // Drops [start, end) (rounded out to pages), splitting ranges cut by its edges. Returns the
  // pages dropped.
  uint64_t erase(uint64_t start, uint64_t end);
  // mremap: the owed pages in [from, from + len) now live at [to, to + len), keeping their
  // sources; whatever was owed in [to, to + len) before is dropped first (the destination of
  // an mremap was unmapped). The ranges may overlap. Returns the pages moved.
  uint64_t move(uint64_t from, uint64_t to, uint64_t len);

  uint64_t pages() const { return pages_; }
  size_t size() const { return ranges_.size(); }
  bool empty() const { return ranges_.empty(); }
  void clear() {
    ranges_.clear();
    pages_ = 0;
  }
  // Every range in address order (tests, stats; O(n)).
  std::vector<OwedRange> ranges() const;

 private:
  struct Value {
    uint64_t end;
    uint64_t src;
    uint32_t tag;
  };
  using Map = std::map<uint64_t, Value>;
  // Splits the range holding addr (if any, and addr is inside it, not at its start) in two.
  void split_at(uint64_t addr);
  Map ranges_;  // start -> (end, src, tag)
  uint64_t pages_ = 0;
};

}  // namespace lazycr::uffd
