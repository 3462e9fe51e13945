// Raw frames (page store version 3) and --compress: frames zstd does not shrink are stored as
// they are, every frame with compression none; the reader serves them, checks them against
// their digests, and refuses an index that misdescribes them.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "common/error.h"
#include "image-format/page_store.h"
#include "tests/unit/page_fixtures.h"
#include "tests/unit/store_parts.h"

namespace lazycr::image {
namespace {

namespace fs = std::filesystem;
using test::slurp;
using test::TempDir;
using test::test_pages;
using test::u32_at;

constexpr uint64_t kAddr = 0x7f0000000000;

PageStoreStats write(const std::string& path, const std::vector<unsigned char>& data,
                     PageIndex::Compression compression, uint32_t frame_size = kMinFrameSize) {
  PageStoreOptions o;
  o.frame_size = frame_size;
  o.threads = 2;
  o.compression = compression;
  PageStoreWriter w(path, o);
  w.add_pages(kAddr, data.data(), data.size() / kPageSize);
  return w.finish();
}

void expect_reads_back(const PageStoreReader& r, const std::vector<unsigned char>& data) {
  std::vector<unsigned char> buf(data.size(), 0xaa);
  r.read(kAddr, data.size() / kPageSize, buf.data());
  EXPECT_TRUE(buf == data);
  for (size_t p = 0; p < data.size() / kPageSize; ++p) {  // page by page, through the cache
    std::vector<unsigned char> one(kPageSize, 0xaa);
    r.read(kAddr + p * kPageSize, 1, one.data());
    ASSERT_EQ(0, std::memcmp(one.data(), data.data() + p * kPageSize, kPageSize)) << p;
  }
}

// Frames of 4 pages: random (raw), compressible (zstd), random (raw), 2 random pages (raw:
// too small for the probe, zstd finds nothing).
const std::string kMixed = "rrrrccccrrrrrr";

TEST(PageStoreRawFrames, IncompressibleFramesAreStoredRawAndReadBack) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages(kMixed, 1);
  PageStoreStats stats = write(path, data, PageIndex::ZSTD);
  ASSERT_EQ(4u, stats.frames);
  EXPECT_EQ(3u, stats.raw_frames);
  const std::string file = slurp(path);
  EXPECT_EQ(kPageStoreVersion, u32_at(file, 8));
  EXPECT_EQ(kPageStoreVersion, u32_at(file, file.size() - 16));

  auto r = PageStoreReader::open(path);
  EXPECT_EQ(3u, r->raw_frame_count());
  EXPECT_EQ(PageIndex::ZSTD, r->index().compression());
  for (uint64_t i = 0; i < 4; ++i) {
    auto f = r->frame(i);
    EXPECT_EQ(i != 1, f.raw) << i;
    if (f.raw) {
      EXPECT_EQ(i == 3 ? 2 * kPageSize : 4 * kPageSize, f.size) << "raw: its pages as they are";
      // A raw frame is its pages, byte for byte, at its offset.
      size_t first = i * 4;
      EXPECT_EQ(0, std::memcmp(file.data() + f.offset, data.data() + first * kPageSize, f.size));
    } else {
      EXPECT_LT(f.size, 4 * kPageSize / 2);
      // Version 4: no XXH64 content checksum (bit 2 of the frame header descriptor); the
      // frame's SHA-256 digest checks it.
      EXPECT_EQ(0, file[f.offset + 4] & 0x04) << "zstd frame " << i << " has a checksum";
    }
  }
  expect_reads_back(*r, data);
  EXPECT_EQ(4u, r->frames_decompressed());  // each frame loaded once, raw or not
  r->verify_all();
}

TEST(PageStoreRawFrames, CompressibleStoreHasNoRawFrameBitmap) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages("cccccccc", 2);
  PageStoreStats stats = write(path, data, PageIndex::ZSTD);
  EXPECT_EQ(0u, stats.raw_frames);
  const std::string file = slurp(path);
  EXPECT_EQ(kPageStoreVersion, u32_at(file, 8));
  auto r = PageStoreReader::open(path);
  EXPECT_EQ(0u, r->raw_frame_count());
  EXPECT_TRUE(r->index().raw_frames().empty());
  expect_reads_back(*r, data);
}

