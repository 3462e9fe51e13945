// LZ4 frames (page store version 5, `--compress lz4`): the block codec round-trips and names
// every damaged block as an error; a store of LZ4 frames reads back (raw frames mixed in), and
// a damaged LZ4 frame, even one whose digest was forged to match, is an Error on read, never
// wrong pages or a crash.
#include <openssl/sha.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "image-format/lz4_frame.h"
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

std::vector<unsigned char> encode(const std::vector<unsigned char>& in) {
  std::vector<unsigned char> out(lz4_frame_bound(in.size()));
  size_t n = lz4_compress_frame(in.data(), in.size(), out.data(), out.size(), 1);
  EXPECT_GT(n, 0u);
  out.resize(n);
  return out;
}

TEST(Lz4Frame, RoundTrips) {
  for (const std::string kinds : {"tttt", "cccc", "rrrr", "tcrt", "t"}) {
    auto in = test_pages(kinds, 1);
    auto block = encode(in);
    if (kinds.find('r') == std::string::npos) {
      EXPECT_LT(block.size(), in.size() / 2) << kinds;
    }
    std::vector<unsigned char> out(in.size(), 0xaa);
    lz4_decode_frame(block.data(), block.size(), out.data(), out.size(), "f");
    EXPECT_TRUE(out == in) << kinds;
  }
}

TEST(Lz4Frame, ReportsWhatDoesNotFit) {
  auto in = test_pages("rrrr", 2);
  std::vector<unsigned char> out(in.size() / 2);
  EXPECT_EQ(0u, lz4_compress_frame(in.data(), in.size(), out.data(), out.size(), 1));
}

void expect_damaged(const std::vector<unsigned char>& block, size_t expected,
                    const std::string& how) {
  std::vector<unsigned char> out(expected);
  try {
    lz4_decode_frame(block.data(), block.size(), out.data(), out.size(), "pages-1.lzp: frame 3");
    ADD_FAILURE() << how << ": decoded";
  } catch (const Error& e) {
    EXPECT_EQ(0u, std::string(e.what()).find("pages-1.lzp: frame 3: ")) << e.what();
  }
}

TEST(Lz4Frame, DamagedBlocksAreErrors) {
  auto in = test_pages("tctc", 3);
  auto block = encode(in);
  expect_damaged(block, in.size() + kPageSize, "content size larger than recorded");
  expect_damaged(block, in.size() - kPageSize, "content size smaller than recorded");
  expect_damaged({}, in.size(), "empty");
  for (size_t cut = 1; cut < block.size(); cut += 61)
    expect_damaged(std::vector<unsigned char>(block.begin(), block.begin() + cut), in.size(),
                   "truncated at " + std::to_string(cut));
  // Flipped bytes either fail to decode or decode to some bytes of the right size (which the
  // store's SHA-256 over the stored frame refuses before this); never a crash or an overrun.
  std::vector<unsigned char> out(in.size());
  for (size_t at = 0; at < block.size(); ++at) {
    auto bad = block;
    bad[at] ^= static_cast<unsigned char>(0x80 >> (at % 8));
    try {
      lz4_decode_frame(bad.data(), bad.size(), out.data(), out.size(), "f");
    } catch (const Error&) {
    }
  }
  // All 0xff: a literal length that runs past the end of the block.
  expect_damaged(std::vector<unsigned char>(64, 0xff), in.size(), "lengths past the end");
}

constexpr uint64_t kAddr = 0x7f0000000000;

// Frames of 4 pages: text (LZ4), random (raw), compressible (LZ4), 2 text pages (LZ4).
const std::string kMixed = "ttttrrrrcccctt";

PageStoreStats write_lz4(const std::string& path, const std::vector<unsigned char>& data,
                         const std::string& compression = "lz4") {
  PageStoreOptions o;
  o.frame_size = kMinFrameSize;
  o.threads = 2;
  parse_compression(compression, o);
  PageStoreWriter w(path, o);
  w.add_pages(kAddr, data.data(), data.size() / kPageSize);
  return w.finish();
}

TEST(PageStoreLz4, StoresLz4FramesAndReadsThemBack) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages(kMixed, 4);
  PageStoreStats stats = write_lz4(path, data);
  ASSERT_EQ(4u, stats.frames);
  EXPECT_EQ(1u, stats.raw_frames);
  const std::string file = slurp(path);
  EXPECT_EQ(kPageStoreVersionLz4, u32_at(file, 8));
  EXPECT_EQ(kPageStoreVersionLz4, u32_at(file, file.size() - 16));
  auto r = PageStoreReader::open(path);
  EXPECT_EQ(PageIndex::LZ4, r->index().compression());
  for (uint64_t i = 0; i < 4; ++i) {
    auto f = r->frame(i);
    EXPECT_EQ(i == 1, f.raw) << i;
    if (!f.raw) {
      EXPECT_LT(f.size, 4 * kPageSize / 2) << i;
      // An LZ4 block, not a zstd frame.
      EXPECT_NE(0, std::memcmp(file.data() + f.offset, "\x28\xb5\x2f\xfd", 4)) << i;
    }
  }
  std::vector<unsigned char> buf(data.size(), 0xaa);
  r->read(kAddr, data.size() / kPageSize, buf.data());
  EXPECT_TRUE(buf == data);
  for (size_t p = 0; p < kMixed.size(); ++p) {
    std::vector<unsigned char> one(kPageSize, 0xaa);
    r->read(kAddr + p * kPageSize, 1, one.data());
    ASSERT_EQ(0, std::memcmp(one.data(), data.data() + p * kPageSize, kPageSize)) << p;
  }
  r->verify_all();
}

