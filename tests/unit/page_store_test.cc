// Page store: round trips, writer misuse, and a reader that refuses every corrupt file with a
// clean Error (no crash, hang or out-of-bounds read; these tests also run under ASan/UBSan).
#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"

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
using test::Rng;
using test::TempDir;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

constexpr uint64_t kUserEnd = 0x0000800000000000ull;

enum class Fill { kRandom, kCompressible, kZero, kMixed };

// One page of the given kind; kMixed picks per page.
void fill_page(unsigned char* p, Fill fill, Rng& rng) {
  if (fill == Fill::kMixed) {
    switch (rng.next() % 3) {
      case 0:
        fill = Fill::kRandom;
        break;
      case 1:
        fill = Fill::kCompressible;
        break;
      default:
        fill = Fill::kZero;
        break;
    }
  }
  switch (fill) {
    case Fill::kRandom:
      rng.fill(p, kPageSize);
      break;
    case Fill::kCompressible:
      std::memset(p, 0, kPageSize);
      rng.fill(p, 1024);
      break;
    default:
      std::memset(p, 0, kPageSize);
      break;
  }
}

struct Segment {
  uint64_t addr;
  std::vector<unsigned char> bytes;  // npages * kPageSize
  size_t npages() const { return bytes.size() / kPageSize; }
};

Segment make_segment(uint64_t addr, size_t npages, Fill fill, uint64_t seed) {
  Segment s{addr, std::vector<unsigned char>(npages * kPageSize)};
  Rng rng(seed);
  for (size_t i = 0; i < npages; ++i) fill_page(s.bytes.data() + i * kPageSize, fill, rng);
  return s;
}

// Adds each segment in chunks of varying size (1..37 pages) to exercise add_pages calls
// that split runs and frames.
PageStoreStats write_store(const std::string& path, const std::vector<Segment>& segs,
                           const PageStoreOptions& options) {
  PageStoreWriter writer(path, options);
  size_t chunk = 1;
  for (const Segment& s : segs) {
    for (size_t i = 0; i < s.npages();) {
      size_t n = std::min(chunk, s.npages() - i);
      writer.add_pages(s.addr + i * kPageSize, s.bytes.data() + i * kPageSize, n);
      i += n;
      chunk = chunk % 37 + 1;
    }
  }
  return writer.finish();
}

PageStoreOptions opts(uint32_t frame_size, unsigned threads = 2, int level = 1) {
  PageStoreOptions o;
  o.frame_size = frame_size;
  o.threads = threads;
  o.level = level;
  return o;
}

// Reads every segment in one call and page by page; the data must match.
void check_all(const PageStoreReader& r, const std::vector<Segment>& segs, size_t stride = 1) {
  std::vector<unsigned char> buf;
  for (const Segment& s : segs) {
    if (stride == 1) {
      buf.assign(s.bytes.size(), 0xAA);
      r.read(s.addr, s.npages(), buf.data());
      ASSERT_TRUE(buf == s.bytes) << "segment at " << s.addr;
    }
    buf.resize(kPageSize);
    for (size_t i = 0; i < s.npages(); i += stride) {
      r.read(s.addr + i * kPageSize, 1, buf.data());
      ASSERT_EQ(0, std::memcmp(buf.data(), s.bytes.data() + i * kPageSize, kPageSize))
          << "page " << i << " of segment at " << s.addr;
      auto loc = r.find(s.addr + i * kPageSize + 123);
      ASSERT_TRUE(loc.has_value());
      bool zero = std::all_of(s.bytes.begin() + i * kPageSize,
                              s.bytes.begin() + (i + 1) * kPageSize, [](auto c) { return !c; });
      ASSERT_EQ(zero ? PageRun::ZERO : PageRun::DATA, loc->kind);
    }
  }
}

uint64_t count_zero_pages(const std::vector<Segment>& segs) {
  uint64_t n = 0;
  for (const Segment& s : segs)
    for (size_t i = 0; i < s.npages(); ++i)
      n += std::all_of(s.bytes.begin() + i * kPageSize, s.bytes.begin() + (i + 1) * kPageSize,
                       [](auto c) { return !c; });
  return n;
}