TEST(PageStoreRawFrames, CompressionNoneStoresEveryFrameRaw) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages("cccccccccccccccccc" + kMixed, 3);
  PageStoreStats stats = write(path, data, PageIndex::NONE);
  EXPECT_EQ(stats.frames, stats.raw_frames);
  auto r = PageStoreReader::open(path);
  EXPECT_EQ(PageIndex::NONE, r->index().compression());
  EXPECT_EQ(r->frame_count(), r->raw_frame_count());
  uint64_t bytes = 0;
  for (uint64_t i = 0; i < r->frame_count(); ++i) bytes += r->frame(i).size;
  EXPECT_EQ(data.size(), bytes);
  expect_reads_back(*r, data);
}

TEST(PageStoreRawFrames, CheckFrameVouchesForBytesReadFromTheFile) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages(kMixed, 4);
  write(path, data, PageIndex::ZSTD);
  auto r = PageStoreReader::open(path);
  const std::string file = slurp(path);
  for (uint64_t i = 0; i < r->frame_count(); ++i) {
    auto f = r->frame(i);
    std::string bytes = file.substr(f.offset, f.size);
    r->check_frame(i, bytes.data(), bytes.size());
    bytes[bytes.size() / 2] ^= 1;
    EXPECT_THROW(r->check_frame(i, bytes.data(), bytes.size()), Error) << i;
    EXPECT_THROW(r->check_frame(i, bytes.data(), bytes.size() - 1), Error) << i;
  }
  EXPECT_THROW(r->check_frame(r->frame_count(), file.data(), 1), Error);
}

TEST(PageStoreRawFrames, EveryFlippedByteOfARawFrameIsRefused) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages(kMixed, 5);
  write(path, data, PageIndex::ZSTD);
  const std::string good = slurp(path);
  PageStoreReader::FrameInfo f0 = PageStoreReader::open(path)->frame(0);
  ASSERT_TRUE(f0.raw);
  for (uint64_t at = f0.offset; at < f0.offset + f0.size; at += 97) {
    std::string bad = good;
    bad[at] ^= static_cast<char>(1 << (at % 8));
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bad;
    auto r = PageStoreReader::open(path);
    std::vector<unsigned char> buf(kPageSize);
    try {
      r->read(kAddr, 1, buf.data());
      ADD_FAILURE() << "flip at " << at << " read without an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string::npos, std::string(e.what()).find("do not match their SHA-256"))
          << e.what();
    }
  }
}

// The good store's index, changed, with the footer and header versions as given.
class RawIndexCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("p.lzp");
    write(path_, test_pages(kMixed, 6), PageIndex::ZSTD);
    ASSERT_NO_FATAL_FAILURE(test::read_store_parts(path_, good_));
    index_ = good_.index;
    ASSERT_EQ(std::string(1, '\x0d'), index_.raw_frames());  // frames 0, 2, 3
  }

  std::string with_index(const PageIndex& idx, uint32_t version) const {
    return test::StoreParts::rebuild(idx, good_.frames(), version);
  }

  void expect_refused(const std::function<void(PageIndex&)>& change, const std::string& what,
                      uint32_t version = kPageStoreVersion) {
    PageIndex idx = index_;
    change(idx);
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << with_index(idx, version);
    try {
      PageStoreReader::open(path_);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_EQ(0u, std::string(e.what()).find(path_ + ": ")) << e.what();
    }
  }

  TempDir dir_;
  std::string path_;
  test::StoreParts good_;
  PageIndex index_;
};

TEST_F(RawIndexCorruption, RebuiltGoodIndexOpens) {
  std::ofstream(path_, std::ios::binary | std::ios::trunc) << with_index(index_, kPageStoreVersion);
  EXPECT_EQ(3u, PageStoreReader::open(path_)->raw_frame_count());
}

