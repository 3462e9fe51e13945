// DirectPageReader (image-format/page_store_direct.h): the same bytes as PageStoreReader::read
// for every range, whole frames read straight into the output, and a frame damaged after the
// store was opened refused by name, never copied out.
#include "image-format/page_store_direct.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"

namespace lazycr::image {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

constexpr uint64_t kAddr = 0x7f0000000000;
constexpr uint64_t P = kPageSize;

// Page kinds by letter: 'r' random (frames of them are stored raw), 'c' compressible (1 KiB
// random then zeros), 'z' all zero (a ZERO run: not in the stream, so a frame's pages lie on
// both sides of it), '.' not in the store at all.
const std::string kKinds =
    "rrrrcccc"
    "rrzrrccc"
    "cc..cccc"
    "zzzzrrrr"
    "rcrcrcrc"
    "rrrrrrrr"
    "cccz"
    "zcccrrrr"
    "rrc";

std::vector<unsigned char> page_bytes(char kind, uint64_t n) {
  std::vector<unsigned char> out(P, 0);
  const size_t len = kind == 'r' ? P : kind == 'c' ? 1024 : 0;
  uint64_t s = n * 0x9E3779B97F4A7C15ull + 7;
  for (size_t i = 0; i < len; i += 8) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    const uint64_t v = s * 0x2545F4914F6CDD1Dull;
    std::memcpy(out.data() + i, &v, 8);
  }
  return out;
}

void write_store(const std::string& path, PageIndex::Compression compression) {
  PageStoreOptions o;
  o.frame_size = kMinFrameSize;  // 4 pages a frame
  o.threads = 1;
  o.compression = compression;
  if (compression == PageIndex::LZ4) o.level = 1;  // LZ4's acceleration
  o.early_writeback = false;
  PageStoreWriter w(path, o);
  for (uint64_t i = 0; i < kKinds.size(); ++i)
    if (kKinds[i] != '.') w.add_pages(kAddr + i * P, page_bytes(kKinds[i], i).data(), 1);
  w.finish();
}

// Every range of stored pages between two gaps ('.'): direct and cached reads agree.
void expect_same_as_read(const std::string& path) {
  auto store = PageStoreReader::open(path);
  DirectPageReader direct;
  const uint64_t n = kKinds.size();
  for (uint64_t first = 0; first < n; ++first)
    for (uint64_t last = first; last < n; ++last) {
      if (kKinds.find('.', first) <= last) break;
      const uint64_t pages = last - first + 1;
      std::vector<unsigned char> want(pages * P), got(pages * P, 0xee);
      store->read(kAddr + first * P, pages, want.data());
      direct.read(*store, kAddr + first * P, pages, got.data());
      ASSERT_EQ(want, got) << path << ": pages " << first << ".." << last;
    }
  EXPECT_GT(direct.frames_direct(), 0u) << "no whole frame was read straight into the output";
  EXPECT_LE(direct.bytes_loaded(), direct.frames_direct() * kMinFrameSize);  // last: short
  EXPECT_EQ(direct.bytes_loaded() % P, 0u);
}

TEST(PageStoreDirect, SameBytesAsTheCachedReadZstd) {
  TempDir dir;
  write_store(dir.file("pages.lzp"), PageIndex::ZSTD);
  auto s = PageStoreReader::open(dir.file("pages.lzp"));
  ASSERT_GT(s->raw_frame_count(), 0u);
  ASSERT_LT(s->raw_frame_count(), s->frame_count()) << "want raw and zstd frames both";
  expect_same_as_read(dir.file("pages.lzp"));
}

// LZ4 frames (the dump's default) decoded as LZ4, not handed to zstd.
TEST(PageStoreDirect, SameBytesAsTheCachedReadLz4) {
  TempDir dir;
  write_store(dir.file("pages.lzp"), PageIndex::LZ4);
  auto s = PageStoreReader::open(dir.file("pages.lzp"));
  ASSERT_TRUE(s->lz4_frames());
  ASSERT_LT(s->raw_frame_count(), s->frame_count()) << "want LZ4 frames";
  expect_same_as_read(dir.file("pages.lzp"));
}

TEST(PageStoreDirect, SameBytesAsTheCachedReadRaw) {
  TempDir dir;
  write_store(dir.file("pages.lzp"), PageIndex::NONE);
  expect_same_as_read(dir.file("pages.lzp"));
}

// The store's path names another file by the time the direct reader first reads it (the image
// directory replaced under a restore): it still reads the file the store's reader checked.
TEST(PageStoreDirect, ReadsTheFileTheStoreOpenedNotThePath) {
  TempDir dir;
  const std::string path = dir.file("pages.lzp");
  write_store(path, PageIndex::ZSTD);
  auto store = PageStoreReader::open(path);
  std::vector<unsigned char> want(kKinds.size() * P);
  store->read(kAddr, 8, want.data());
  ASSERT_EQ(0, ::rename(path.c_str(), dir.file("old.lzp").c_str()));
  write_store(path, PageIndex::NONE);  // another store (other frames, other size) at the path
  DirectPageReader direct;
  std::vector<unsigned char> got(8 * P, 0xee);
  direct.read(*store, kAddr, 8, got.data());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin()));
  EXPECT_GT(direct.frames_direct(), 0u);
}

