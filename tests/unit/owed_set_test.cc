// The page server's owed set (uffd/owed_set.h): fixed cases, then randomized sequences of
// insert / erase / move / copy checked against a simple model (a map of page -> source, tag).
#include "uffd/owed_set.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <utility>

#include "common/error.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t P = kOwedPage;

// A prefetch chunk read ahead from [100, 220) (source 1000..) while faults filled pages of it
// and an mremap put other pages in its middle: what it may still fill is what is owed from
// its own source, every piece of it, not only up to the first hole.
TEST(OwedSet, StillOwedAfterFillsAndAMove) {
  OwedSet s;
  s.insert(100 * P, 200 * P, 1000 * P, 0);
  s.insert(200 * P, 210 * P, 5000 * P, 1);  // another tag (ZERO)
  s.insert(300 * P, 305 * P, 9000 * P, 0);
  s.erase(100 * P, 101 * P);        // a fault took the chunk's first page
  s.erase(150 * P, 152 * P);        // and two in its middle
  s.move(300 * P, 160 * P, 5 * P);  // other pages moved into it
  const std::vector<OwedRange> want = {{101 * P, 150 * P, 1001 * P, 0},
                                       {152 * P, 160 * P, 1052 * P, 0},
                                       {165 * P, 200 * P, 1065 * P, 0}};
  EXPECT_EQ(s.still_owed(100 * P, 120 * P, 1000 * P, 0), want);
  // Clipped to the chunk: one that starts and ends inside ranges.
  EXPECT_EQ(
      s.still_owed(120 * P, 35 * P, 1020 * P, 0),
      (std::vector<OwedRange>{{120 * P, 150 * P, 1020 * P, 0}, {152 * P, 155 * P, 1052 * P, 0}}));
  EXPECT_TRUE(s.still_owed(100 * P, 120 * P, 2000 * P, 0).empty());  // another source
  EXPECT_TRUE(s.still_owed(400 * P, 10 * P, 1300 * P, 0).empty());   // nothing owed there
}

TEST(OwedSet, InsertFindNext) {
  OwedSet s;
  EXPECT_TRUE(s.empty());
  EXPECT_FALSE(s.first());
  s.insert(10 * P, 20 * P, 100 * P, 1);
  s.insert(30 * P, 31 * P, 5 * P, 2);
  EXPECT_EQ(s.pages(), 11u);
  EXPECT_EQ(s.size(), 2u);
  EXPECT_FALSE(s.find(9 * P + 4095));
  auto r = s.find(10 * P);
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, (OwedRange{10 * P, 20 * P, 100 * P, 1}));
  EXPECT_EQ(s.find(20 * P - 1)->start, 10 * P);
  EXPECT_EQ(r->src_of(15 * P), 105 * P);
  EXPECT_FALSE(s.find(20 * P));
  EXPECT_EQ(s.next(0)->start, 10 * P);
  EXPECT_EQ(s.next(15 * P)->start, 10 * P);
  EXPECT_EQ(s.next(20 * P)->start, 30 * P);
  EXPECT_FALSE(s.next(31 * P));
  EXPECT_EQ(s.first()->start, 10 * P);
}

TEST(OwedSet, InsertRefusesOverlapMisalignmentAndEmpty) {
  OwedSet s;
  s.insert(10 * P, 20 * P, 0);
  EXPECT_THROW(s.insert(19 * P, 21 * P, 0), Error);
  EXPECT_THROW(s.insert(5 * P, 11 * P, 0), Error);
  EXPECT_THROW(s.insert(12 * P, 13 * P, 0), Error);
  EXPECT_THROW(s.insert(30 * P + 1, 31 * P, 0), Error);
  EXPECT_THROW(s.insert(30 * P, 30 * P, 0), Error);
  EXPECT_THROW(s.insert(31 * P, 30 * P, 0), Error);
  s.insert(20 * P, 21 * P, 0);  // touching is fine (not merged)
  s.insert(9 * P, 10 * P, 0);
  EXPECT_EQ(s.size(), 3u);
  EXPECT_EQ(s.pages(), 12u);
}

