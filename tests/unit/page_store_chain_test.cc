// Incremental page stores: a child stores only the pages whose content differs from its
// parent's (by digest, or by content where the parent has no digests), PARENT runs for the
// rest, and a reader resolves a chain of any length once, at link time.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <vector>

#include "common/error.h"
#include "image-format/page_store.h"

namespace lazycr::image {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kBase = 0x10000000;

// Page contents by page number; a missing page is not in the store, an empty vector is zero.
using Pages = std::map<uint64_t, std::vector<unsigned char>>;

std::vector<unsigned char> page_of(uint64_t n, uint32_t version) {
  std::vector<unsigned char> p(kPageSize);
  for (size_t i = 0; i < kPageSize; i += 8) {
    uint64_t v = (n * 1000003u + i) ^ (uint64_t{version} << 48) ^ 0x5555;
    std::memcpy(&p[i], &v, 8);
  }
  return p;
}

class ChainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lazycr-chain-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `pages` (contiguous page numbers are contiguous addresses) into store `name`.
  std::shared_ptr<PageStoreReader> write(const std::string& name, const Pages& pages,
                                         std::shared_ptr<const PageStoreReader> parent, bool hashes,
                                         PageStoreStats* stats = nullptr) {
    PageStoreOptions o;
    o.frame_size = 16 * 1024;
    o.threads = 1;
    o.early_writeback = false;
    o.page_hashes = hashes;
    o.parent = std::move(parent);
    const std::string path = (dir_ / name).string();
    {
      PageStoreWriter w(path, o);
      std::vector<unsigned char> zero(kPageSize, 0);
      for (const auto& [n, content] : pages)
        w.add_pages(kBase + n * kPageSize, content.empty() ? zero.data() : content.data(), 1);
      PageStoreStats s = w.finish();
      if (stats != nullptr) *stats = s;
    }
    return PageStoreReader::open(path);
  }

  void expect_reads(const PageStoreReader& st, const Pages& pages) {
    std::vector<unsigned char> got(kPageSize);
    for (const auto& [n, content] : pages) {
      st.read(kBase + n * kPageSize, 1, got.data());
      if (content.empty())
        EXPECT_EQ(got, std::vector<unsigned char>(kPageSize, 0)) << "page " << n;
      else
        EXPECT_EQ(got, content) << "page " << n;
    }
  }

  fs::path dir_;
};

TEST_F(ChainTest, ChildStoresOnlyChangedPagesAndReadsThroughTheChain) {
  for (bool parent_hashes : {true, false}) {
    SCOPED_TRACE(parent_hashes ? "parent with digests" : "parent without digests");
    Pages v1;
    for (uint64_t n = 0; n < 40; n++) v1[n] = page_of(n, 1);
    v1[20] = {};  // a zero page
    auto a = write("a", v1, nullptr, parent_hashes);
    EXPECT_EQ(a->parent_pages(), 0u);

    Pages v2 = v1;
    v2[3] = page_of(3, 2);
    v2[7] = page_of(7, 2);
    v2[9] = {};               // became zero
    v2[20] = page_of(20, 2);  // was zero
    v2[45] = page_of(45, 2);  // new
    PageStoreStats s2;
    auto b = write("b", v2, a, false, &s2);
    EXPECT_EQ(s2.data_pages, 4u) << "pages 3, 7, 20 and 45 changed";
    EXPECT_EQ(s2.zero_pages, 1u);
    EXPECT_EQ(s2.parent_pages, 36u);
    b->link_parent(a);
    expect_reads(*b, v2);

    Pages v3 = v2;
    v3[3] = page_of(3, 3);
    v3.erase(39);  // unmapped since
    PageStoreStats s3;
    auto c = write("c", v3, b, false, &s3);
    EXPECT_EQ(s3.data_pages, 1u);
    EXPECT_EQ(s3.parent_pages, v3.size() - 2) << "all but page 3 and zero page 9";
    c->link_parent(b);
    expect_reads(*c, v3);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
}

// The chain is resolved at link time: a page left to the grandparent is read from the
// grandparent's frames directly, the middle link decompresses nothing.
TEST_F(ChainTest, ReadsGoStraightToTheStoreHoldingThePage) {
  Pages v1;
  for (uint64_t n = 0; n < 64; n++) v1[n] = page_of(n, 1);
  auto a = write("a", v1, nullptr, true);
  Pages v2 = v1;
  v2[60] = page_of(60, 2);
  auto b = write("b", v2, a, true);
  b->link_parent(a);
  Pages v3 = v2;
  v3[61] = page_of(61, 3);
  auto c = write("c", v3, b, true);
  c->link_parent(b);
  std::vector<unsigned char> got(kPageSize * 64);
  c->read(kBase, 64, got.data());
  for (uint64_t n = 0; n < 64; n++)
    ASSERT_EQ(0, std::memcmp(got.data() + n * kPageSize, v3[n].data(), kPageSize)) << n;
  EXPECT_EQ(b->frames_decompressed(), 1u) << "only b's own frame (page 60)";
  // Digests: a link records those of the pages it stores; a PARENT page's is the holder's.
  EXPECT_EQ(c->index().page_hashes().size(), 1 * kPageHashBytes);
  ASSERT_NE(c->page_hash(kBase), nullptr);
  EXPECT_EQ(c->page_hash(kBase), a->page_hash(kBase));
  EXPECT_EQ(c->page_hash(kBase + 60 * kPageSize), b->page_hash(kBase + 60 * kPageSize));
  EXPECT_NE(0, std::memcmp(c->page_hash(kBase + 61 * kPageSize),
                           a->page_hash(kBase + 61 * kPageSize), kPageHashBytes));
  EXPECT_GE(a->frames_decompressed(), 1u);
  EXPECT_EQ(c->frames_decompressed(), 1u);
}

TEST_F(ChainTest, UnlinkedOrMismatchedParentIsRefused) {
  Pages v1;
  for (uint64_t n = 0; n < 8; n++) v1[n] = page_of(n, 1);
  auto a = write("a", v1, nullptr, true);
  Pages v2 = v1;
  v2[2] = page_of(2, 2);
  auto b = write("b", v2, a, true);
  std::vector<unsigned char> got(kPageSize);
  EXPECT_FALSE(b->parent_linked());
  EXPECT_THROW(b->read(kBase, 1, got.data()), Error) << "PARENT page without a linked parent";
  // A parent that does not hold the pages the child left to it.
  Pages other;
  other[0] = page_of(0, 1);
  auto small = write("small", other, nullptr, true);
  try {
    b->link_parent(small);
    FAIL() << "linked to a parent without pages 1-7";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is not in the parent's"), std::string::npos) << e.what();
  }
  EXPECT_THROW(b->link_parent(nullptr), Error);
}

TEST_F(ChainTest, DigestsAreCheckedAtOpen) {
  Pages v1;
  for (uint64_t n = 0; n < 8; n++) v1[n] = page_of(n, 1);
  auto a = write("a", v1, nullptr, true);
  EXPECT_EQ(a->index().page_hashes().size(), 8 * kPageHashBytes);
  EXPECT_EQ(a->page_hash(kBase + 9 * kPageSize), nullptr);
  ASSERT_NE(a->page_hash(kBase), nullptr);
  EXPECT_EQ(a->page_hash(kBase + 100 * kPageSize), nullptr);
  auto plain = write("plain", v1, nullptr, false);
  EXPECT_TRUE(plain->index().page_hashes().empty());
  EXPECT_EQ(plain->page_hash(kBase), nullptr);
}

}  // namespace
}  // namespace lazycr::image