TEST_F(RawIndexCorruption, MisdescribedRawFramesAreRefused) {
  expect_refused([](PageIndex& i) { i.clear_raw_frames(); }, "version 3 without raw frames",
                 kPageStoreVersionRaw);
  expect_refused([](PageIndex& i) { i.set_raw_frames(std::string(1, '\0')); },
                 "a raw frame bitmap with no bit set");
  expect_refused([](PageIndex&) {}, "raw frames in a version 2 store", kPageStoreVersionNoRaw);
  expect_refused([](PageIndex& i) { i.set_raw_frames(std::string("\x0d\x00", 2)); }, "long bitmap");
  expect_refused([](PageIndex& i) { i.set_raw_frames(std::string("\x1d", 1)); },
                 "bit past the end");
  expect_refused([](PageIndex& i) { i.set_raw_frames(std::string("\x0f", 1)); },
                 "a zstd frame said raw (its size is not its pages')");
  expect_refused([](PageIndex& i) { i.clear_frame_sha256(); }, "raw frames without digests");
  expect_refused([](PageIndex& i) { i.set_compression(PageIndex::NONE); },
                 "compression none with a zstd frame");
  expect_refused([](PageIndex& i) { i.set_compression(static_cast<PageIndex::Compression>(7)); },
                 "unknown compression");
  expect_refused([](PageIndex&) {}, "version 5", kPageStoreVersion + 1);
}

// A raw frame said zstd has a size open() cannot tell from a zstd frame's: reading it is a
// clean Error (its digest still matches; zstd refuses its header), never wrong pages.
TEST_F(RawIndexCorruption, RawFrameSaidZstdFailsOnRead) {
  PageIndex idx = index_;
  idx.set_raw_frames(std::string("\x0c", 1));  // frame 0 no longer raw
  std::ofstream(path_, std::ios::binary | std::ios::trunc) << with_index(idx, kPageStoreVersion);
  auto r = PageStoreReader::open(path_);
  std::vector<unsigned char> buf(kPageSize);
  EXPECT_THROW(r->read(kAddr, 1, buf.data()), Error);
  r->read(kAddr + 4 * kPageSize, 1, buf.data());  // frame 1, a zstd frame, still reads
}

// Pages read straight into the writer's frames (frame_room, add_pages_in_place: the dump's
// path) give the same store, byte for byte, as the same pages copied in by add_pages: zero
// pages among them move the later pages down, ranges split across frames.
TEST(PageStoreInPlace, SameStoreAsCopiedPages) {
  TempDir dir;
  const std::string kinds =
      "cczcrzzcccczrccccrzc"
      "zzzzzc";  // 'z': zero page
  auto data = test_pages(kinds, 8);
  const size_t npages = kinds.size();
  for (auto compression : {PageIndex::ZSTD, PageIndex::LZ4}) {
    PageStoreOptions o;
    o.frame_size = kMinFrameSize;
    o.threads = 2;
    o.compression = compression;
    if (compression == PageIndex::LZ4) o.level = kLz4Acceleration;
    {
      PageStoreWriter w(dir.file("copied.lzp"), o);
      w.add_pages(kAddr, data.data(), 7);
      w.add_pages(kAddr + 9 * kPageSize, data.data() + 9 * kPageSize, npages - 9);
      w.finish();
    }
    {
      PageStoreWriter w(dir.file("in-place.lzp"), o);
      // Two ranges, as the dump reads them: [0, 7) and [9, npages), 3 pages per room at most.
      for (auto [first, end] : {std::pair<size_t, size_t>{0, 7}, {9, npages}}) {
        size_t p = first;
        while (p < end) {
          PageStoreWriter::Room room = w.frame_room(3);
          ASSERT_GE(room.pages, 1u);
          size_t n = std::min(room.pages, end - p);
          // Two calls per room when it can: the second's pages lie after the first's.
          size_t half = n / 2;
          std::memcpy(room.data, data.data() + p * kPageSize, n * kPageSize);
          w.add_pages_in_place(kAddr + p * kPageSize, room.data, half);
          w.add_pages_in_place(kAddr + (p + half) * kPageSize, room.data + half * kPageSize,
                               n - half);
          p += n;
        }
      }
      w.finish();
    }
    EXPECT_EQ(slurp(dir.file("copied.lzp")), slurp(dir.file("in-place.lzp")))
        << PageIndex::Compression_Name(compression);
    auto r = PageStoreReader::open(dir.file("in-place.lzp"));
    std::vector<unsigned char> buf(7 * kPageSize);
    r->read(kAddr, 7, buf.data());
    EXPECT_EQ(0, std::memcmp(buf.data(), data.data(), buf.size()));
  }
}