void round_trip(const std::vector<Segment>& segs, const PageStoreOptions& o) {
  TempDir dir;
  std::string path = dir.file("pages.lzp");
  PageStoreStats stats = write_store(path, segs, o);
  uint64_t total = 0;
  for (const Segment& s : segs) total += s.npages();
  uint64_t zeros = count_zero_pages(segs);
  EXPECT_EQ(zeros, stats.zero_pages);
  EXPECT_EQ(total - zeros, stats.data_pages);
  uint32_t fp = o.frame_size / kPageSize;
  EXPECT_EQ((stats.data_pages + fp - 1) / fp, stats.frames);
  EXPECT_EQ(fs::file_size(path), stats.file_bytes);

  auto r = PageStoreReader::open(path);
  EXPECT_EQ(stats.file_bytes, r->file_size());
  EXPECT_EQ(path, r->path());
  EXPECT_EQ(stats.data_pages, r->index().data_pages());
  EXPECT_EQ(stats.zero_pages, r->index().zero_pages());
  EXPECT_EQ(stats.frames, r->frame_count());
  EXPECT_EQ(static_cast<int>(stats.frames), r->index().frame_sizes_size());
  r->verify_all();
  EXPECT_EQ(stats.frames, r->frames_decompressed());
  check_all(*r, segs);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
}

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
std::vector<Segment> small_segments() {
  std::vector<Segment> segs{make_segment(0x10000, 10, Fill::kCompressible, 30),
                            make_segment(0x100000, 3, Fill::kZero, 31),
                            make_segment(0x103000, 2, Fill::kCompressible, 32)};
  std::memset(segs[0].bytes.data() + 3 * kPageSize, 0, 2 * kPageSize);  // pages 3, 4: zero
  return segs;
}

// Opens, verifies and reads everything. Returns true if that worked (the data must then be
// right), false on a clean Error. Anything else fails the test.
bool open_and_read_all(const std::string& path, const std::vector<Segment>& segs) {
  try {
    auto r = PageStoreReader::open(path);
    r->verify_all();
    std::vector<unsigned char> buf;
    for (const Segment& s : segs) {
      buf.assign(s.bytes.size(), 0);
      r->read(s.addr, s.npages(), buf.data());
      EXPECT_TRUE(buf == s.bytes) << "wrong data read without an error from " << path;
    }
    return true;
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(0u, msg.find(path)) << msg;
    EXPECT_EQ(std::string::npos, msg.find('\n')) << msg;
    return false;
  }
}

class PageStoreCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    segs_ = small_segments();
    good_path_ = dir_.file("good.lzp");
    // Corrupt variants go to a memfd: thousands of rewrites cost no disk I/O.
    memfd_ = ::memfd_create("lazycr-page-store-test", MFD_CLOEXEC);
    ASSERT_GE(memfd_, 0);
    path_ = "/proc/self/fd/" + std::to_string(memfd_);
    write_store(good_path_, segs_, opts(kMinFrameSize));
    good_ = read_file(good_path_);
    ASSERT_TRUE(open_and_read_all(good_path_, segs_));
    index_offset_ = get64(good_.size() - 32);
    index_size_ = get64(good_.size() - 24);
    std::string packed = good_.substr(index_offset_, index_size_);
    std::string raw(ZSTD_getFrameContentSize(packed.data(), packed.size()), '\0');
    ASSERT_EQ(raw.size(), ZSTD_decompress(raw.data(), raw.size(), packed.data(), packed.size()));
    ASSERT_TRUE(index_.ParseFromString(raw));
    ASSERT_EQ(3, index_.frame_sizes_size());
  }

  void TearDown() override {
    if (memfd_ >= 0) ::close(memfd_);
  }

  // Replaces the contents of path_.
  void put(const std::string& bytes) {
    ASSERT_EQ(0, ::ftruncate(memfd_, 0));
    ASSERT_EQ(static_cast<ssize_t>(bytes.size()), ::pwrite(memfd_, bytes.data(), bytes.size(), 0));
  }

  uint64_t get64(size_t at) const {
    uint64_t v;
    std::memcpy(&v, good_.data() + at, 8);
    return v;
  }

  static std::string compress(const std::string& raw, int checksum = 1, int content_size = 1) {
    ZSTD_CCtx* c = ZSTD_createCCtx();
    ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, checksum);
    ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, content_size);
    std::string out(ZSTD_compressBound(raw.size()), '\0');
    size_t n = ZSTD_compress2(c, out.data(), out.size(), raw.data(), raw.size());
    ZSTD_freeCCtx(c);
    out.resize(n);
    return out;
  }

  static std::string footer(uint64_t offset, uint64_t size, uint32_t version = kPageStoreVersion,
                            uint32_t reserved = 0) {
    std::string f(32, '\0');
    std::memcpy(f.data(), &offset, 8);
    std::memcpy(f.data() + 8, &size, 8);
    std::memcpy(f.data() + 16, &version, 4);
    std::memcpy(f.data() + 20, &reserved, 4);
    std::memcpy(f.data() + 24, "LZCRPEND", 8);
    return f;
  }

  // The good file's frames with `packed` as the index and a matching footer.
  std::string with_packed_index(const std::string& frames, const std::string& packed) const {
    return frames + packed + footer(frames.size(), packed.size());
  }
  std::string with_index(const PageIndex& idx) const {
    return with_packed_index(good_.substr(0, index_offset_), compress(idx.SerializeAsString()));
  }

  // Writes bytes to path_ and expects open() to refuse them.
  void expect_open_fails(const std::string& bytes, const std::string& what) {
    put(bytes);
    try {
      PageStoreReader::open(path_);
      ADD_FAILURE() << "open() accepted: " << what;
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(0u, msg.find(path_ + ": ")) << msg;
      EXPECT_EQ(std::string::npos, msg.find('\n')) << msg;
    }
  }
  void expect_index_fails(const std::function<void(PageIndex&)>& mutate, const std::string& what) {
    PageIndex idx = index_;
    mutate(idx);
    expect_open_fails(with_index(idx), what);
  }

  TempDir dir_;
  std::vector<Segment> segs_;
  std::string good_path_, path_, good_;
  int memfd_ = -1;
  uint64_t index_offset_ = 0, index_size_ = 0;
  PageIndex index_;
};

