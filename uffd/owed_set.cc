#include "uffd/owed_set.h"

#include <algorithm>
#include <iterator>
#include <vector>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t kMask = kOwedPage - 1;

uint64_t round_down(uint64_t a) {
  return a & ~kMask;
}
// Rounds up, saturating at the last page boundary below 2^64.
uint64_t round_up(uint64_t a) {
  return a > ~kMask ? ~kMask : (a + kMask) & ~kMask;
}

}  // namespace

void OwedSet::insert(uint64_t start, uint64_t end, uint64_t src, uint32_t tag) {
  if ((start | end | src) & kMask)
    fail("owed range ", hex(start), "-", hex(end), " source ", hex(src), " is not page aligned");
  if (end <= start) fail("owed range ", hex(start), "-", hex(end), " is empty or wraps");
  if (src + (end - start) < src) fail("owed range source ", hex(src), " wraps");
  auto it = ranges_.lower_bound(start);
  if (it != ranges_.end() && it->first < end)
    fail("owed range ", hex(start), "-", hex(end), " overlaps ", hex(it->first), "-",
         hex(it->second.end));
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > start)
      fail("owed range ", hex(start), "-", hex(end), " overlaps ", hex(prev->first), "-",
           hex(prev->second.end));
  }
  ranges_.emplace_hint(it, start, Value{end, src, tag});
  pages_ += (end - start) / kOwedPage;
}

std::optional<OwedRange> OwedSet::find(uint64_t addr) const {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return std::nullopt;
  --it;
  if (addr >= it->second.end) return std::nullopt;
  return OwedRange{it->first, it->second.end, it->second.src, it->second.tag};
}

std::optional<OwedRange> OwedSet::next(uint64_t addr) const {
  auto it = ranges_.upper_bound(addr);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (addr < prev->second.end) it = prev;
  }
  if (it == ranges_.end()) return std::nullopt;
  return OwedRange{it->first, it->second.end, it->second.src, it->second.tag};
}

std::vector<OwedRange> OwedSet::still_owed(uint64_t start, uint64_t len, uint64_t src,
                                           uint32_t tag) const {
  std::vector<OwedRange> out;
  const uint64_t end = start + len;
  for (auto r = next(start); r && r->start < end; r = next(r->end)) {
    const uint64_t s = std::max(start, r->start), e = std::min(end, r->end);
    if (r->tag == tag && r->src_of(s) == src + (s - start))
      out.push_back({s, e, r->src_of(s), tag});
  }
  return out;
}

std::optional<OwedRange> OwedSet::first() const {
  if (ranges_.empty()) return std::nullopt;
  auto it = ranges_.begin();
  return OwedRange{it->first, it->second.end, it->second.src, it->second.tag};
}

void OwedSet::split_at(uint64_t addr) {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return;
  --it;
  if (it->first == addr || addr >= it->second.end) return;
  Value right{it->second.end, it->second.src + (addr - it->first), it->second.tag};
  it->second.end = addr;
  ranges_.emplace_hint(std::next(it), addr, right);
}

uint64_t OwedSet::erase(uint64_t start, uint64_t end) {
  start = round_down(start);
  end = round_up(end);
  if (end <= start || ranges_.empty()) return 0;
  split_at(start);
  split_at(end);
  uint64_t dropped = 0;
  auto it = ranges_.lower_bound(start);
  while (it != ranges_.end() && it->first < end) {
    dropped += (it->second.end - it->first) / kOwedPage;
    it = ranges_.erase(it);
  }
  pages_ -= dropped;
  return dropped;
}

uint64_t OwedSet::move(uint64_t from, uint64_t to, uint64_t len) {
  if ((from | to | len) & kMask)
    fail("move of owed pages ", hex(from), " -> ", hex(to), " length ", hex(len),
         " is not page aligned");
  if (len == 0 || from == to) return 0;
  if (from + len < from || to + len < to)
    fail("move of owed pages ", hex(from), " -> ", hex(to), " length ", hex(len), " wraps");
  // Take the moving ranges out, clear the destination, put them back shifted.
  split_at(from);
  split_at(from + len);
  std::vector<OwedRange> moving;
  auto it = ranges_.lower_bound(from);
  while (it != ranges_.end() && it->first < from + len) {
    moving.push_back(OwedRange{it->first, it->second.end, it->second.src, it->second.tag});
    pages_ -= (it->second.end - it->first) / kOwedPage;
    it = ranges_.erase(it);
  }
  erase(to, to + len);
  uint64_t moved = 0;
  for (const OwedRange& r : moving) {
    const uint64_t s = r.start - from + to;
    insert(s, s + (r.end - r.start), r.src, r.tag);
    moved += r.pages();
  }
  return moved;
}

std::vector<OwedRange> OwedSet::ranges() const {
  std::vector<OwedRange> out;
  out.reserve(ranges_.size());
  for (const auto& [start, v] : ranges_) out.push_back(OwedRange{start, v.end, v.src, v.tag});
  return out;
}

}  // namespace lazycr::uffd