TEST(PageStoreDirect, PagesNotInTheStoreAreRefusedLikeRead) {
  TempDir dir;
  write_store(dir.file("pages.lzp"), PageIndex::ZSTD);
  auto store = PageStoreReader::open(dir.file("pages.lzp"));
  DirectPageReader direct;
  std::vector<unsigned char> buf(kKinds.size() * P);
  EXPECT_THROW(direct.read(*store, kAddr, kKinds.size(), buf.data()), Error);  // the gap
  EXPECT_THROW(direct.read(*store, kAddr + 3, 1, buf.data()), Error);          // unaligned
}

// A frame damaged after open (a raw one and a zstd one): the read throws naming the store, the
// frame and the digest; the whole frame is read straight into the output, so nothing else
// (the frame cache) stands between the file and the caller.
TEST(PageStoreDirect, DamagedFrameIsRefusedByName) {
  for (auto compression : {PageIndex::NONE, PageIndex::ZSTD, PageIndex::LZ4}) {
    TempDir dir;
    const std::string path = dir.file("pages.lzp");
    write_store(path, compression);
    auto store = PageStoreReader::open(path);
    // A whole frame of 4 DATA pages, raw (NONE) or zstd (ZSTD), with 8 stored pages from it.
    const bool want_raw = compression == PageIndex::NONE;
    uint64_t page = 0, frame = 0;
    bool found = false;
    for (uint64_t i = 0; i + 8 <= kKinds.size() && !found; ++i) {
      const auto loc = store->find(kAddr + i * P);
      if (!loc || loc->kind != PageRun::DATA || loc->stream_page % 4 != 0) continue;
      if (kKinds.substr(i, 4).find_first_of(".z") != std::string::npos) continue;
      if (kKinds.substr(i, 8).find('.') != std::string::npos) continue;
      frame = loc->stream_page / 4;
      page = i;
      found = store->frame(frame).raw == want_raw;
    }
    ASSERT_TRUE(found) << "no such frame in the test store, compression " << compression;
    const auto info = store->frame(frame);
    {
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(info.offset + info.size / 2));
      f.put('\x5a').put('\x17');
    }
    DirectPageReader direct;
    std::vector<unsigned char> buf(8 * P);
    try {
      direct.read(*store, kAddr + page * P, 8, buf.data());
      ADD_FAILURE() << "a damaged frame was read, compression " << compression;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path + ": frame " + std::to_string(frame)), std::string::npos) << what;
      EXPECT_NE(what.find("SHA-256"), std::string::npos) << what;
    }
    EXPECT_EQ(direct.frames_direct(), 0u);
  }
}

// Whole frames are checked two at a time (check_frame_pair), a last odd one alone: a damaged
// frame is named whether it is the first or the second of a pair or the one left over, and no
// frame of a failed pair is decoded.
TEST(PageStoreDirect, DamagedFrameIsNamedWhereverItIsInAPair) {
  for (const uint64_t damaged : {0, 1, 2}) {
    TempDir dir;
    const std::string path = dir.file("pages.lzp");
    PageStoreOptions o;
    o.frame_size = kMinFrameSize;  // 4 pages a frame: 12 pages are frames 0 and 1 (a pair), 2
    o.threads = 1;
    o.compression = PageIndex::LZ4;
    o.level = 1;
    o.early_writeback = false;
    {
      PageStoreWriter w(path, o);
      for (uint64_t i = 0; i < 12; ++i) w.add_pages(kAddr + i * P, page_bytes('c', i).data(), 1);
      w.finish();
    }
    auto store = PageStoreReader::open(path);
    ASSERT_EQ(store->frame_count(), 3u);
    ASSERT_EQ(store->raw_frame_count(), 0u);
    const auto info = store->frame(damaged);
    {
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(info.offset + info.size / 2));
      f.put('\x5a').put('\x17');
    }
    DirectPageReader direct;
    std::vector<unsigned char> buf(12 * P);
    try {
      direct.read(*store, kAddr, 12, buf.data());
      ADD_FAILURE() << "damaged frame " << damaged << " was read";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path + ": frame " + std::to_string(damaged) + ": its "),
                std::string::npos)
          << what;
      EXPECT_NE(what.find("SHA-256"), std::string::npos) << what;
    }
    EXPECT_EQ(direct.frames_direct(), damaged == 2 ? 2u : 0u) << damaged;
    // The reader is usable again: the sound frames read right.
    std::vector<unsigned char> want(4 * P), got(4 * P);
    const uint64_t sound = damaged == 0 ? 1 : 0;
    store->read(kAddr + sound * 4 * P, 4, want.data());
    direct.read(*store, kAddr + sound * 4 * P, 4, got.data());
    EXPECT_EQ(want, got);
  }
}

}  // namespace
}  // namespace lazycr::image