TEST_F(PageStoreCorruption, TruncatedAtEveryLength) {
  for (size_t len = 0; len < good_.size(); ++len)
    expect_open_fails(good_.substr(0, len), cat("truncated to ", len));
  expect_open_fails(good_ + std::string(1, '\0'), "one byte appended");
  expect_open_fails(good_ + good_, "file twice");
  // Cut out one frame's last byte, keeping header and footer.
  expect_open_fails(good_.substr(0, 100) + good_.substr(101), "byte removed");
}

TEST_F(PageStoreCorruption, FlippedBitsEverywhere) {
  std::vector<std::pair<uint64_t, uint64_t>> headers;  // [begin, end) of each zstd header
  uint64_t offset = 64;
  for (uint32_t size : index_.frame_sizes()) {
    headers.emplace_back(offset, size);
    offset += size;
  }
  headers.emplace_back(index_offset_, index_size_);
  for (auto& [begin, size] : headers) {
    size_t n = ZSTD_frameHeaderSize(good_.data() + begin, size);
    ASSERT_FALSE(ZSTD_isError(n));
    size = begin + n;
  }
  auto in_frame_header = [&](size_t at) {
    for (auto [begin, end] : headers)
      if (at >= begin && at < end) return true;
    return false;
  };
  size_t flips = 0, undetected = 0;
  for (size_t at = 0; at < good_.size(); ++at) {
    // Every bit of the header, the index and the footer; one bit per byte of the frames.
    bool dense = at < 64 || at >= index_offset_;
    // Header, footer and every zstd frame header are checked field by field, and every byte
    // of a data frame against the frame's SHA-256: every flip there must be caught.
    bool must_detect = at < index_offset_ || at >= good_.size() - 32 || in_frame_header(at);
    for (int bit = dense ? 0 : static_cast<int>(at % 8); bit < 8; bit += dense ? 1 : 8) {
      std::string bad = good_;
      bad[at] = static_cast<char>(bad[at] ^ (1 << bit));
      put(bad);
      ++flips;
      // open_and_read_all() fails the test if the data read back is wrong.
      if (open_and_read_all(path_, segs_)) {
        ++undetected;
        EXPECT_FALSE(must_detect) << "undetected flip at byte " << at << " bit " << bit;
      }
      if (HasFailure()) FAIL() << "at byte " << at << " bit " << bit;
    }
  }
  // Inside compressed data a flip can leave the output unchanged (e.g. a match offset that
  // still points into zeros); the content checksum catches every flip that changes it.
  EXPECT_LT(undetected * 100, flips) << undetected << " of " << flips << " flips undetected";
}

