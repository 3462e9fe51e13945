// Page store: round trips, writer misuse and REF runs (corrupt files:
// page_store_corruption_test.cc).
#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"
#include "tests/unit/page_store_segments.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_frameHeaderSize
#include <zstd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "common/error.h"

namespace lazycr::image {
namespace {

namespace fs = std::filesystem;
using namespace store_test;

// --- round trips --------------------------------------------------------------------------

TEST(PageStoreRoundTrip, RandomData) {
  round_trip({make_segment(0x400000, 300, Fill::kRandom, 1)}, opts(64 * 1024));
}

TEST(PageStoreRoundTrip, CompressibleData) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x10000000, 1000, Fill::kCompressible, 2)};
  round_trip(segs, opts(128 * 1024));
  PageStoreStats stats = write_store(dir.file("p"), segs, opts(128 * 1024));
  EXPECT_LT(stats.file_bytes, segs[0].bytes.size() / 3);  // 1 KiB random per 4 KiB page
}

TEST(PageStoreRoundTrip, AllZero) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x7f0000000000, 500, Fill::kZero, 3)};
  PageStoreStats stats = write_store(dir.file("p"), segs, opts(kMinFrameSize));
  EXPECT_EQ(0u, stats.data_pages);
  EXPECT_EQ(500u, stats.zero_pages);
  EXPECT_EQ(0u, stats.frames);
  EXPECT_EQ(stats.file_bytes, fs::file_size(dir.file("p")));
  EXPECT_LT(stats.file_bytes, 200u);  // header, a tiny index, footer
  auto r = PageStoreReader::open(dir.file("p"));
  ASSERT_EQ(1, r->index().runs_size());
  EXPECT_EQ(PageRun::ZERO, r->index().runs(0).kind());
  EXPECT_EQ(500u, r->index().runs(0).pages());
  check_all(*r, segs);
  EXPECT_EQ(0u, r->frames_decompressed());
}

TEST(PageStoreRoundTrip, SinglePage) {
  round_trip({make_segment(0x1000, 1, Fill::kRandom, 4)}, opts(kMinFrameSize));
  round_trip({make_segment(0x7ffffffff000, 1, Fill::kCompressible, 5)}, opts(kMaxFrameSize));
}

TEST(PageStoreRoundTrip, EmptyStore) {
  TempDir dir;
  PageStoreWriter w(dir.file("p"), opts(kMinFrameSize));
  PageStoreStats stats = w.finish();
  EXPECT_EQ(0u, stats.frames);
  auto r = PageStoreReader::open(dir.file("p"));
  EXPECT_EQ(0, r->index().runs_size());
  EXPECT_FALSE(r->find(0x1000).has_value());
  std::vector<unsigned char> buf(kPageSize);
  EXPECT_THROW(r->read(0x1000, 1, buf.data()), Error);
  r->read(0x1000, 0, buf.data());  // nothing to do
  r->verify_all();
}

