#pragma once
// What the page store's unit tests share besides page_fixtures.h: segments of pages of a
// kind, written to a store in varying chunks and checked against what a reader returns.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"

namespace lazycr::image::store_test {

using test::Rng;
using test::TempDir;
namespace fs = std::filesystem;

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
inline void fill_page(unsigned char* p, Fill fill, Rng& rng) {
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

inline Segment make_segment(uint64_t addr, size_t npages, Fill fill, uint64_t seed) {
  Segment s{addr, std::vector<unsigned char>(npages * kPageSize)};
  Rng rng(seed);
  for (size_t i = 0; i < npages; ++i) fill_page(s.bytes.data() + i * kPageSize, fill, rng);
  return s;
}

// Adds each segment in chunks of varying size (1..37 pages) to exercise add_pages calls
// that split runs and frames.
inline PageStoreStats write_store(const std::string& path, const std::vector<Segment>& segs,
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

inline PageStoreOptions opts(uint32_t frame_size, unsigned threads = 2, int level = 1) {
  PageStoreOptions o;
  o.frame_size = frame_size;
  o.threads = threads;
  o.level = level;
  return o;
}

// Reads every segment in one call and page by page; the data must match.
inline void check_all(const PageStoreReader& r, const std::vector<Segment>& segs,
                      size_t stride = 1) {
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

inline uint64_t count_zero_pages(const std::vector<Segment>& segs) {
  uint64_t n = 0;
  for (const Segment& s : segs)
    for (size_t i = 0; i < s.npages(); ++i)
      n += std::all_of(s.bytes.begin() + i * kPageSize, s.bytes.begin() + (i + 1) * kPageSize,
                       [](auto c) { return !c; });
  return n;
}

inline void round_trip(const std::vector<Segment>& segs, const PageStoreOptions& o) {
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

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace lazycr::image::store_test