TEST_F(PageStoreCorruption, AbsurdHeaderAndFooter) {
  auto set32 = [&](size_t at, uint32_t v) {
    std::string b = good_;
    std::memcpy(b.data() + at, &v, 4);
    return b;
  };
  expect_open_fails(set32(8, 0), "version 0");
  expect_open_fails(set32(8, 1), "version 1");
  expect_open_fails(set32(8, 3), "version 3");
  expect_open_fails(set32(12, 128), "header_size 128");
  expect_open_fails(set32(12, UINT32_MAX), "header_size max");
  expect_open_fails(set32(16, 8192), "page_size 8192");
  expect_open_fails(set32(16, 0), "page_size 0");
  for (uint32_t fp : {0u, 1u, 3u, 5u, 1025u, UINT32_MAX}) expect_open_fails(set32(20, fp), "fp");
  for (uint32_t level : {1000u, 0x80000000u, 3u}) expect_open_fails(set32(24, level), "level");
  expect_open_fails(set32(60, 1), "reserved header bytes");

  std::string frames = good_.substr(0, index_offset_);
  std::string packed = good_.substr(index_offset_, index_size_);
  std::string body = good_.substr(0, good_.size() - 32);
  for (uint64_t off :
       {uint64_t{0}, uint64_t{63}, index_offset_ - 1, index_offset_ + 1, body.size(),
        body.size() + 1, uint64_t{1} << 63, UINT64_MAX, UINT64_MAX - index_size_ + 1})
    expect_open_fails(body + footer(off, index_size_), cat("index offset ", off));
  for (uint64_t size : {uint64_t{0}, index_size_ - 1, index_size_ + 1, uint64_t{1} << 40,
                        UINT64_MAX, UINT64_MAX - index_offset_ + 1})
    expect_open_fails(body + footer(index_offset_, size), cat("index size ", size));
  expect_open_fails(body + footer(index_offset_, index_size_, 1), "footer version 1");
  expect_open_fails(body + footer(index_offset_, index_size_, 3), "footer version 3");
  expect_open_fails(body + footer(index_offset_, index_size_, 2, 1), "footer reserved");
  // The good footer is accepted (the helper is right).
  put(body + footer(index_offset_, index_size_));
  EXPECT_NO_THROW(PageStoreReader::open(path_));
}

TEST_F(PageStoreCorruption, AbsurdIndexFrames) {
  std::string frames = good_.substr(0, index_offset_);
  std::string raw = index_.SerializeAsString();
  expect_open_fails(with_packed_index(frames, compress(raw, 0)), "index without checksum");
  expect_open_fails(with_packed_index(frames, compress(raw, 1, 0)), "index without size");
  expect_open_fails(with_packed_index(frames, compress(raw) + compress("")), "two frames");
  expect_open_fails(with_packed_index(frames, compress("garbage protobuf \xff\xff\xff")),
                    "not a PageIndex");
  expect_open_fails(with_packed_index(frames, compress("")), "empty index");
  expect_open_fails(with_packed_index(frames, std::string(64, '\0')), "zeros as index");
  // A skippable frame.
  std::string skippable(
      "\x50\x2a\x4d\x18\x04\x00\x00\x00"
      "abcd",
      12);
  expect_open_fails(with_packed_index(frames, skippable), "skippable frame");
  // A frame header claiming 1 TiB of content: refused before anything is allocated.
  std::string huge("\x28\xb5\x2f\xfd", 4);
  huge += '\xe4';  // 8-byte content size, single segment, checksum
  uint64_t tib = uint64_t{1} << 40;
  huge.append(reinterpret_cast<const char*>(&tib), 8);
  huge += std::string("\x01\x00\x00", 3) + "abcd";  // a last raw block of 0 bytes + checksum
  expect_open_fails(with_packed_index(frames, huge), "1 TiB index");
  // An index just over the 256 MiB limit (256 MiB + 1 of zeros compresses to a few KiB).
  if (!kSanitized) {
    std::string big((256u << 20) + 1, '\0');
    expect_open_fails(with_packed_index(frames, compress(big)), "256 MiB + 1 index");
  }
  // The same index, rewritten, is accepted.
  put(with_packed_index(frames, compress(raw)));
  EXPECT_TRUE(open_and_read_all(path_, segs_));
}