TEST(PageStoreRoundTrip, SparseRangesWithGaps) {
  std::vector<Segment> segs;
  segs.push_back(make_segment(0x10000, 7, Fill::kMixed, 6));
  segs.push_back(make_segment(0x10000 + 7 * kPageSize, 5, Fill::kRandom, 7));  // adjacent
  segs.push_back(make_segment(0x200000, 40, Fill::kMixed, 8));
  segs.push_back(make_segment(0x7f1234560000, 3, Fill::kZero, 9));
  segs.push_back(make_segment(0x7f1234560000 + 4 * kPageSize, 90, Fill::kMixed, 10));
  segs.push_back(make_segment(0x7ffffff00000, 256, Fill::kCompressible, 11));
  round_trip(segs, opts(kMinFrameSize, 3));

  TempDir dir;
  write_store(dir.file("p"), segs, opts(kMinFrameSize, 3));
  auto r = PageStoreReader::open(dir.file("p"));
  // Runs are sorted, merged where address and kind continue, and never span a gap.
  const PageIndex& idx = r->index();
  for (int i = 1; i < idx.runs_size(); ++i) {
    const PageRun& a = idx.runs(i - 1);
    const PageRun& b = idx.runs(i);
    uint64_t a_end = a.start() + a.pages() * kPageSize;
    ASSERT_LE(a_end, b.start());
    ASSERT_FALSE(a_end == b.start() && a.kind() == b.kind()) << "unmerged runs at " << i;
  }
  std::vector<unsigned char> buf(3 * kPageSize);
  // Gaps: before, between and after the segments.
  for (uint64_t a : {uint64_t{0}, uint64_t{0xf000}, uint64_t{0x1c000}, uint64_t{0x1ff000},
                     uint64_t{0x7f1234563000}, uint64_t{0x7ffffffff000} + kPageSize}) {
    EXPECT_FALSE(r->find(a).has_value()) << a;
    EXPECT_THROW(r->read(a, 1, buf.data()), Error) << a;
  }
  // A read that runs from a segment into a gap fails, as does one across the gap.
  EXPECT_THROW(r->read(0x1b000, 2, buf.data()), Error);
  EXPECT_THROW(r->read(0x7f1234562000, 3, buf.data()), Error);
  // Unaligned, absurd and out-of-range reads fail cleanly.
  EXPECT_THROW(r->read(0x10001, 1, buf.data()), Error);
  EXPECT_THROW(r->read(0x10000, SIZE_MAX, buf.data()), Error);
  EXPECT_THROW(r->read(0x10000, SIZE_MAX / kPageSize + 2, buf.data()), Error);
  EXPECT_THROW(r->read(0xfffffffffffff000ull, 1, buf.data()), Error);
  EXPECT_FALSE(r->find(UINT64_MAX).has_value());
  try {
    r->read(0, 1, buf.data());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir.file("p")), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
}

TEST(PageStoreRoundTrip, RunsMergeAcrossCalls) {
  TempDir dir;
  std::vector<unsigned char> data(kPageSize, 1), zero(kPageSize, 0);
  PageStoreWriter w(dir.file("p"), opts(kMinFrameSize, 1));
  w.add_pages(0x1000, data.data(), 1);
  w.add_pages(0x2000, data.data(), 1);  // merges with the previous DATA page
  w.add_pages(0x3000, zero.data(), 1);
  w.add_pages(0x4000, zero.data(), 1);  // merges with the previous ZERO page
  w.add_pages(0x6000, zero.data(), 1);  // gap: new run
  w.add_pages(0x7000, data.data(), 1);
  EXPECT_EQ(6u, w.pages_added());
  w.finish();
  auto r = PageStoreReader::open(dir.file("p"));
  const PageIndex& idx = r->index();
  ASSERT_EQ(4, idx.runs_size());
  EXPECT_EQ(0x1000u, idx.runs(0).start());
  EXPECT_EQ(2u, idx.runs(0).pages());
  EXPECT_EQ(PageRun::DATA, idx.runs(0).kind());
  EXPECT_EQ(0x3000u, idx.runs(1).start());
  EXPECT_EQ(2u, idx.runs(1).pages());
  EXPECT_EQ(PageRun::ZERO, idx.runs(1).kind());
  EXPECT_EQ(0x6000u, idx.runs(2).start());
  EXPECT_EQ(PageRun::ZERO, idx.runs(2).kind());
  EXPECT_EQ(0x7000u, idx.runs(3).start());
  EXPECT_EQ(2u, idx.runs(3).first_page());
  auto loc = r->find(0x7000);
  ASSERT_TRUE(loc);
  EXPECT_EQ(PageRun::DATA, loc->kind);
  EXPECT_EQ(2u, loc->stream_page);
  loc = r->find(0x2fff);
  ASSERT_TRUE(loc);
  EXPECT_EQ(1u, loc->stream_page);
  EXPECT_FALSE(r->find(0x5000));
  EXPECT_FALSE(r->find(0x8000));
}

TEST(PageStoreRoundTrip, LevelsAndFrameSizes) {
  std::vector<Segment> segs{make_segment(0x100000, 200, Fill::kMixed, 12)};
  for (uint32_t fs : {kMinFrameSize, 20u * 1024, 256u * 1024})
    for (int level : {-5, 1, 3, 19}) round_trip(segs, opts(fs, 2, level));
}