// One read into several frames (frame_rooms: the current frame's room, then lent empty
// frames): zero pages move later pages down, across frames, and the store is the same, byte
// for byte, as with the pages copied in; frames lent but not reached are taken back.
TEST(PageStoreInPlace, ReadsIntoLentFramesGiveTheSameStore) {
  TempDir dir;
  std::string kinds;
  for (int i = 0; i < 5; ++i) kinds += "cczcrzzcccczrccccrzczzzzzcztccc";
  auto data = test_pages(kinds, 11);
  const size_t npages = kinds.size();
  const std::pair<size_t, size_t> kRanges[] = {{0, 23}, {25, 26}, {29, npages}};
  for (auto compression : {PageIndex::ZSTD, PageIndex::LZ4}) {
    PageStoreOptions o;
    o.frame_size = kMinFrameSize;
    o.threads = 2;
    o.compression = compression;
    if (compression == PageIndex::LZ4) o.level = kLz4Acceleration;
    {
      PageStoreWriter w(dir.file("copied.lzp"), o);
      for (auto [first, end] : kRanges)
        w.add_pages(kAddr + first * kPageSize, data.data() + first * kPageSize, end - first);
      w.finish();
    }
    for (size_t max_pages : {size_t{1}, size_t{5}, size_t{11}, size_t{64}}) {
      {
        PageStoreWriter w(dir.file("in-place.lzp"), o);
        std::vector<PageStoreWriter::Room> rooms;
        for (auto [first, end] : kRanges) {
          size_t p = first;
          while (p < end) {
            w.frame_rooms(max_pages, rooms);
            size_t total = 0;
            for (const auto& r : rooms) total += r.pages;
            ASSERT_EQ(max_pages, total);
            // Fill the rooms in order from p, as one process_vm_readv would, then hand the
            // pages over room by room (a room's pages in two calls when it has two).
            for (size_t k = 0; k < rooms.size() && p < end; ++k) {
              size_t n = std::min(rooms[k].pages, end - p);
              std::memcpy(rooms[k].data, data.data() + p * kPageSize, n * kPageSize);
              size_t half = n / 2;
              if (half > 0) w.add_pages_in_place(kAddr + p * kPageSize, rooms[k].data, half);
              w.add_pages_in_place(kAddr + (p + half) * kPageSize, rooms[k].data + half * kPageSize,
                                   n - half);
              p += n;
            }
          }
        }
        w.finish();
      }
      EXPECT_EQ(slurp(dir.file("copied.lzp")), slurp(dir.file("in-place.lzp")))
          << PageIndex::Compression_Name(compression) << " max_pages " << max_pages;
    }
  }
}