TEST_F(PageStoreCorruption, AbsurdIndexValues) {
  constexpr uint64_t kBig = uint64_t{1} << 63;
  expect_index_fails([](PageIndex& i) { i.set_page_size(8192); }, "page_size");
  expect_index_fails([](PageIndex& i) { i.set_frame_pages(8); }, "frame_pages");
  expect_index_fails([](PageIndex& i) { i.set_frame_pages(0); }, "frame_pages 0");
  expect_index_fails([](PageIndex& i) { i.set_data_pages(kBig); }, "data_pages");
  expect_index_fails([](PageIndex& i) { i.set_data_pages(UINT64_MAX); }, "data_pages max");
  expect_index_fails([](PageIndex& i) { i.set_data_pages(i.data_pages() + 1); }, "data+1");
  expect_index_fails([](PageIndex& i) { i.set_zero_pages(UINT64_MAX); }, "zero_pages");
  expect_index_fails([](PageIndex& i) { i.set_zero_pages(i.zero_pages() - 1); }, "zero-1");
  expect_index_fails([](PageIndex& i) { i.clear_runs(); }, "no runs");
  expect_index_fails([](PageIndex& i) { i.clear_frame_sizes(); }, "no frames");
  expect_index_fails([](PageIndex& i) { i.Clear(); }, "empty index");
  expect_index_fails([](PageIndex& i) { i.mutable_frame_sizes()->RemoveLast(); }, "frame missing");
  expect_index_fails([](PageIndex& i) { i.add_frame_sizes(i.frame_sizes(0)); }, "extra frame");
  expect_index_fails([](PageIndex& i) { i.add_frame_sizes(1); }, "extra 1-byte frame");
  expect_index_fails([](PageIndex& i) { *i.add_runs() = i.runs(0); }, "repeated run");
  for (int r = 0; r < index_.runs_size(); ++r) {
    auto run = [r](PageIndex& i) { return i.mutable_runs(r); };
    expect_index_fails([&](PageIndex& i) { run(i)->set_pages(0); }, "pages 0");
    expect_index_fails([&](PageIndex& i) { run(i)->set_pages(kBig); }, "pages 2^63");
    expect_index_fails([&](PageIndex& i) { run(i)->set_pages(UINT64_MAX); }, "pages max");
    expect_index_fails([&](PageIndex& i) { run(i)->set_pages(run(i)->pages() + 1); }, "pages+1");
    expect_index_fails([&](PageIndex& i) { run(i)->set_start(run(i)->start() + 1); }, "align");
    expect_index_fails([&](PageIndex& i) { run(i)->set_start(kUserEnd); }, "kernel");
    expect_index_fails([&](PageIndex& i) { run(i)->set_start(UINT64_MAX & ~4095ull); }, "max");
    expect_index_fails(
        [&](PageIndex& i) {
          run(i)->set_start(kUserEnd - kPageSize);
          run(i)->set_pages((uint64_t{1} << 52) + 1);  // start + pages * 4096 wraps to 0x0
        },
        "wrapping run");
    expect_index_fails([&](PageIndex& i) { run(i)->set_first_page(kBig); }, "first_page");
    expect_index_fails([&](PageIndex& i) { run(i)->set_first_page(run(i)->first_page() + 1); },
                       "first_page+1");
    expect_index_fails(
        [&](PageIndex& i) {
          run(i)->set_kind(run(i)->kind() == PageRun::DATA ? PageRun::ZERO : PageRun::DATA);
        },
        "kind swapped");
    expect_index_fails([&](PageIndex& i) { run(i)->set_kind(static_cast<PageRun::Kind>(7)); },
                       "unknown kind");
    if (r > 0)
      expect_index_fails([&](PageIndex& i) { i.mutable_runs()->SwapElements(r, r - 1); },
                         "unsorted");
  }
  for (int f = 0; f < index_.frame_sizes_size(); ++f) {
    auto set = [&](uint32_t v) { return [f, v](PageIndex& i) { i.set_frame_sizes(f, v); }; };
    const uint32_t size = index_.frame_sizes(f);
    expect_index_fails(set(0), "size 0");
    expect_index_fails(set(UINT32_MAX), "size max");
    expect_index_fails(set(static_cast<uint32_t>(ZSTD_compressBound(kMinFrameSize)) + 1),
                       "size over the bound");
    expect_index_fails(set(size + 1), "+1");
    expect_index_fails(set(size - 1), "-1");
  }
  // A frame running into the index is refused.
  {
    PageIndex idx = index_;
    idx.set_frame_sizes(0, idx.frame_sizes(0) + idx.frame_sizes(1) + idx.frame_sizes(2));
    expect_open_fails(with_index(idx), "frame 0 covers every frame");
  }
  // An unpacked frame_sizes (proto3 parsers accept both encodings) is the same index.
  {
    PageIndex without = index_;
    without.clear_frame_sizes();
    std::string unpacked = without.SerializeAsString();
    for (uint32_t size : index_.frame_sizes()) {
      unpacked += static_cast<char>(8 << 3);  // field 8, varint
      for (uint32_t v = size;; v >>= 7) {
        unpacked += static_cast<char>((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80) break;
      }
    }
    put(with_packed_index(good_.substr(0, index_offset_), compress(unpacked)));
    EXPECT_TRUE(open_and_read_all(path_, segs_));
  }
  // A version-1 index (frames as messages, field 7) has no frame_sizes: refused.
  {
    PageIndex without = index_;
    without.clear_frame_sizes();
    std::string v1 = without.SerializeAsString();
    uint64_t offset = 64;
    for (uint32_t size : index_.frame_sizes()) {
      std::string frame;
      frame += static_cast<char>(1 << 3);  // Frame.offset
      for (uint64_t v = offset;; v >>= 7) {
        frame += static_cast<char>((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80) break;
      }
      frame += static_cast<char>(2 << 3);  // Frame.size
      for (uint64_t v = size;; v >>= 7) {
        frame += static_cast<char>((v & 0x7f) | (v >= 0x80 ? 0x80 : 0));
        if (v < 0x80) break;
      }
      v1 += static_cast<char>((7 << 3) | 2);
      v1 += static_cast<char>(frame.size());
      v1 += frame;
      offset += size;
    }
    expect_open_fails(with_packed_index(good_.substr(0, index_offset_), compress(v1)),
                      "version-1 frames");
  }
  // Two frames that swap sizes still tile the file but no longer match the zstd frames:
  // open() accepts them (the index is consistent); reading must fail cleanly.
  PageIndex idx = index_;
  uint32_t s0 = idx.frame_sizes(0), s1 = idx.frame_sizes(1);
  if (s0 != s1) {
    idx.set_frame_sizes(0, s1);
    idx.set_frame_sizes(1, s0);
    put(with_index(idx));
    EXPECT_FALSE(open_and_read_all(path_, segs_));
  }
}

TEST_F(PageStoreCorruption, AbsurdRefRuns) {
  // Run 3 (3 ZERO pages at 0x100000) turned into a REF run.
  ASSERT_EQ(PageRun::ZERO, index_.runs(3).kind());
  auto as_ref = [this](int32_t pid, uint64_t addr) {
    PageIndex i = index_;
    i.set_zero_pages(i.zero_pages() - i.runs(3).pages());
    i.mutable_runs(3)->set_kind(PageRun::REF);
    i.mutable_runs(3)->set_ref_pid(pid);
    i.mutable_runs(3)->set_ref_addr(addr);
    return i;
  };
  put(with_index(as_ref(7, 0x200000)));
  {
    auto r = PageStoreReader::open(path_);  // the helper is right
    EXPECT_EQ(3u, r->ref_pages());
    EXPECT_EQ(std::vector<int32_t>{7}, r->ref_pids());
  }
  constexpr uint64_t kBig = uint64_t{1} << 63;
  expect_open_fails(with_index(as_ref(0, 0x200000)), "pid 0");
  expect_open_fails(with_index(as_ref(-1, 0x200000)), "pid -1");
  expect_open_fails(with_index(as_ref(INT32_MIN, 0x200000)), "pid min");
  expect_open_fails(with_index(as_ref(7, 0x200008)), "unaligned ref_addr");
  expect_open_fails(with_index(as_ref(7, kUserEnd)), "ref_addr at the end of user space");
  expect_open_fails(with_index(as_ref(7, kUserEnd - kPageSize)), "ref range ends beyond");
  expect_open_fails(with_index(as_ref(7, kBig)), "ref_addr 2^63");
  expect_open_fails(with_index(as_ref(7, UINT64_MAX & ~4095ull)), "ref_addr wraps");
  {
    PageIndex i = as_ref(7, 0x200000);
    i.mutable_runs(3)->set_first_page(1);
    expect_open_fails(with_index(i), "REF with first_page");
  }
  {
    PageIndex i = as_ref(7, 0x200000);
    i.set_zero_pages(index_.zero_pages());
    expect_open_fails(with_index(i), "REF pages counted as ZERO");
  }
  // DATA and ZERO runs name no pid or address.
  for (int r : {0, 1}) {
    expect_index_fails([r](PageIndex& i) { i.mutable_runs(r)->set_ref_pid(7); }, "pid on DATA");
    expect_index_fails([r](PageIndex& i) { i.mutable_runs(r)->set_ref_addr(0x1000); },
                       "addr on ZERO");
  }
}

TEST_F(PageStoreCorruption, BadDataFramesFailOnRead) {
  // Rebuilds the store with frame 0 replaced by `frame0`, without frame digests (a store
  // written before them): zstd's own checks are what is tested here (digests:
  // PageStoreDigests below).
  // Version 2: its other frames recompressed with zstd's content checksum, which version 2
  // requires (version 4 frames go without).
  auto with_frame0 = [&](const std::string& frame0) {
    PageIndex idx = index_;
    idx.clear_frame_sha256();
    std::string rest;
    uint64_t offset = 64 + idx.frame_sizes(0);
    for (int i = 1; i < idx.frame_sizes_size(); ++i) {
      std::string packed = good_.substr(offset, idx.frame_sizes(i));
      offset += idx.frame_sizes(i);
      std::string raw(ZSTD_getFrameContentSize(packed.data(), packed.size()), '\0');
      EXPECT_EQ(raw.size(), ZSTD_decompress(raw.data(), raw.size(), packed.data(), packed.size()));
      std::string again = compress(raw);
      idx.set_frame_sizes(i, static_cast<uint32_t>(again.size()));
      rest += again;
    }
    idx.set_frame_sizes(0, static_cast<uint32_t>(frame0.size()));
    std::string frames = good_.substr(0, 64) + frame0 + rest;
    uint32_t v2 = kPageStoreVersionNoRaw;
    std::memcpy(frames.data() + 8, &v2, 4);
    std::string packed = compress(idx.SerializeAsString());
    return frames + packed + footer(frames.size(), packed.size(), v2);
  };
  // Stream pages 0..3: segment 0's pages 0, 1, 2, 5.
  std::string content;
  for (int p : {0, 1, 2, 5})
    content.append(reinterpret_cast<const char*>(segs_[0].bytes.data()) + p * kPageSize, kPageSize);
  put(with_frame0(compress(content)));
  EXPECT_TRUE(open_and_read_all(path_, segs_));                     // the rebuild itself is right
  EXPECT_FALSE(PageStoreReader::open(path_)->has_frame_digests());  // and says it has none

  auto expect_read_fails = [&](const std::string& bytes, const std::string& what) {
    put(bytes);
    auto r = PageStoreReader::open(path_);  // the index is consistent
    std::vector<unsigned char> buf(kPageSize);
    for (auto call : {std::function<void()>([&] { r->read(0x10000, 1, buf.data()); }),
                      std::function<void()>([&] { r->verify_all(); })}) {
      try {
        call();
        ADD_FAILURE() << "accepted: " << what;
      } catch (const Error& e) {
        std::string msg = e.what();
        EXPECT_EQ(0u, msg.find(path_ + ": frame 0: ")) << msg;
        EXPECT_EQ(std::string::npos, msg.find('\n')) << msg;
      }
    }
    // The other frames still read.
    std::vector<unsigned char> two(2 * kPageSize);
    r->read(0x103000, 2, two.data());
    EXPECT_EQ(0, std::memcmp(two.data(), segs_[2].bytes.data(), two.size()));
  };
  expect_read_fails(with_frame0(compress(content.substr(0, 3 * kPageSize))), "short frame");
  expect_read_fails(with_frame0(compress(content + content)), "long frame");
  expect_read_fails(with_frame0(compress(content, 0)), "no checksum");
  expect_read_fails(with_frame0(compress(content, 1, 0)), "no content size");
  expect_read_fails(with_frame0(compress(content) + compress("")), "two frames");
  std::string bad_sum = compress(content);
  bad_sum.back() = static_cast<char>(bad_sum.back() ^ 1);
  expect_read_fails(with_frame0(bad_sum), "checksum");
  put(with_frame0(bad_sum));
  try {
    PageStoreReader::open(path_)->verify_all();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
  std::string garbage(600, 'x');
  expect_read_fails(with_frame0(garbage), "garbage");
}

TEST_F(PageStoreCorruption, FrameDigestsOfTheWrongLength) {
  ASSERT_EQ(3u * kFrameDigestBytes, index_.frame_sha256().size());
  expect_index_fails([](PageIndex& i) { i.mutable_frame_sha256()->pop_back(); }, "one byte short");
  expect_index_fails([](PageIndex& i) { i.mutable_frame_sha256()->push_back('x'); }, "one more");
  expect_index_fails([](PageIndex& i) { i.mutable_frame_sha256()->resize(2 * kFrameDigestBytes); },
                     "2 of 3");
  expect_index_fails([](PageIndex& i) { i.mutable_frame_sha256()->append(32, 'x'); }, "4 of 3");
  // None at all: a version 4 store's zstd frames have no checksum of their own, so refused
  // (a version 2 store written before digests is accepted: BadDataFramesFailOnRead).
  expect_index_fails([](PageIndex& i) { i.clear_frame_sha256(); }, "none in version 4");
  put(good_);
  EXPECT_TRUE(PageStoreReader::open(path_)->has_frame_digests());
}

// --- Frame digests --------------------------------------------------------------------------

// Frames of incompressible pages are stored raw, so frames of equal page counts have equal
// sizes: frames 1 and 2 swapped on disk are valid zstd frames with valid checksums, in place
// of each other. Only the digests tell; nothing of either reaches the caller.
TEST(PageStoreDigests, FrameChangedOnDiskIsRefusedOnReadWithItsName) {
  TempDir dir;
  const std::string path = dir.file("pages-7.lzp");
  std::vector<Segment> segs{make_segment(0x400000, 16, Fill::kRandom, 77)};  // 4 frames of 4
  PageStoreStats stats = write_store(path, segs, opts(kMinFrameSize));
  ASSERT_EQ(4u, stats.frames);
  std::string good = read_file(path);
  std::vector<uint32_t> sizes;
  {
    auto r = PageStoreReader::open(path);
    EXPECT_TRUE(r->has_frame_digests());
    EXPECT_EQ(4u * kFrameDigestBytes, r->index().frame_sha256().size());
    EXPECT_EQ(stats.mac_digest, r->mac_digest()) << "the writer's digest is the reader's";
    for (uint64_t i = 0; i < 4; ++i) sizes.push_back(static_cast<uint32_t>(r->frame(i).size));
  }
  ASSERT_EQ(sizes[1], sizes[2]);
  const size_t f1 = 64 + sizes[0], f2 = f1 + sizes[1];
  std::string swapped = good;
  swapped.replace(f1, sizes[1], good.substr(f2, sizes[2]));
  swapped.replace(f2, sizes[2], good.substr(f1, sizes[1]));

  auto expect_refused = [&](const std::string& bytes, uint64_t frame, size_t at) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
    auto r = PageStoreReader::open(path);  // the index is the dump's: open() reads no frame
    EXPECT_EQ(stats.mac_digest, r->mac_digest()) << "image.mac cannot see a frame change";
    std::vector<unsigned char> buf(4 * kPageSize, 0xee);
    const uint64_t addr = 0x400000 + frame * 4 * kPageSize;
    for (auto call :
         {std::function<void()>([&] { r->read(addr + kPageSize, 1, buf.data()); }),
          std::function<void()>([&] { r->read(addr, 4, buf.data()); }), std::function<void()>([&] {
            EXPECT_EQ(0u, r->frames_decompressed()) << "it reached zstd";
            r->verify_all();
          })}) {
      try {
        call();
        ADD_FAILURE() << "frame " << frame << " changed on disk was read";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_EQ(0u, msg.find(cat(path, ": frame ", frame, ": its ", sizes[frame],
                                   " bytes at offset ", at, " do not match their SHA-256")))
            << msg;
        EXPECT_EQ(std::string::npos, msg.find('\n')) << msg;
      }
    }
    EXPECT_EQ(std::vector<unsigned char>(4 * kPageSize, 0xee), buf) << "nothing was copied";
    // The frames before it still read, and right.
    r->read(0x400000, 4, buf.data());
    EXPECT_EQ(0, std::memcmp(buf.data(), segs[0].bytes.data(), buf.size()));
  };
  expect_refused(swapped, 1, f1);
  std::string flipped = good;
  flipped[f2 + sizes[2] / 2] ^= 0x40;
  expect_refused(flipped, 2, f2);
}

// What image.mac covers of a store is its header, index and footer: a changed index changes
// it, a changed frame does not (the frame's digest in the index catches that on read).
TEST(PageStoreDigests, MacDigestCoversHeaderIndexAndFooter) {
  TempDir dir;
  const std::string path = dir.file("pages-1.lzp");
  PageStoreStats stats = write_store(path, small_segments(), opts(kMinFrameSize));
  ASSERT_EQ(kFrameDigestBytes, stats.mac_digest.size());
  auto digest_of_file = [&] {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    std::string d = page_store_mac_digest(fd, path, fs::file_size(path));
    ::close(fd);
    return d;
  };
  EXPECT_EQ(stats.mac_digest, digest_of_file());
  const std::string good = read_file(path);
  for (size_t at : {size_t{70}, size_t{0}, good.size() - 40, good.size() - 1}) {
    std::string bad = good;
    bad[at] ^= 1;
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bad;
    if (at == 70)
      EXPECT_EQ(stats.mac_digest, digest_of_file()) << "a frame byte is not covered";
    else if (at == good.size() - 1)
      EXPECT_THROW(digest_of_file(), Error) << "footer magic";
    else
      EXPECT_NE(stats.mac_digest, digest_of_file()) << "byte " << at;
  }
  std::ofstream(path, std::ios::binary | std::ios::trunc) << good.substr(0, 95);
  EXPECT_THROW(digest_of_file(), Error) << "shorter than header and footer";
}

// --- REF runs (fork-shared pages stored once) ----------------------------------------------

// A parent store (pid 100) with DATA and ZERO pages, and a child store whose pages are partly
// its own and partly REF runs to the parent.
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