TEST(PageStoreRoundTrip, RandomAccessReads) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x100000, 700, Fill::kMixed, 13),
                            make_segment(0x10000000, 300, Fill::kRandom, 14)};
  write_store(dir.file("p"), segs, opts(32 * 1024));
  auto r = PageStoreReader::open(dir.file("p"), 4);
  std::mt19937_64 rng(42);
  std::vector<unsigned char> buf;
  for (int i = 0; i < 3000; ++i) {
    const Segment& s = segs[rng() % segs.size()];
    size_t first = rng() % s.npages();
    size_t n = 1 + rng() % std::min<size_t>(40, s.npages() - first);
    buf.assign(n * kPageSize, 0x55);
    r->read(s.addr + first * kPageSize, n, buf.data());
    ASSERT_EQ(0, std::memcmp(buf.data(), s.bytes.data() + first * kPageSize, buf.size()))
        << "read " << i << ": page " << first << " + " << n;
  }
  // Every page of every segment, in random order.
  for (const Segment& s : segs) {
    std::vector<size_t> order(s.npages());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    buf.resize(kPageSize);
    for (size_t p : order) {
      r->read(s.addr + p * kPageSize, 1, buf.data());
      ASSERT_EQ(0, std::memcmp(buf.data(), s.bytes.data() + p * kPageSize, kPageSize));
    }
  }
}

TEST(PageStoreRoundTrip, CacheDecompressesEachFrameOnce) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x100000, 64, Fill::kRandom, 15)};
  write_store(dir.file("p"), segs, opts(kMinFrameSize));  // 16 frames of 4 pages
  auto r = PageStoreReader::open(dir.file("p"), 2);
  std::vector<unsigned char> buf(64 * kPageSize);
  r->read(0x100000, 64, buf.data());  // one read over every frame
  EXPECT_EQ(16u, r->frames_decompressed());
  EXPECT_EQ(64u * kPageSize, r->bytes_decompressed());
  for (int i = 0; i < 4; ++i) r->read(0x100000 + 63 * kPageSize, 1, buf.data());  // cached
  EXPECT_EQ(16u, r->frames_decompressed());
  for (int p = 0; p < 64; ++p) r->read(0x100000 + p * kPageSize, 1, buf.data());
  EXPECT_EQ(32u, r->frames_decompressed());           // page by page: once per frame
  r->read(0x100000 + 60 * kPageSize, 1, buf.data());  // frame 15 is still cached
  EXPECT_EQ(32u, r->frames_decompressed());
  r->read(0x100000, 1, buf.data());  // frame 0 was evicted
  EXPECT_EQ(33u, r->frames_decompressed());
}

TEST(PageStoreRoundTrip, ConcurrentReads) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x100000, 2000, Fill::kMixed, 16)};
  write_store(dir.file("p"), segs, opts(kMinFrameSize));
  auto r = PageStoreReader::open(dir.file("p"), 8);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<unsigned char> buf(8 * kPageSize);
      for (int i = 0; i < 1500; ++i) {
        size_t first = rng() % (2000 - 8);
        size_t n = 1 + rng() % 8;
        r->read(0x100000 + first * kPageSize, n, buf.data());
        if (std::memcmp(buf.data(), segs[0].bytes.data() + first * kPageSize, n * kPageSize)) ++bad;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(0, bad.load());
}

TEST(PageStoreRoundTrip, ThreadCountDoesNotChangeTheFile) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x100000, 1500, Fill::kMixed, 17),
                            make_segment(0x40000000, 500, Fill::kRandom, 18)};
  write_store(dir.file("one"), segs, opts(kMinFrameSize, 1));
  write_store(dir.file("four"), segs, opts(kMinFrameSize, 4));
  write_store(dir.file("auto"), segs, opts(kMinFrameSize, 0));
  std::string one = read_file(dir.file("one"));
  EXPECT_TRUE(one == read_file(dir.file("four")));
  EXPECT_TRUE(one == read_file(dir.file("auto")));
  auto r1 = PageStoreReader::open(dir.file("one"));
  auto r4 = PageStoreReader::open(dir.file("four"));
  std::vector<unsigned char> b1(kPageSize), b4(kPageSize);
  for (const Segment& s : segs) {
    for (size_t i = 0; i < s.npages(); ++i) {
      r1->read(s.addr + i * kPageSize, 1, b1.data());
      r4->read(s.addr + i * kPageSize, 1, b4.data());
      ASSERT_TRUE(b1 == b4);
    }
  }
  check_all(*r4, segs);
}