// A lent frame's pages go in order: once pages of a later room are taken, an earlier room's
// are refused; so are pages outside every room.
TEST(PageStoreInPlace, LentRoomsAreTakenInOrder) {
  TempDir dir;
  PageStoreOptions o;
  o.frame_size = kMinFrameSize;
  o.threads = 1;
  PageStoreWriter w(dir.file("p.lzp"), o);
  auto data = test_pages("cccccccccccc", 12);
  std::vector<PageStoreWriter::Room> rooms;
  w.frame_rooms(12, rooms);
  ASSERT_EQ(3u, rooms.size());
  for (size_t k = 0; k < 3; ++k)
    std::memcpy(rooms[k].data, data.data() + k * 4 * kPageSize, 4 * kPageSize);
  EXPECT_THROW(w.add_pages_in_place(kAddr, data.data(), 1), Error) << "not in a room";
  w.add_pages_in_place(kAddr + 8 * kPageSize, rooms[2].data, 1);  // rooms 0 and 1 skipped
  EXPECT_THROW(w.add_pages_in_place(kAddr + 9 * kPageSize, rooms[1].data, 1), Error)
      << "an earlier room";
  EXPECT_THROW(w.add_pages_in_place(kAddr + 9 * kPageSize, rooms[2].data, 1), Error)
      << "already taken";
  w.add_pages_in_place(kAddr + 9 * kPageSize, rooms[2].data + kPageSize, 3);
  w.finish();
  auto r = PageStoreReader::open(dir.file("p.lzp"));
  std::vector<unsigned char> buf(4 * kPageSize);
  r->read(kAddr + 8 * kPageSize, 4, buf.data());
  EXPECT_EQ(0, std::memcmp(buf.data(), data.data() + 8 * kPageSize, buf.size()));
}

TEST(PageStoreInPlace, PagesOutsideTheRoomAreRefused) {
  TempDir dir;
  PageStoreOptions o;
  o.frame_size = kMinFrameSize;
  o.threads = 1;
  PageStoreWriter w(dir.file("p.lzp"), o);
  auto data = test_pages("cccc", 9);
  PageStoreWriter::Room room = w.frame_room(64);
  EXPECT_EQ(kMinFrameSize / kPageSize, room.pages) << "at most what the frame has left";
  EXPECT_THROW(w.add_pages_in_place(kAddr, data.data(), 1), Error) << "not in the room";
  EXPECT_THROW(w.add_pages_in_place(kAddr, room.data, room.pages + 1), Error) << "past it";
  std::memcpy(room.data, data.data(), kPageSize);
  w.add_pages_in_place(kAddr, room.data, 1);
  EXPECT_THROW(w.add_pages_in_place(kAddr + kPageSize, room.data, 1), Error) << "already taken";
}

TEST(PageStoreCompression, ParsesTheCompressOption) {
  PageStoreOptions o;
  parse_compression("none", o);
  EXPECT_EQ(PageIndex::NONE, o.compression);
  EXPECT_EQ("none", compression_name(o));
  parse_compression("zstd:-3", o);
  EXPECT_EQ(PageIndex::ZSTD, o.compression);
  EXPECT_EQ(-3, o.level);
  EXPECT_EQ("zstd:-3", compression_name(o));
  parse_compression("zstd", o);
  EXPECT_EQ(kDefaultLevel, o.level);
  parse_compression("zstd:19", o);
  EXPECT_EQ(19, o.level);
  parse_compression("lz4", o);
  EXPECT_EQ(PageIndex::LZ4, o.compression);
  EXPECT_EQ(kLz4Acceleration, o.level);
  EXPECT_EQ("lz4", compression_name(o));
  parse_compression("lz4:3", o);
  EXPECT_EQ(PageIndex::LZ4, o.compression);
  EXPECT_EQ(3, o.level);
  EXPECT_EQ("lz4:3", compression_name(o));
  parse_compression("lz4:1", o);
  EXPECT_EQ("lz4", compression_name(o));
  parse_compression("auto", o);
  EXPECT_TRUE(o.auto_codec);
  EXPECT_EQ(PageIndex::LZ4, o.compression);
  EXPECT_EQ("auto", compression_name(o));
  parse_compression("zstd:2", o);
  EXPECT_FALSE(o.auto_codec);
  for (const char* bad :
       {"", "zstd:", "zstd:0", "zstd:x", "zstd:1x", "zstd:23", "zstd:-9999999", "zstd:99999999999",
        "lz4:", "lz4:0", "lz4:-1", "lz4:65", "lz4:2x", "none:1", "auto:1", "LZ4", "NONE", "zstd: 1"}) {
    PageStoreOptions before;
    EXPECT_THROW(parse_compression(bad, before), Error) << bad;
  }
}

}  // namespace
}  // namespace lazycr::image
