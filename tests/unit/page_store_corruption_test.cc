// Page store: a reader that refuses every corrupt file with a clean Error (no crash, hang or
// out-of-bounds read; these tests also run under ASan/UBSan), and the frames' digests.
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
}  // namespace
}  // namespace lazycr::image