// 256 MiB of pages (a third random, compressible, zero) in three ranges with gaps.
TEST(PageStoreRoundTrip, Huge256MiB) {
  TempDir dir;
  constexpr size_t kPages = (256u << 20) / kPageSize;
  std::vector<Segment> segs{make_segment(0x555500000000, kPages / 4, Fill::kMixed, 19),
                            make_segment(0x7f0000000000, kPages / 2, Fill::kMixed, 20),
                            make_segment(0x7ffd00000000, kPages / 4, Fill::kRandom, 21)};
  PageStoreWriter w(dir.file("p"), opts(kDefaultFrameSize, 0));
  for (const Segment& s : segs)
    for (size_t i = 0; i < s.npages(); i += 1024)
      w.add_pages(s.addr + i * kPageSize, s.bytes.data() + i * kPageSize,
                  std::min<size_t>(1024, s.npages() - i));
  EXPECT_EQ(kPages, w.pages_added());
  PageStoreStats stats = w.finish();
  EXPECT_EQ(kPages, stats.data_pages + stats.zero_pages);
  EXPECT_EQ(stats.file_bytes, w.bytes_written());
  auto r = PageStoreReader::open(dir.file("p"));
  // Under ASan, check one page in 13 page by page (plus whole-range reads of the first 64).
  if (kSanitized) {
    check_all(*r, segs, 13);
    std::vector<unsigned char> buf(64 * kPageSize);
    for (const Segment& s : segs) {
      r->read(s.addr, 64, buf.data());
      ASSERT_EQ(0, std::memcmp(buf.data(), s.bytes.data(), buf.size()));
    }
  } else {
    check_all(*r, segs);
  }
  r->verify_all();
}

// --- writer misuse ------------------------------------------------------------------------