// An acceleration past zstd's level range (the header's level field holds either) is written
// and read back.
TEST(PageStoreLz4, HighAccelerationReadsBack) {
  TempDir dir;
  const std::string path = dir.file("p.lzp");
  auto data = test_pages(kMixed, 4);
  write_lz4(path, data, "lz4:40");
  const std::string file = slurp(path);
  EXPECT_EQ(40u, u32_at(file, 24));
  auto r = PageStoreReader::open(path);
  EXPECT_EQ(40, r->index().level());
  std::vector<unsigned char> buf(data.size(), 0xaa);
  r->read(kAddr, data.size() / kPageSize, buf.data());
  EXPECT_TRUE(buf == data);
}

// The store with its index changed (and its frames' bytes changed by `frames`), footer and
// header at `version`.
class Lz4StoreCorruption : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("p.lzp");
    write_lz4(path_, test_pages(kMixed, 6));
    ASSERT_NO_FATAL_FAILURE(test::read_store_parts(path_, good_));
    index_ = good_.index;
  }

  void store(const PageIndex& idx, const std::string& frames, uint32_t version) {
    std::ofstream(path_, std::ios::binary | std::ios::trunc)
        << test::StoreParts::rebuild(idx, frames, version);
  }

  void expect_open_refused(const PageIndex& idx, uint32_t version, const std::string& what) {
    store(idx, good_.frames(), version);
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

TEST_F(Lz4StoreCorruption, CompressionAndVersionMustAgree) {
  store(index_, good_.frames(), kPageStoreVersionLz4);
  PageStoreReader::open(path_);  // the rebuilt store itself is good
  expect_open_refused(index_, kPageStoreVersion, "LZ4 frames in a version 4 store");
  PageIndex zstd = index_;
  zstd.set_compression(PageIndex::ZSTD);
  expect_open_refused(zstd, kPageStoreVersionLz4, "a version 5 store of zstd frames");
  PageIndex none = index_;
  none.set_compression(PageIndex::NONE);
  expect_open_refused(none, kPageStoreVersionLz4, "a version 5 store of compression none");
}

// A frame changed after the dump whose digest was changed to match (an index not covered by
// a MAC): the LZ4 decoder refuses it or yields pages of the right size, never a crash.
TEST_F(Lz4StoreCorruption, ForgedLz4FrameIsAnErrorOnRead) {
  auto r0 = PageStoreReader::open(path_);
  auto f = r0->frame(0);
  ASSERT_FALSE(f.raw);
  r0.reset();
  size_t errors = 0;
  for (size_t at = 0; at < f.size; at += 7) {
    std::string frames = good_.frames();
    if (at % 2 == 0) {
      frames[f.offset + at] ^= static_cast<char>(0x80 >> (at % 8));
    } else {
      // Every token byte 0xff: lengths that run past the block.
      frames[f.offset + at] = '\xff';
    }
    PageIndex idx = index_;
    std::string digests = idx.frame_sha256();
    SHA256(reinterpret_cast<const unsigned char*>(frames.data() + f.offset), f.size,
           reinterpret_cast<unsigned char*>(digests.data()));
    idx.set_frame_sha256(digests);
    store(idx, frames, kPageStoreVersionLz4);
    auto r = PageStoreReader::open(path_);
    std::vector<unsigned char> buf(4 * kPageSize);
    try {
      r->read(kAddr, 4, buf.data());
    } catch (const Error& e) {
      ++errors;
      EXPECT_NE(std::string::npos, std::string(e.what()).find(": frame 0: damaged lz4 frame"))
          << e.what();
    }
  }
  EXPECT_GT(errors, 0u);
  // Cut short by a byte (the index says so, the digest matches): it cannot decode whole.
  std::string frames = good_.frames();
  frames.erase(f.offset + f.size - 1, 1);
  PageIndex idx = index_;
  idx.set_frame_sizes(0, static_cast<uint32_t>(f.size - 1));
  std::string digests = idx.frame_sha256();
  SHA256(reinterpret_cast<const unsigned char*>(frames.data() + f.offset), f.size - 1,
         reinterpret_cast<unsigned char*>(digests.data()));
  idx.set_frame_sha256(digests);
  store(idx, frames, kPageStoreVersionLz4);
  auto r = PageStoreReader::open(path_);
  std::vector<unsigned char> buf(kPageSize);
  EXPECT_THROW(r->read(kAddr, 1, buf.data()), Error);
  r->read(kAddr + 8 * kPageSize, 1, buf.data());  // frame 2 still reads
}

}  // namespace
}  // namespace lazycr::image