TEST(OwedSet, ErasePartialRangesKeepsSources) {
  OwedSet s;
  s.insert(10 * P, 20 * P, 100 * P, 7);
  EXPECT_EQ(s.erase(12 * P, 14 * P), 2u);  // middle: split in two
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(*s.find(10 * P), (OwedRange{10 * P, 12 * P, 100 * P, 7}));
  EXPECT_EQ(*s.find(14 * P), (OwedRange{14 * P, 20 * P, 104 * P, 7}));
  EXPECT_EQ(s.erase(11 * P + 5, 15 * P - 3), 2u);  // rounded out: pages 11 and 14
  EXPECT_EQ(*s.find(10 * P), (OwedRange{10 * P, 11 * P, 100 * P, 7}));
  EXPECT_EQ(*s.find(15 * P), (OwedRange{15 * P, 20 * P, 105 * P, 7}));
  EXPECT_EQ(s.erase(0, 10 * P), 0u);
  EXPECT_EQ(s.erase(0, ~uint64_t{0}), 6u);
  EXPECT_TRUE(s.empty());
  EXPECT_EQ(s.pages(), 0u);
}

TEST(OwedSet, MoveKeepsSourcesAndDropsDestination) {
  OwedSet s;
  s.insert(10 * P, 20 * P, 100 * P, 1);
  s.insert(50 * P, 55 * P, 500 * P, 2);           // in the destination: dropped
  s.insert(58 * P, 70 * P, 700 * P, 3);           // partly in it
  EXPECT_EQ(s.move(12 * P, 50 * P, 10 * P), 8u);  // [12,20) moves; [20,22) owed nothing
  auto all = s.ranges();
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0], (OwedRange{10 * P, 12 * P, 100 * P, 1}));
  EXPECT_EQ(all[1], (OwedRange{50 * P, 58 * P, 102 * P, 1}));
  EXPECT_EQ(all[2], (OwedRange{60 * P, 70 * P, 702 * P, 3}));
  EXPECT_EQ(s.pages(), 20u);
}

TEST(OwedSet, MoveOverlappingItself) {
  OwedSet s;
  s.insert(10 * P, 20 * P, 100 * P, 1);
  EXPECT_EQ(s.move(10 * P, 14 * P, 10 * P), 10u);
  EXPECT_EQ(s.ranges(), (std::vector<OwedRange>{{14 * P, 24 * P, 100 * P, 1}}));
  EXPECT_EQ(s.move(14 * P, 12 * P, 10 * P), 10u);
  EXPECT_EQ(s.ranges(), (std::vector<OwedRange>{{12 * P, 22 * P, 100 * P, 1}}));
}

TEST(OwedSet, RemapThenUnmapOfTheOldRangeKeepsTheMovedPages) {
  // The kernel reports mremap as REMAP(from, to, len) then UNMAP(from, from + len).
  OwedSet s;
  s.insert(10 * P, 20 * P, 100 * P, 0);
  s.move(10 * P, 40 * P, 10 * P);
  EXPECT_EQ(s.erase(10 * P, 20 * P), 0u);
  EXPECT_EQ(s.pages(), 10u);
  EXPECT_EQ(s.find(45 * P)->src_of(45 * P), 105 * P);
}

TEST(OwedSet, CopyIsIndependent) {
  OwedSet parent;
  parent.insert(10 * P, 20 * P, 100 * P, 0);
  OwedSet child = parent;
  parent.erase(10 * P, 15 * P);
  child.move(10 * P, 30 * P, 2 * P);
  EXPECT_EQ(parent.pages(), 5u);
  EXPECT_EQ(child.pages(), 10u);
  EXPECT_EQ(child.find(31 * P)->src_of(31 * P), 101 * P);
  EXPECT_EQ(child.find(12 * P)->src_of(12 * P), 102 * P);
}

TEST(OwedSet, MisalignedOrWrappingMoveThrows) {
  OwedSet s;
  EXPECT_THROW(s.move(1, 2 * P, P), Error);
  EXPECT_THROW(s.move(~uint64_t{0} & ~(P - 1), 0, 2 * P), Error);
}

// ---- randomized against a model ----------------------------------------------------------

struct Model {
  std::map<uint64_t, std::pair<uint64_t, uint32_t>> pages;  // page -> (source, tag)