TEST(PageStoreWriter, RejectsBadOptions) {
  TempDir dir;
  std::string p = dir.file("p");
  EXPECT_THROW(PageStoreWriter(p, opts(kMinFrameSize + 1)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(kMinFrameSize - kPageSize)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(kMaxFrameSize + kPageSize)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(0)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(kMinFrameSize, 1, ZSTD_maxCLevel() + 1)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(kMinFrameSize, 1, ZSTD_minCLevel() - 1)), Error);
  EXPECT_THROW(PageStoreWriter(p, opts(kMinFrameSize, 100000)), Error);
  EXPECT_FALSE(fs::exists(p));  // bad options create no file
  try {
    PageStoreWriter(p, opts(12345));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
  EXPECT_THROW(PageStoreWriter(dir.file("no/such/dir/p"), opts(kMinFrameSize)), Error);
}

TEST(PageStoreWriter, RejectsMisorderedAndUnalignedPages) {
  TempDir dir;
  std::vector<unsigned char> data(4 * kPageSize, 7);
  PageStoreWriter w(dir.file("p"), opts(kMinFrameSize));
  EXPECT_THROW(w.add_pages(0x1001, data.data(), 1), Error);  // unaligned
  w.add_pages(0x10000, data.data(), 2);
  EXPECT_THROW(w.add_pages(0x10000, data.data(), 1), Error);  // repeated
  EXPECT_THROW(w.add_pages(0x11000, data.data(), 1), Error);  // overlaps the last call
  EXPECT_THROW(w.add_pages(0x8000, data.data(), 1), Error);   // below
  EXPECT_THROW(w.add_pages(0x20000, nullptr, 1), Error);
  EXPECT_THROW(w.add_pages(kUserEnd, data.data(), 1), Error);
  EXPECT_THROW(w.add_pages(kUserEnd - kPageSize, data.data(), 2), Error);
  EXPECT_THROW(w.add_pages(0x20000, data.data(), SIZE_MAX), Error);
  w.add_pages(0x12000, data.data(), 1);  // right after the last page: fine
  w.add_pages(0x13000, data.data(), 0);  // empty: fine
  w.add_pages(kUserEnd - kPageSize, data.data(), 1);
  EXPECT_THROW(w.add_pages(kUserEnd, data.data(), 0), Error);
  PageStoreStats stats = w.finish();
  EXPECT_EQ(4u, stats.data_pages);
  EXPECT_THROW(w.add_pages(kUserEnd, data.data(), 1), Error);
  EXPECT_THROW(w.finish(), Error);
  auto r = PageStoreReader::open(dir.file("p"));
  std::vector<unsigned char> buf(kPageSize);
  r->read(kUserEnd - kPageSize, 1, buf.data());
  EXPECT_EQ(7, buf[100]);
}

TEST(PageStoreWriter, DestructorWithoutFinishRemovesTheFile) {
  TempDir dir;
  std::vector<Segment> segs{make_segment(0x100000, 500, Fill::kRandom, 22)};
  {
    PageStoreWriter w(dir.file("p"), opts(kMinFrameSize, 2));
    w.add_pages(segs[0].addr, segs[0].bytes.data(), segs[0].npages());
    EXPECT_TRUE(fs::exists(dir.file("p")));
    EXPECT_GT(w.bytes_written(), 0u);
  }
  EXPECT_FALSE(fs::exists(dir.file("p")));
  {
    PageStoreWriter w(dir.file("q"), opts(kMinFrameSize, 2));  // nothing added
  }
  EXPECT_FALSE(fs::exists(dir.file("q")));
}

TEST(PageStoreWriter, RefusesNonRegularFiles) {
  // Must not touch (or unlink!) /dev/null.
  EXPECT_THROW(PageStoreWriter("/dev/null", opts(kMinFrameSize)), Error);
  EXPECT_TRUE(fs::exists("/dev/null"));
}

// Writes seg into path with a 64 KiB file size limit, so writes fail with EFBIG; exits 0 if
// that gives an Error naming the path. Runs in a death-test child.
void write_with_size_limit(const std::string& path, const Segment& seg) {
  std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit rl = {64 * 1024, 64 * 1024};
  setrlimit(RLIMIT_FSIZE, &rl);
  try {
    PageStoreWriter w(path, opts(kMinFrameSize, 2));
    w.add_pages(seg.addr, seg.bytes.data(), seg.npages());
    w.finish();
  } catch (const Error& e) {
    std::string msg = e.what();
    _exit(msg.find(path) != std::string::npos && e.sys_errno() == EFBIG ? 0 : 2);
  }
  _exit(1);
}

TEST(PageStoreWriter, WriteErrorNamesThePath) {
  TempDir dir;
  std::string p = dir.file("p");
  std::vector<Segment> segs{make_segment(0x100000, 200, Fill::kRandom, 23)};
  // In a child: a 64 KiB file size limit makes writes fail with EFBIG.
  EXPECT_EXIT(write_with_size_limit(p, segs[0]), testing::ExitedWithCode(0), "");
  EXPECT_FALSE(fs::exists(p));
}

// --- corruption ---------------------------------------------------------------------------

// A small store: 3 frames of 4 pages, ZERO and DATA runs, gaps.
class PageStoreRefs : public ::testing::Test {
 protected:
  static constexpr uint64_t kParentAddr = 0x500000;
  static constexpr uint64_t kChildAddr = 0x7f0000000000;

  void SetUp() override {
    parent_seg_ = make_segment(kParentAddr, 40, Fill::kMixed, 11);
    write_store(dir_.file("parent.lzp"), {parent_seg_}, opts(kMinFrameSize));
    parent_ = PageStoreReader::open(dir_.file("parent.lzp"));
  }

  // Child layout: 3 own pages, 10 REF pages = parent pages 5..14 (added in two calls that
  // merge), 2 own pages, 4 REF pages = parent pages 30..33, 2 REF pages = parent pages 0..1
  // (not contiguous with the previous ref: a new run).
  PageStoreStats write_child(const std::string& path) {
    own_ = make_segment(kChildAddr, 5, Fill::kRandom, 12);
    PageStoreWriter w(path, opts(kMinFrameSize));
    w.add_pages(kChildAddr, own_.bytes.data(), 3);
    w.add_ref_pages(kChildAddr + 3 * kPageSize, 4, 100, kParentAddr + 5 * kPageSize);
    w.add_ref_pages(kChildAddr + 7 * kPageSize, 6, 100, kParentAddr + 9 * kPageSize);
    w.add_pages(kChildAddr + 13 * kPageSize, own_.bytes.data() + 3 * kPageSize, 2);
    w.add_ref_pages(kChildAddr + 15 * kPageSize, 4, 100, kParentAddr + 30 * kPageSize);
    w.add_ref_pages(kChildAddr + 19 * kPageSize, 2, 100, kParentAddr);
    return w.finish();
  }

  // The child's 21 pages as they must read.
  std::vector<unsigned char> expected_child() const {
    std::vector<unsigned char> out;
    auto own = [&](size_t from, size_t n) {
      out.insert(out.end(), own_.bytes.begin() + from * kPageSize,
                 own_.bytes.begin() + (from + n) * kPageSize);
    };
    auto parent = [&](size_t from, size_t n) {
      out.insert(out.end(), parent_seg_.bytes.begin() + from * kPageSize,
                 parent_seg_.bytes.begin() + (from + n) * kPageSize);
    };
    own(0, 3);
    parent(5, 10);
    own(3, 2);
    parent(30, 4);
    parent(0, 2);
    return out;
  }

  PageStoreReader::StoreOf parent_only() const {
    std::shared_ptr<const PageStoreReader> p = parent_;
    return [p](int32_t pid) { return pid == 100 ? p : nullptr; };
  }

  TempDir dir_;
  Segment parent_seg_, own_;
  std::shared_ptr<PageStoreReader> parent_;
};

TEST_F(PageStoreRefs, RoundTripAndLink) {
  const std::string path = dir_.file("child.lzp");
  PageStoreStats stats = write_child(path);
  EXPECT_EQ(16u, stats.ref_pages);
  EXPECT_EQ(5u, stats.data_pages);
  auto child = PageStoreReader::open(path);
  EXPECT_EQ(16u, child->ref_pages());
  EXPECT_EQ(std::vector<int32_t>{100}, child->ref_pids());
  EXPECT_FALSE(child->refs_linked());
  // Runs: DATA 3, REF 10 (merged), DATA 2, REF 4, REF 2.
  const auto& runs = child->index().runs();
  ASSERT_EQ(5, runs.size());
  EXPECT_EQ(PageRun::REF, runs[1].kind());
  EXPECT_EQ(10u, runs[1].pages());
  EXPECT_EQ(kParentAddr + 5 * kPageSize, runs[1].ref_addr());
  EXPECT_EQ(4u, runs[3].pages());
  EXPECT_EQ(2u, runs[4].pages());
  EXPECT_EQ(kParentAddr, runs[4].ref_addr());

  // find(): where each REF page lives, page by page.
  auto loc = child->find(kChildAddr + 8 * kPageSize + 17);
  ASSERT_TRUE(loc);
  EXPECT_EQ(PageRun::REF, loc->kind);
  EXPECT_EQ(100, loc->ref_pid);
  EXPECT_EQ(kParentAddr + 10 * kPageSize, loc->ref_addr);
  EXPECT_EQ(PageRun::DATA, child->find(kChildAddr + 13 * kPageSize)->kind);

  // Unlinked: own pages read, REF pages are a clear error.
  std::vector<unsigned char> buf(21 * kPageSize);
  child->read(kChildAddr, 3, buf.data());
  try {
    child->read(kChildAddr + 2 * kPageSize, 2, buf.data());
    FAIL() << "REF page read without a link";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(0u, msg.find(path + ": ")) << msg;
    EXPECT_NE(std::string::npos, msg.find("no store is linked for pid 100")) << msg;
  }
  child->verify_all();  // only its own frames

  child->link_refs(parent_only());
  EXPECT_TRUE(child->refs_linked());
  const std::vector<unsigned char> want = expected_child();
  std::fill(buf.begin(), buf.end(), 0xAA);
  child->read(kChildAddr, 21, buf.data());
  EXPECT_TRUE(buf == want);
  for (size_t i = 0; i < 21; ++i) {
    child->read(kChildAddr + i * kPageSize, 1, buf.data());
    ASSERT_EQ(0, std::memcmp(buf.data(), want.data() + i * kPageSize, kPageSize)) << "page " << i;
  }
  // Shared pages come through the parent's cache: reading them again in the child or the
  // parent decompresses nothing more.
  const uint64_t before = parent_->frames_decompressed();
  std::vector<unsigned char> again(10 * kPageSize);
  child->read(kChildAddr + 3 * kPageSize, 10, again.data());
  parent_->read(kParentAddr + 5 * kPageSize, 10, again.data());
  EXPECT_EQ(before, parent_->frames_decompressed());
  EXPECT_THROW(child->link_refs(parent_only()), Error);  // once
}

TEST_F(PageStoreRefs, ThreadsReadSharedPages) {
  write_child(dir_.file("child.lzp"));
  auto child = PageStoreReader::open(dir_.file("child.lzp"), 1);
  child->link_refs(parent_only());
  const std::vector<unsigned char> want = expected_child();
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::vector<unsigned char> b(kPageSize);
      for (int k = 0; k < 500; ++k) {
        size_t i = static_cast<size_t>(k * 7 + t) % 21;
        const PageStoreReader& r = *child;
        r.read(kChildAddr + i * kPageSize, 1, b.data());
        if (std::memcmp(b.data(), want.data() + i * kPageSize, kPageSize) != 0) ++bad;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(0, bad.load());
}

TEST_F(PageStoreRefs, LinkRefusals) {
  const std::string path = dir_.file("child.lzp");
  write_child(path);
  auto expect_link_fails = [&](const PageStoreReader::StoreOf& store_of, const std::string& why) {
    auto child = PageStoreReader::open(path);
    try {
      child->link_refs(store_of);
      ADD_FAILURE() << "linked: " << why;
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(0u, msg.find(path + ": ")) << msg;
      EXPECT_NE(std::string::npos, msg.find(why)) << msg;
    }
    EXPECT_FALSE(child->refs_linked());
  };
  expect_link_fails([](int32_t) { return nullptr; }, "pid 100, which has no page store");
  // A parent that does not hold the referenced pages (one page short of parent page 33).
  {
    Segment shorter = parent_seg_;
    shorter.bytes.resize(33 * kPageSize);
    write_store(dir_.file("short.lzp"), {shorter}, opts(kMinFrameSize));
    std::shared_ptr<const PageStoreReader> s = PageStoreReader::open(dir_.file("short.lzp"));
    expect_link_fails([s](int32_t) { return s; }, "does not hold");
  }
  // A parent with a hole in the referenced range.
  {
    PageStoreWriter w(dir_.file("hole.lzp"), opts(kMinFrameSize));
    w.add_pages(kParentAddr, parent_seg_.bytes.data(), 7);
    w.add_pages(kParentAddr + 8 * kPageSize, parent_seg_.bytes.data() + 8 * kPageSize, 32);
    w.finish();
    std::shared_ptr<const PageStoreReader> s = PageStoreReader::open(dir_.file("hole.lzp"));
    expect_link_fails([s](int32_t) { return s; }, "does not hold");
  }
  // The referenced pages are REF pages themselves (refs never chain); and that store is not
  // linked yet.
  {
    PageStoreWriter w(dir_.file("refs.lzp"), opts(kMinFrameSize));
    w.add_pages(kParentAddr, parent_seg_.bytes.data(), 20);
    w.add_ref_pages(kParentAddr + 20 * kPageSize, 20, 7, 0x1000);
    w.finish();
    std::shared_ptr<PageStoreReader> s = PageStoreReader::open(dir_.file("refs.lzp"));
    expect_link_fails([s](int32_t) { return s; }, "not linked yet");
    std::vector<unsigned char> grand(20 * kPageSize, 1);
    PageStoreWriter g(dir_.file("grand.lzp"), opts(kMinFrameSize));
    g.add_pages(0x1000, grand.data(), 20);
    g.finish();
    std::shared_ptr<const PageStoreReader> gs = PageStoreReader::open(dir_.file("grand.lzp"));
    s->link_refs([gs](int32_t pid) { return pid == 7 ? gs : nullptr; });
    expect_link_fails([s](int32_t) { return s; }, "refs never chain");
  }
  // Itself.
  {
    auto child = PageStoreReader::open(path);
    PageStoreReader* raw = child.get();
    std::shared_ptr<const PageStoreReader> self(raw, [](const PageStoreReader*) {});
    EXPECT_THROW(child->link_refs([self](int32_t) { return self; }), Error);
  }
}

TEST_F(PageStoreRefs, RefToZeroPagesReadsZeros) {
  std::vector<unsigned char> zeros(8 * kPageSize, 0);
  {
    PageStoreWriter w(dir_.file("z.lzp"), opts(kMinFrameSize));
    w.add_pages(0x10000, zeros.data(), 8);
    w.finish();
  }
  {
    PageStoreWriter w(dir_.file("c.lzp"), opts(kMinFrameSize));
    w.add_ref_pages(0x20000, 8, 3, 0x10000);
    PageStoreStats st = w.finish();
    EXPECT_EQ(8u, st.ref_pages);
    EXPECT_EQ(0u, st.frames);
  }
  std::shared_ptr<const PageStoreReader> z = PageStoreReader::open(dir_.file("z.lzp"));
  auto c = PageStoreReader::open(dir_.file("c.lzp"));
  c->link_refs([z](int32_t) { return z; });
  std::vector<unsigned char> buf(8 * kPageSize, 0xAA);
  c->read(0x20000, 8, buf.data());
  EXPECT_TRUE(buf == zeros);
}

TEST(PageStoreWriter, RefMisuse) {
  TempDir dir;
  PageStoreWriter w(dir.file("p"), opts(kMinFrameSize));
  std::vector<unsigned char> page(kPageSize, 1);
  EXPECT_THROW(w.add_ref_pages(0x1000, 1, 0, 0x1000), Error);
  EXPECT_THROW(w.add_ref_pages(0x1000, 1, -5, 0x1000), Error);
  EXPECT_THROW(w.add_ref_pages(0x1001, 1, 1, 0x1000), Error);
  EXPECT_THROW(w.add_ref_pages(0x1000, 1, 1, 0x1008), Error);
  EXPECT_THROW(w.add_ref_pages(0x1000, 2, 1, kUserEnd - kPageSize), Error);
  EXPECT_THROW(w.add_ref_pages(0x1000, 1, 1, UINT64_MAX & ~4095ull), Error);
  EXPECT_THROW(w.add_ref_pages(kUserEnd - kPageSize, 2, 1, 0x1000), Error);
  w.add_ref_pages(0x2000, 2, 1, 0x1000);
  EXPECT_THROW(w.add_ref_pages(0x3000, 1, 1, 0x9000), Error);  // below the last page added
  EXPECT_THROW(w.add_pages(0x3000, page.data(), 1), Error);
  w.add_pages(0x4000, page.data(), 1);
  PageStoreStats st = w.finish();
  EXPECT_EQ(2u, st.ref_pages);
  EXPECT_THROW(w.add_ref_pages(0x10000, 1, 1, 0x1000), Error);  // after finish
}

TEST(PageStoreReader, OpenErrorsNameThePath) {
  TempDir dir;
  for (const std::string& p : {dir.file("missing"), dir.path()}) {
    try {
      PageStoreReader::open(p);
      FAIL() << p;
    } catch (const Error& e) {
      EXPECT_EQ(0u, std::string(e.what()).find(p + ": ")) << e.what();
    }
  }
  write_file(dir.file("empty"), "");
  EXPECT_THROW(PageStoreReader::open(dir.file("empty")), Error);
  write_file(dir.file("zeros"), std::string(4096, '\0'));
  EXPECT_THROW(PageStoreReader::open(dir.file("zeros")), Error);
}

}  // namespace
}  // namespace lazycr::image