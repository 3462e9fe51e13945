// restore/tree_sharing.h: which pages of a child are the same stored page as its parent's.
#include "restore/tree_sharing.h"

#include <gtest/gtest.h>

#include <vector>

#include "tests/unit/page_fixtures.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::PageStoreOptions;
using image::PageStoreReader;
using image::PageStoreWriter;

constexpr uint64_t kA = 0x10000000;
constexpr uint64_t P = kPageSize;

std::vector<std::pair<uint64_t, uint64_t>> pairs(const std::vector<PageRange>& v) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const auto& r : v) out.push_back({r.start, r.end});
  return out;
}

struct Stores {
  test::TempDir dir;
  std::unique_ptr<PageStoreReader> parent, child;

  template <typename FP, typename FC>
  Stores(FP fill_parent, FC fill_child) {
    PageStoreWriter p(dir.file("p.lzp"), PageStoreOptions{});
    fill_parent(p);
    p.finish();
    PageStoreWriter c(dir.file("c.lzp"), PageStoreOptions{});
    fill_child(c);
    c.finish();
    parent = PageStoreReader::open(dir.file("p.lzp"));
    child = PageStoreReader::open(dir.file("c.lzp"));
  }
};

std::vector<unsigned char> pages(size_t n, unsigned char v) {
  return std::vector<unsigned char>(n * P, v);
}

TEST(TreeSharing, ChildRefsToTheParentAtTheSameAddressAreShared) {
  Stores s(
      [](PageStoreWriter& w) {
        auto d = pages(8, 1);
        w.add_pages(kA, d.data(), 8);
      },
      [](PageStoreWriter& w) {
        auto own = pages(2, 2);
        w.add_pages(kA, own.data(), 2);                   // its own: not shared
        w.add_ref_pages(kA + 2 * P, 3, 100, kA + 2 * P);  // the parent's, same address
        w.add_ref_pages(kA + 5 * P, 2, 100, kA + 6 * P);  // the parent's, elsewhere: not here
        w.add_ref_pages(kA + 7 * P, 1, 300, kA + 7 * P);  // another process's
      });
  auto got = same_pages(*s.child, 101, *s.parent, 100, kA, kA + 8 * P);
  EXPECT_EQ(pairs(got), (std::vector<std::pair<uint64_t, uint64_t>>{{kA + 2 * P, kA + 5 * P}}));
  // Clipped to the range asked.
  got = same_pages(*s.child, 101, *s.parent, 100, kA + 3 * P, kA + 4 * P);
  EXPECT_EQ(pairs(got), (std::vector<std::pair<uint64_t, uint64_t>>{{kA + 3 * P, kA + 4 * P}}));
}

TEST(TreeSharing, PagesBothReferToTheSameStoredPageAreShared) {
  // A grandchild and its parent both refer to the root's pages: shared where the same.
  Stores s(
      [](PageStoreWriter& w) {
        w.add_ref_pages(kA, 4, 100, kA);
        auto own = pages(4, 3);
        w.add_pages(kA + 4 * P, own.data(), 4);
      },
      [](PageStoreWriter& w) {
        w.add_ref_pages(kA, 2, 100, kA);
        w.add_ref_pages(kA + 2 * P, 2, 100, kA + 8 * P);
        w.add_ref_pages(kA + 4 * P, 4, 101, kA + 4 * P);
      });
  auto got = same_pages(*s.child, 102, *s.parent, 101, kA, kA + 8 * P);
  EXPECT_EQ(pairs(got), (std::vector<std::pair<uint64_t, uint64_t>>{{kA, kA + 2 * P},
                                                                    {kA + 4 * P, kA + 8 * P}}));
}

TEST(TreeSharing, SubtractAndUnite) {
  std::vector<PageRange> a{{0, 10 * P}, {20 * P, 30 * P}};
  std::vector<PageRange> b{{2 * P, 4 * P}, {9 * P, 21 * P}, {29 * P, 40 * P}};
  EXPECT_EQ(pairs(subtract(a, b)), (std::vector<std::pair<uint64_t, uint64_t>>{
                                       {0, 2 * P}, {4 * P, 9 * P}, {21 * P, 29 * P}}));
  EXPECT_EQ(pairs(unite(a, b)), (std::vector<std::pair<uint64_t, uint64_t>>{{0, 40 * P}}));
  EXPECT_EQ(pairs(unite({{0, P}}, {{P, 2 * P}, {5 * P, 6 * P}})),
            (std::vector<std::pair<uint64_t, uint64_t>>{{0, 2 * P}, {5 * P, 6 * P}}));
  EXPECT_TRUE(subtract({{0, P}}, {{0, P}}).empty());
}

}  // namespace
}  // namespace lazycr::restore