  void insert(uint64_t s, uint64_t e, uint64_t src, uint32_t tag) {
    for (uint64_t p = s; p < e; p += P) pages[p] = {src + (p - s), tag};
  }
  bool overlaps(uint64_t s, uint64_t e) const {
    auto it = pages.lower_bound(s);
    return it != pages.end() && it->first < e;
  }
  uint64_t erase(uint64_t s, uint64_t e) {
    uint64_t n = 0;
    for (auto it = pages.lower_bound(s); it != pages.end() && it->first < e;) {
      it = pages.erase(it);
      ++n;
    }
    return n;
  }
  uint64_t move(uint64_t from, uint64_t to, uint64_t len) {
    if (from == to) return 0;
    std::map<uint64_t, std::pair<uint64_t, uint32_t>> moving;
    for (auto it = pages.lower_bound(from); it != pages.end() && it->first < from + len;) {
      moving[it->first - from + to] = it->second;
      it = pages.erase(it);
    }
    erase(to, to + len);
    for (auto& kv : moving) pages[kv.first] = kv.second;
    return moving.size();
  }
};

// The set equals the model page by page, ranges do not overlap, and pages() is right.
void expect_same(const OwedSet& s, const Model& m, uint64_t space) {
  ASSERT_EQ(s.pages(), m.pages.size());
  uint64_t prev_end = 0;
  uint64_t total = 0;
  for (const OwedRange& r : s.ranges()) {
    ASSERT_LT(r.start, r.end);
    ASSERT_GE(r.start, prev_end);
    prev_end = r.end;
    total += r.pages();
  }
  ASSERT_EQ(total, m.pages.size());
  for (uint64_t p = 0; p < space; p += P) {
    auto r = s.find(p + (p / P) % P);  // any byte of the page
    auto it = m.pages.find(p);
    if (it == m.pages.end()) {
      ASSERT_FALSE(r) << "page " << p / P << " owed but the model says not";
      continue;
    }
    ASSERT_TRUE(r) << "page " << p / P << " not owed";
    ASSERT_EQ(r->src_of(p), it->second.first) << "page " << p / P;
    ASSERT_EQ(r->tag, it->second.second) << "page " << p / P;
    // next() from inside a range is that range.
    ASSERT_EQ(s.next(p)->start, r->start);
  }
}

class OwedSetRandom : public ::testing::TestWithParam<uint32_t> {};

TEST_P(OwedSetRandom, MatchesModel) {
  constexpr uint64_t kSpacePages = 256;
  constexpr uint64_t kSpace = kSpacePages * P;
  std::mt19937 rng(GetParam());
  auto page = [&](uint64_t hi) { return std::uniform_int_distribution<uint64_t>(0, hi)(rng); };
  OwedSet s;
  Model m;
  std::vector<std::pair<OwedSet, Model>> forks;
  for (int step = 0; step < 600; ++step) {
    const int op = static_cast<int>(page(9));
    if (op <= 2) {  // insert where free (random source far away, random tag)
      uint64_t a = page(kSpacePages - 1) * P, len = (1 + page(15)) * P;
      uint64_t e = std::min(a + len, kSpace);
      uint64_t src = (1000 + page(100000)) * P;
      uint32_t tag = static_cast<uint32_t>(page(3));
      if (m.overlaps(a, e)) {
        EXPECT_THROW(s.insert(a, e, src, tag), Error);
      } else {
        s.insert(a, e, src, tag);
        m.insert(a, e, src, tag);
      }
    } else if (op <= 5) {  // erase, often partial, unaligned edges rounded out
      uint64_t a = page(kSpace - 1), e = std::min(a + page(40 * P), kSpace);
      uint64_t ra = a & ~(P - 1), re = (e + P - 1) & ~(P - 1);
      EXPECT_EQ(s.erase(a, e), m.erase(ra, re));
    } else if (op <= 8) {  // move, possibly over owed pages and overlapping itself
      uint64_t len = (1 + page(40)) * P;
      uint64_t from = page(kSpacePages - len / P) * P, to = page(kSpacePages - len / P) * P;
      EXPECT_EQ(s.move(from, to, len), m.move(from, to, len));
    } else {  // fork: the copy evolves on its own from now on
      forks.emplace_back(s, m);
    }
    expect_same(s, m, kSpace);
    if (HasFatalFailure()) return;
  }
  // Each copy still equals the model at the moment it was taken, and still works.
  for (auto& [fs, fm] : forks) {
    expect_same(fs, fm, kSpace);
    EXPECT_EQ(fs.move(0, 128 * P, 64 * P), fm.move(0, 128 * P, 64 * P));
    EXPECT_EQ(fs.erase(32 * P, 200 * P), fm.erase(32 * P, 200 * P));
    expect_same(fs, fm, kSpace);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, OwedSetRandom, ::testing::Range(1u, 41u));

}  // namespace
}  // namespace lazycr::uffd
