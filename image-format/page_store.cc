// The page store; the layout and every bound the reader enforces are in FORMAT.md.
#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_getFrameHeader
#include "image-format/page_store.h"
#include "image-format/lz4_frame.h"
#include "image-format/sha256_load.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <initializer_list>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <google/protobuf/arena.h>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/regular_file.h"

#include "image-format/page_store_internal.h"
#include "image-format/sha256_pair.h"

namespace lazycr::image {
namespace {

using namespace store_detail;

// Checks a zstd frame in [data, data + size) before it is decompressed: one real frame that
// fills the whole range, with a content checksum if and only if `checksum` (index frames, and
// every frame of stores before version 4), no dictionary and a known content size.
// Returns the content size.
uint64_t check_zstd_frame(const unsigned char* data, size_t size, bool checksum,
                          const std::string& what) {
  ZSTD_frameHeader zfh;
  size_t r = ZSTD_getFrameHeader(&zfh, data, size);
  if (ZSTD_isError(r)) fail(what, ": bad zstd frame header: ", ZSTD_getErrorName(r));
  if (r != 0) fail(what, ": zstd frame header is truncated");
  if (zfh.frameType != ZSTD_frame) fail(what, ": is a skippable zstd frame");
  // Bit 4 of the frame header descriptor is "unused" in the zstd format (decoders ignore it);
  // this format requires it to be zero so that no bit of a frame header goes unchecked.
  if (data[4] & 0x10) fail(what, ": unused bit of the zstd frame header is set");
  if (checksum && !zfh.checksumFlag) fail(what, ": zstd frame has no content checksum");
  if (!checksum && zfh.checksumFlag)
    fail(what, ": zstd frame has a content checksum, which a version 4 store does not write");
  if (zfh.dictID != 0) fail(what, ": zstd frame needs dictionary ", zfh.dictID);
  if (zfh.frameContentSize == ZSTD_CONTENTSIZE_UNKNOWN)
    fail(what, ": zstd frame does not record its content size");
  size_t csize = ZSTD_findFrameCompressedSize(data, size);
  if (ZSTD_isError(csize)) fail(what, ": corrupt zstd frame: ", ZSTD_getErrorName(csize));
  if (csize != size) fail(what, ": zstd frame is ", csize, " bytes but ", size, " are recorded");
  return zfh.frameContentSize;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Reader

struct PageStoreReader::Impl {
  struct FrameData {
    std::unique_ptr<unsigned char[]> bytes;
    size_t size = 0;
  };
  using FramePtr = std::shared_ptr<const FrameData>;

  std::string path;
  UniqueFd fd;
  uint64_t file_size = 0;
  // What open() costs grows with the memory it touches for the first time (4-10 us a page in
  // our VMs), so the index is kept once, on an arena (one PageRun per run in a few large
  // blocks instead of a heap allocation each), with two small lookup tables beside it.
  google::protobuf::Arena arena{arena_options()};
  PageIndex* index = google::protobuf::Arena::CreateMessage<PageIndex>(&arena);
  std::vector<uint64_t> run_starts;  // runs(i).start(): the binary search touches only these
  // File offset of frames 0, kFrameStride, 2 * kFrameStride, ...; the others are found by
  // adding at most kFrameStride - 1 sizes from index->frame_sizes().
  static constexpr uint64_t kFrameStride = 16;
  std::vector<uint64_t> frame_strides;
  uint64_t nframes = 0;
  uint64_t frame_pages = 0;
  uint64_t data_pages = 0;
  uint64_t ref_pages = 0;
  std::vector<int32_t> ref_pids;  // distinct, sorted
  std::string mac_digest;         // page_store_mac_digest() of what open() parsed
  bool has_frame_digests = false;
  uint32_t version = 0;
  uint64_t raw_count = 0;  // frames stored raw (index->raw_frames())
  bool lz4 = false;        // the frames that are not raw are LZ4 blocks, not zstd frames
  size_t cache_frames = 1;
  // Set by link_refs() before any read(), constant afterwards.
  std::map<int32_t, std::shared_ptr<const PageStoreReader>> linked;
  bool refs_linked = false;
  // Incremental images: PARENT pages; whether index->page_hashes() holds a digest per
  // stream page.
  uint64_t parent_pages = 0;
  bool has_page_hashes = false;
  // Set by link_parent() before any read(): every PARENT range, resolved through the whole
  // chain to the store whose DATA, ZERO or REF run holds it (same address in every link).
  struct Source {
    uint64_t start;
    uint64_t pages;
    const Impl* store;
    PageRun::Kind kind;   // DATA, ZERO or REF in `store`
    uint64_t first_page;  // DATA: stream page of `start` in `store`
  };
  std::vector<Source> sources;  // sorted by start, not overlapping
  std::vector<uint64_t> source_starts;
  std::shared_ptr<const PageStoreReader> parent;
  bool parent_linked = false;

  // LRU cache of decompressed frames, most recent first, and spare decompression contexts.
  mutable std::mutex mu;
  mutable std::list<std::pair<uint64_t, FramePtr>> lru;
  mutable std::unordered_map<uint64_t, std::list<std::pair<uint64_t, FramePtr>>::iterator> cached;
  mutable std::vector<ZSTD_DCtx*> dctxs;

  mutable std::atomic<uint64_t> frames_decompressed{0};
  mutable std::atomic<uint64_t> bytes_decompressed{0};

  ~Impl() {
    for (ZSTD_DCtx* d : dctxs) ZSTD_freeDCtx(d);
  }

  static google::protobuf::ArenaOptions arena_options() {
    google::protobuf::ArenaOptions o;
    o.start_block_size = 4096;
    o.max_block_size = 1 << 20;  // a 64 KiB-run index takes a few big blocks, not thousands
    return o;
  }

  template <typename... Args>
  [[noreturn]] void bad(const Args&... args) const {
    fail(path, ": ", args...);
  }

  void open(MetadataBudget* budget) {
    fd = open_regular_file(path, "page store", &file_size);
    if (file_size < kHeaderSize + kFooterSize)
      bad("file is ", file_size, " bytes, smaller than a header and a footer (",
          kHeaderSize + kFooterSize, ")");

    unsigned char header[kHeaderSize];
    pread_all(fd.get(), header, kHeaderSize, 0, path);
    if (std::memcmp(header, kHeaderMagic, 8) != 0) bad("bad header magic (not a page store)");
    version = get_u32(header + 8);
    if (version != kPageStoreVersion && version != kPageStoreVersionRaw &&
        version != kPageStoreVersionNoRaw && version != kPageStoreVersionLz4)
      bad("header has version ", version, ", this build reads versions ", kPageStoreVersionNoRaw,
          " to ", kPageStoreVersionLz4);
    uint32_t header_size = get_u32(header + 12);
    if (header_size != kHeaderSize) bad("header size is ", header_size, ", expected ", kHeaderSize);
    uint32_t page_size = get_u32(header + 16);
    if (page_size != kPageSize) bad("page size is ", page_size, ", expected ", kPageSize);
    uint32_t fp = get_u32(header + 20);
    if (fp < kMinFramePages || fp > kMaxFramePages)
      bad("header frame_pages is ", fp, ", outside [", kMinFramePages, ", ", kMaxFramePages, "]");
    frame_pages = fp;
    int32_t level = static_cast<int32_t>(get_u32(header + 24));
    if (version == kPageStoreVersionLz4) {
      if (level < 1 || level > kLz4MaxAcceleration)
        bad("header lz4 acceleration ", level, " is outside [1, ", kLz4MaxAcceleration, "]");
    } else if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel()) {
      bad("header zstd level ", level, " is outside [", ZSTD_minCLevel(), ", ", ZSTD_maxCLevel(),
          "]");
    }
    for (size_t i = 28; i < kHeaderSize; ++i)
      if (header[i] != 0) bad("reserved header byte ", i, " is not zero");

    unsigned char footer[kFooterSize];
    uint64_t footer_offset = file_size - kFooterSize;
    pread_all(fd.get(), footer, kFooterSize, footer_offset, path);
    if (std::memcmp(footer + 24, kFooterMagic, 8) != 0)
      bad("bad footer magic (truncated or not a page store)");
    uint32_t fversion = get_u32(footer + 16);
    if (fversion != version) bad("footer has version ", fversion, ", the header ", version);
    if (get_u32(footer + 20) != 0) bad("reserved footer field is not zero");
    uint64_t index_offset = get_u64(footer);
    uint64_t index_size = get_u64(footer + 8);
    if (index_offset < kHeaderSize || index_offset > footer_offset)
      bad("index offset ", index_offset, " is outside [", kHeaderSize, ", ", footer_offset, "]");
    if (index_size == 0 || index_size != footer_offset - index_offset)
      bad("index size ", index_size, " does not fill the ", footer_offset - index_offset,
          " bytes between index offset ", index_offset, " and the footer");

    // index_size <= file size, so this allocation is bounded by what is on disk.
    std::vector<unsigned char> packed(index_size);
    pread_all(fd.get(), packed.data(), packed.size(), index_offset, path);
    mac_digest = sha256_string(
        {{header, kHeaderSize}, {packed.data(), packed.size()}, {footer, kFooterSize}});
    std::string what = cat(path, ": index");
    uint64_t raw_size = check_zstd_frame(packed.data(), packed.size(), true, what);
    if (raw_size > kMaxIndexBytes)
      bad("index claims ", raw_size, " bytes decompressed, more than the limit of ",
          kMaxIndexBytes);
    if (budget != nullptr) budget->take_decoded(what, raw_size);
    std::vector<unsigned char> raw(raw_size);
    {
      ZSTD_DCtx* dctx = ZSTD_createDCtx();
      if (dctx == nullptr) bad("cannot create a zstd decompression context");
      size_t r = ZSTD_decompressDCtx(dctx, raw.data(), raw.size(), packed.data(), packed.size());
      dctxs.push_back(dctx);
      if (ZSTD_isError(r)) bad("index: zstd: ", ZSTD_getErrorName(r));
      if (r != raw_size) bad("index decompressed to ", r, " bytes, expected ", raw_size);
    }
    packed = {};
    parse_bounded(what, raw.data(), raw.size(), index, budget);
    raw = {};
    validate_index(index_offset, level);
  }

  void validate_index(uint64_t index_offset, int32_t level) {
    if (index->page_size() != kPageSize)
      bad("index page_size is ", index->page_size(), ", expected ", kPageSize);
    if (index->frame_pages() != frame_pages)
      bad("index frame_pages ", index->frame_pages(), " differs from the header's ", frame_pages);
    if (index->level() != level)
      bad("index zstd level ", index->level(), " differs from the header's ", level);
    data_pages = index->data_pages();
    if (data_pages > kMaxPages) bad("index data_pages ", data_pages, " is more than ", kMaxPages);
    if (index->zero_pages() > kMaxPages)
      bad("index zero_pages ", index->zero_pages(), " is more than ", kMaxPages);

    run_starts.reserve(static_cast<size_t>(index->runs_size()));
    uint64_t end = 0;  // end of the previous run
    uint64_t data_seen = 0, zero_seen = 0, parent_seen = 0;
    for (int i = 0; i < index->runs_size(); ++i) {
      const PageRun& r = index->runs(i);
      if (r.start() % kPageSize != 0) bad("run ", i, " start ", hex(r.start()), " is not aligned");
      if (r.start() >= kAddrEnd) bad("run ", i, " start ", hex(r.start()), " is not user space");
      if (r.pages() == 0) bad("run ", i, " has no pages");
      if (r.pages() > (kAddrEnd - r.start()) / kPageSize)
        bad("run ", i, " at ", hex(r.start()), " with ", r.pages(), " pages ends beyond ",
            hex(kAddrEnd));
      if (r.start() < end)
        bad("run ", i, " at ", hex(r.start()), " overlaps or precedes the previous run (ends at ",
            hex(end), ")");
      end = r.start() + r.pages() * kPageSize;
      // Runs do not overlap and lie below kAddrEnd, so these sums cannot overflow.
      if (r.kind() == PageRun::DATA) {
        if (r.first_page() != data_seen)
          bad("DATA run ", i, " has first_page ", r.first_page(), ", expected ", data_seen);
        data_seen += r.pages();
      } else if (r.kind() == PageRun::ZERO) {
        if (r.first_page() != 0) bad("ZERO run ", i, " has first_page ", r.first_page());
        zero_seen += r.pages();
      } else if (r.kind() == PageRun::REF) {
        if (r.first_page() != 0) bad("REF run ", i, " has first_page ", r.first_page());
        if (r.ref_pid() <= 0)
          bad("REF run ", i, " at ", hex(r.start()), " names pid ", r.ref_pid());
        if (r.ref_addr() % kPageSize != 0)
          bad("REF run ", i, " at ", hex(r.start()), ": referenced address ", hex(r.ref_addr()),
              " is not aligned");
        if (r.ref_addr() >= kAddrEnd || r.pages() > (kAddrEnd - r.ref_addr()) / kPageSize)
          bad("REF run ", i, " at ", hex(r.start()), ": ", r.pages(), " pages at ",
              hex(r.ref_addr()), " of pid ", r.ref_pid(), " end beyond user space");
        ref_pages += r.pages();
        ref_pids.push_back(r.ref_pid());
      } else if (r.kind() == PageRun::PARENT) {
        if (r.first_page() != 0) bad("PARENT run ", i, " has first_page ", r.first_page());
        parent_seen += r.pages();
      } else {
        bad("run ", i, " has unknown kind ", static_cast<int>(r.kind()));
      }
      if (r.kind() != PageRun::REF && (r.ref_pid() != 0 || r.ref_addr() != 0))
        bad("run ", i, " at ", hex(r.start()), " is not REF but names pid ", r.ref_pid(),
            " address ", hex(r.ref_addr()));
      run_starts.push_back(r.start());
    }
    if (data_seen != data_pages)
      bad("DATA runs hold ", data_seen, " pages, index data_pages says ", data_pages);
    if (zero_seen != index->zero_pages())
      bad("ZERO runs hold ", zero_seen, " pages, index zero_pages says ", index->zero_pages());
    if (parent_seen != index->parent_pages())
      bad("PARENT runs hold ", parent_seen, " pages, index parent_pages says ",
          index->parent_pages());
    parent_pages = parent_seen;
    parent_linked = parent_pages == 0;
    validate_page_hashes();
    std::sort(ref_pids.begin(), ref_pids.end());
    ref_pids.erase(std::unique(ref_pids.begin(), ref_pids.end()), ref_pids.end());
    refs_linked = ref_pids.empty();

    nframes = (data_pages + frame_pages - 1) / frame_pages;
    if (static_cast<uint64_t>(index->frame_sizes_size()) != nframes)
      bad("index has ", index->frame_sizes_size(), " frame sizes, ", data_pages,
          " data pages need ", nframes, " frames");
    validate_raw_frames();
    frame_strides.reserve((nframes + kFrameStride - 1) / kFrameStride);
    const uint32_t* sizes = index->frame_sizes().data();
    uint64_t offset = kHeaderSize;
    for (uint64_t i = 0; i < nframes; ++i) {
      if (i % kFrameStride == 0) frame_strides.push_back(offset);
      uint64_t size = sizes[i];
      if (is_raw(i)) {
        if (size != frame_size(i))
          bad("raw frame ", i, " size ", size, " is not its ", frame_size(i), " bytes of pages");
      } else {
        uint64_t bound = lz4 ? lz4_frame_bound(frame_size(i)) : ZSTD_compressBound(frame_size(i));
        if (size == 0 || size > bound)
          bad("frame ", i, " size ", size, " is outside [1, ", bound, "]");
      }
      // offset <= index_offset here, so neither side can overflow.
      if (size > index_offset - offset)
        bad("frame ", i, " at ", offset, " with ", size, " bytes runs into the index at ",
            index_offset);
      offset += size;
    }
    if (offset != index_offset)
      bad("frames end at ", offset, " but the index starts at ", index_offset);
    const std::string& digests = index->frame_sha256();
    if (!digests.empty() && digests.size() != nframes * kFrameDigestBytes)
      bad("index has ", digests.size(), " bytes of frame digests, ", nframes, " frames need ",
          nframes * kFrameDigestBytes);
    has_frame_digests = !digests.empty() || nframes == 0;
    if (raw_count > 0 && digests.empty())
      bad(raw_count, " raw frames but no frame digests (a raw frame has no other check)");
    if (version >= kPageStoreVersion && !has_frame_digests)
      bad("version ", version, " store without frame digests (its frames have no other check)");
  }

  // PageIndex.page_hashes: none, or one digest per DATA page (stream order).
  void validate_page_hashes() {
    const std::string& h = index->page_hashes();
    if (h.empty()) return;
    // data_pages is below kMaxPages (2^35): no overflow.
    if (h.size() != data_pages * kPageHashBytes)
      bad("index has ", h.size(), " bytes of page digests, ", data_pages, " DATA pages need ",
          data_pages * kPageHashBytes);
    has_page_hashes = true;
  }

  const unsigned char* stream_hash(uint64_t sp) const {
    if (!has_page_hashes) return nullptr;
    return reinterpret_cast<const unsigned char*>(index->page_hashes().data()) +
           sp * kPageHashBytes;
  }

  // PageIndex.raw_frames and compression against the version and the frame count.
  void validate_raw_frames() {
    if (index->compression() != PageIndex::ZSTD && index->compression() != PageIndex::NONE &&
        index->compression() != PageIndex::LZ4)
      bad("index has unknown compression ", static_cast<int>(index->compression()));
    lz4 = index->compression() == PageIndex::LZ4;
    if (lz4 != (version == kPageStoreVersionLz4))
      bad("version ", version, " store says compression ",
          PageIndex::Compression_Name(index->compression()), " (LZ4 frames are version ",
          kPageStoreVersionLz4, " and only they)");
    const std::string& bits = index->raw_frames();
    if (version == kPageStoreVersionNoRaw) {
      if (!bits.empty()) bad("version ", version, " store lists raw frames");
      if (index->compression() == PageIndex::NONE && nframes > 0)
        bad("version ", version, " store without raw frames says compression none");
      return;
    }
    if (version >= kPageStoreVersion && bits.empty()) {
      if (index->compression() == PageIndex::NONE && nframes > 0)
        bad("compression none, but no frame is raw");
      return;
    }
    if (bits.size() != raw_bitmap_bytes(nframes))
      bad("raw frame bitmap has ", bits.size(), " bytes, ", nframes, " frames need ",
          raw_bitmap_bytes(nframes));
    if (nframes % 8 != 0 && (static_cast<unsigned char>(bits.back()) >> (nframes % 8)) != 0)
      bad("raw frame bitmap has bits set past frame ", nframes - 1);
    for (char c : bits)
      raw_count += static_cast<uint64_t>(__builtin_popcount(static_cast<unsigned char>(c)));
    if (raw_count == 0) bad("version ", version, " store lists raw frames but none is raw");
    if (index->compression() == PageIndex::NONE && raw_count != nframes)
      bad("compression none, but ", nframes - raw_count, " of ", nframes, " frames are not raw");
  }

  bool is_raw(uint64_t i) const { return raw_count > 0 && bit(index->raw_frames(), i); }

  // Throws unless the size bytes at data are frame i as the index records it (digest).
  void check_digest(uint64_t i, const void* data, size_t size, uint64_t offset,
                    const std::string& what) const {
    const std::string& digests = index->frame_sha256();
    if (digests.empty()) return;
    unsigned char md[kFrameDigestBytes];
    sha256({{data, size}}, md);
    if (std::memcmp(md, digests.data() + i * kFrameDigestBytes, kFrameDigestBytes) != 0)
      fail(what, ": its ", size, " bytes at offset ", offset,
           " do not match their SHA-256 in the index (changed after the store was written)");
  }

  void check_digest_pair(uint64_t i, const void* a, size_t asize, uint64_t j, const void* b,
                         size_t bsize) const {
    const std::string& digests = index->frame_sha256();
    if (digests.empty()) return;
    unsigned char md[2][kFrameDigestBytes];
    sha256_pair(a, asize, b, bsize, md[0], md[1]);
    for (int k = 0; k < 2; ++k) {
      const uint64_t f = k == 0 ? i : j;
      if (std::memcmp(md[k], digests.data() + f * kFrameDigestBytes, kFrameDigestBytes) != 0)
        fail(path, ": frame ", f, ": its ", k == 0 ? asize : bsize, " bytes at offset ",
             frame_info(f).offset,
             " do not match their SHA-256 in the index (changed after the store was written)");
    }
  }

  // Uncompressed bytes of frame i; the last one may be short.
  size_t frame_size(uint64_t i) const {
    uint64_t pages = std::min<uint64_t>(frame_pages, data_pages - i * frame_pages);
    return static_cast<size_t>(pages * kPageSize);
  }

  ZSTD_DCtx* take_dctx() const {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!dctxs.empty()) {
        ZSTD_DCtx* d = dctxs.back();
        dctxs.pop_back();
        return d;
      }
    }
    ZSTD_DCtx* d = ZSTD_createDCtx();
    if (d == nullptr) bad("cannot create a zstd decompression context");
    return d;
  }
  void give_dctx(ZSTD_DCtx* d) const {
    std::lock_guard<std::mutex> lock(mu);
    dctxs.push_back(d);
  }

  // File offset and compressed size of frame i < nframes.
  PageStoreReader::FrameInfo frame_info(uint64_t i) const {
    const uint32_t* sizes = index->frame_sizes().data();
    uint64_t offset = frame_strides[i / kFrameStride];
    for (uint64_t k = i - i % kFrameStride; k < i; ++k) offset += sizes[k];
    return {offset, sizes[i], is_raw(i)};
  }

  FramePtr decompress(uint64_t i) const {
    const auto [offset, csize, raw] = frame_info(i);
    size_t expected = frame_size(i);
    if (raw) {  // csize == expected (checked at open): read in place, check, done
      auto out = std::make_shared<FrameData>();
      out->bytes.reset(new unsigned char[expected]);
      out->size = expected;
      pread_all(fd.get(), out->bytes.get(), expected, offset, path);
      check_digest(i, out->bytes.get(), expected, offset, cat(path, ": frame ", i));
      frames_decompressed.fetch_add(1, std::memory_order_relaxed);
      bytes_decompressed.fetch_add(expected, std::memory_order_relaxed);
      return out;
    }
    // csize <= the codec's bound for the frame size and lies inside the file (checked at
    // open).
    std::unique_ptr<unsigned char[]> src(new unsigned char[csize]);
    pread_all(fd.get(), src.get(), csize, offset, path);
    std::string what = cat(path, ": frame ", i);
    // Before anything parses the frame: with digests, a frame the dump did not write never
    // reaches zstd or LZ4 (the index they are in is what image.mac covers).
    check_digest(i, src.get(), csize, offset, what);
    if (lz4) {
      auto out = std::make_shared<FrameData>();
      out->bytes.reset(new unsigned char[expected]);
      out->size = expected;
      lz4_decode_frame(src.get(), csize, out->bytes.get(), expected, what);
      frames_decompressed.fetch_add(1, std::memory_order_relaxed);
      bytes_decompressed.fetch_add(expected, std::memory_order_relaxed);
      return out;
    }
    uint64_t content = check_zstd_frame(src.get(), csize, version < kPageStoreVersion, what);
    if (content != expected)
      fail(what, ": zstd frame holds ", content, " bytes, expected ", expected);
    auto out = std::make_shared<FrameData>();
    out->bytes.reset(new unsigned char[expected]);
    out->size = expected;
    ZSTD_DCtx* dctx = take_dctx();
    size_t r = ZSTD_decompressDCtx(dctx, out->bytes.get(), expected, src.get(), csize);
    give_dctx(dctx);
    if (ZSTD_isError(r)) fail(what, ": zstd: ", ZSTD_getErrorName(r));
    if (r != expected) fail(what, ": decompressed to ", r, " bytes, expected ", expected);
    frames_decompressed.fetch_add(1, std::memory_order_relaxed);
    bytes_decompressed.fetch_add(r, std::memory_order_relaxed);
    return out;
  }

  FramePtr get_frame(uint64_t i) const {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = cached.find(i);
      if (it != cached.end()) {
        lru.splice(lru.begin(), lru, it->second);
        return it->second->second;
      }
    }
    FramePtr frame = decompress(i);
    std::lock_guard<std::mutex> lock(mu);
    if (cached.count(i) == 0) {  // another thread may have loaded it meanwhile
      lru.emplace_front(i, frame);
      cached[i] = lru.begin();
      while (lru.size() > cache_frames) {
        cached.erase(lru.back().first);
        lru.pop_back();
      }
    }
    return frame;
  }

  size_t nruns() const { return run_starts.size(); }
  const PageRun& run(size_t i) const { return index->runs(static_cast<int>(i)); }

  // Index of the run holding addr, or nruns().
  size_t locate(uint64_t addr) const {
    auto it = std::upper_bound(run_starts.begin(), run_starts.end(), addr);
    if (it == run_starts.begin()) return nruns();
    size_t i = static_cast<size_t>(it - run_starts.begin()) - 1;
    if (addr - run_starts[i] >= run(i).pages() * kPageSize) return nruns();
    return i;
  }

  // Stream pages [sp, sp + n) (inside data_pages: the caller's run says so) into dst.
  void read_stream(uint64_t sp, uint64_t n, unsigned char* dst) const {
    while (n > 0) {
      uint64_t fi = sp / frame_pages;
      uint64_t in_frame = sp % frame_pages;
      uint64_t m = std::min<uint64_t>(n, frame_pages - in_frame);
      FramePtr frame = get_frame(fi);
      // frame->size is exactly frame_size(fi), which covers stream pages up to sp + m.
      std::memcpy(dst, frame->bytes.get() + in_frame * kPageSize, m * kPageSize);
      dst += m * kPageSize;
      sp += m;
      n -= m;
    }
  }

  // Pages [addr, addr + n pages) of one PARENT run, from the sources link_parent() resolved:
  // one binary search, then the holding stores directly, whatever the chain's length.
  void read_parent(uint64_t addr, uint64_t n, unsigned char* dst) const {
    if (!parent_linked)
      bad("page ", hex(addr), " is in the parent image, and no parent store is linked");
    auto it = std::upper_bound(source_starts.begin(), source_starts.end(), addr);
    size_t si = static_cast<size_t>(it - source_starts.begin());
    if (si-- == 0) bad("page ", hex(addr), " of a PARENT run has no resolved source");
    while (n > 0) {
      if (si >= sources.size()) bad("page ", hex(addr), " of a PARENT run has no resolved source");
      const Source& s = sources[si];
      if (addr < s.start || addr - s.start >= s.pages * kPageSize)
        bad("page ", hex(addr), " of a PARENT run has no resolved source (internal error)");
      uint64_t off = (addr - s.start) / kPageSize;
      uint64_t m = std::min<uint64_t>(n, s.pages - off);
      if (s.kind == PageRun::DATA)
        s.store->read_stream(s.first_page + off, m, dst);
      else if (s.kind == PageRun::ZERO)
        std::memset(dst, 0, m * kPageSize);
      else
        s.store->read(addr, m, dst);  // a REF page of that link: its own image's store
      dst += m * kPageSize;
      addr += m * kPageSize;
      n -= m;
      ++si;
    }
  }

  void add_source(uint64_t start, uint64_t pages, const Impl* store, PageRun::Kind kind,
                  uint64_t first_page) {
    if (!sources.empty()) {
      Source& b = sources.back();
      if (b.start + b.pages * kPageSize == start && b.store == store && b.kind == kind &&
          (kind != PageRun::DATA || b.first_page + b.pages == first_page)) {
        b.pages += pages;
        return;
      }
    }
    sources.push_back({start, pages, store, kind, kind == PageRun::DATA ? first_page : 0});
    source_starts.push_back(start);
  }

  // `from` is the store whose REF run led here (refs never chain), or nullptr.
  void read(uint64_t addr, size_t npages, void* out, const Impl* from = nullptr) const {
    if (addr % kPageSize != 0) bad("read at ", hex(addr), ": address is not page aligned");
    if (npages == 0) return;
    if (out == nullptr) bad("read at ", hex(addr), ": no output buffer");
    if (addr >= kAddrEnd || npages > (kAddrEnd - addr) / kPageSize)
      bad("read of ", npages, " pages at ", hex(addr), ": pages are not in the store");
    unsigned char* dst = static_cast<unsigned char*>(out);
    size_t ri = locate(addr);
    uint64_t left = npages;
    while (left > 0) {
      if (ri >= nruns() || addr < run_starts[ri] ||
          addr - run_starts[ri] >= run(ri).pages() * kPageSize)
        bad("page ", hex(addr), " is not in the store");
      const PageRun& r = run(ri);
      uint64_t offset_pages = (addr - r.start()) / kPageSize;
      uint64_t n = std::min<uint64_t>(left, r.pages() - offset_pages);
      if (r.kind() == PageRun::REF) {
        const uint64_t ref = r.ref_addr() + offset_pages * kPageSize;
        if (from != nullptr)
          bad("page ", hex(addr), " is a REF page (to pid ", r.ref_pid(), "), referenced by ",
              from->path, ": refs never chain");
        auto it = linked.find(r.ref_pid());
        if (it == linked.end())
          bad("page ", hex(addr), " is a REF page to pid ", r.ref_pid(), " at ", hex(ref),
              ", and no store is linked for pid ", r.ref_pid());
        it->second->impl_->read(ref, n, dst, this);
      } else if (r.kind() == PageRun::ZERO) {
        std::memset(dst, 0, n * kPageSize);
      } else if (r.kind() == PageRun::PARENT) {
        read_parent(addr, n, dst);
      } else {
        read_stream(r.first_page() + offset_pages, n, dst);
      }
      dst += n * kPageSize;
      addr += n * kPageSize;
      left -= n;
      ++ri;
    }
  }
};

PageStoreReader::PageStoreReader() : impl_(std::make_unique<Impl>()) {}
PageStoreReader::~PageStoreReader() = default;

std::unique_ptr<PageStoreReader> PageStoreReader::open(const std::string& path, size_t cache_frames,
                                                       MetadataBudget* budget) {
  std::unique_ptr<PageStoreReader> reader(new PageStoreReader());
  reader->impl_->path = path;
  reader->impl_->cache_frames = std::max<size_t>(1, cache_frames);
  reader->impl_->open(budget);
  return reader;
}

const PageIndex& PageStoreReader::index() const {
  return *impl_->index;
}

uint64_t PageStoreReader::frame_count() const {
  return impl_->nframes;
}

PageStoreReader::FrameInfo PageStoreReader::frame(uint64_t i) const {
  if (i >= impl_->nframes) impl_->bad("frame ", i, " does not exist (", impl_->nframes, " frames)");
  return impl_->frame_info(i);
}
bool PageStoreReader::lz4_frames() const {
  return impl_->lz4;
}
void PageStoreReader::check_frame(uint64_t i, const void* data, size_t size) const {
  const FrameInfo f = frame(i);
  if (size != f.size) impl_->bad("frame ", i, ": ", size, " bytes given, the frame has ", f.size);
  impl_->check_digest(i, data, size, f.offset, cat(impl_->path, ": frame ", i));
}

void PageStoreReader::check_frame_pair(uint64_t i, const void* a, size_t asize, uint64_t j,
                                       const void* b, size_t bsize) const {
  for (const auto& [f, size] : {std::pair{i, asize}, std::pair{j, bsize}})
    if (size != frame(f).size)
      impl_->bad("frame ", f, ": ", size, " bytes given, the frame has ", frame(f).size);
  impl_->check_digest_pair(i, a, asize, j, b, bsize);
}

uint64_t PageStoreReader::raw_frame_count() const {
  return impl_->raw_count;
}

const std::string& PageStoreReader::path() const {
  return impl_->path;
}
uint64_t PageStoreReader::file_size() const {
  return impl_->file_size;
}
int PageStoreReader::fd() const {
  return impl_->fd.get();
}

std::optional<PageLocation> PageStoreReader::find(uint64_t addr) const {
  uint64_t page = addr & ~static_cast<uint64_t>(kPageSize - 1);
  size_t i = impl_->locate(page);
  if (i >= impl_->nruns()) return std::nullopt;
  const PageRun& run = impl_->run(i);
  PageLocation loc;
  loc.kind = run.kind();
  if (run.kind() == PageRun::DATA)
    loc.stream_page = run.first_page() + (page - run.start()) / kPageSize;
  if (run.kind() == PageRun::REF) {
    loc.ref_pid = run.ref_pid();
    loc.ref_addr = run.ref_addr() + (page - run.start());
  }
  return loc;
}

void PageStoreReader::read(uint64_t addr, size_t npages, void* out) const {
  impl_->read(addr, npages, out);
}

void PageStoreReader::link_refs(const StoreOf& store_of) {
  Impl& im = *impl_;
  if (im.ref_pids.empty()) return;
  if (im.refs_linked) im.bad("link_refs() called twice");
  std::map<int32_t, std::shared_ptr<const PageStoreReader>> linked;
  for (int32_t pid : im.ref_pids) {
    std::shared_ptr<const PageStoreReader> store = store_of(pid);
    if (!store) im.bad("REF runs refer to pid ", pid, ", which has no page store");
    if (store.get() == this) im.bad("REF runs refer to pid ", pid, ", the store itself");
    if (!store->refs_linked())
      im.bad("REF runs refer to pid ", pid, " (", store->path(),
             "), whose own REF runs are not linked yet (link in inventory order)");
    if (!store->parent_linked())
      im.bad("REF runs refer to pid ", pid, " (", store->path(),
             "), whose PARENT runs are not linked yet (link parents first)");
    linked.emplace(pid, std::move(store));
  }
  // Every referenced range is DATA or ZERO there, so read() never meets a chain.
  for (size_t i = 0; i < im.nruns(); ++i) {
    const PageRun& r = im.run(i);
    if (r.kind() != PageRun::REF) continue;
    const Impl& target = *linked.at(r.ref_pid())->impl_;
    uint64_t addr = r.ref_addr();
    const uint64_t end = r.ref_addr() + r.pages() * kPageSize;  // checked at open()
    size_t ti = target.locate(addr);
    while (addr < end) {
      if (ti >= target.nruns() || target.run_starts[ti] > addr)
        im.bad("REF run at ", hex(r.start()), " refers to page ", hex(addr), " of pid ",
               r.ref_pid(), ", which ", target.path, " does not hold");
      const PageRun& t = target.run(ti);
      if (t.kind() == PageRun::REF)
        im.bad("REF run at ", hex(r.start()), " refers to page ", hex(addr), " of pid ",
               r.ref_pid(), ", a REF page in ", target.path, " (refs never chain)");
      addr = std::min(end, t.start() + t.pages() * kPageSize);
      ++ti;
    }
  }
  im.linked = std::move(linked);
  im.refs_linked = true;
}

void PageStoreReader::link_parent(std::shared_ptr<const PageStoreReader> parent) {
  Impl& im = *impl_;
  if (im.parent_pages == 0) return;
  if (im.parent_linked) im.bad("link_parent() called twice");
  if (!parent)
    im.bad(im.parent_pages, " pages are in the parent image, which has no store for them");
  if (parent.get() == this) im.bad("the store is its own parent");
  const Impl& p = *parent->impl_;
  if (!p.parent_linked || !p.refs_linked)
    im.bad("parent store ", p.path, " is not linked to its own image yet");
  for (size_t i = 0; i < im.nruns(); ++i) {
    const PageRun& r = im.run(i);
    if (r.kind() != PageRun::PARENT) continue;
    uint64_t addr = r.start();
    const uint64_t end = r.start() + r.pages() * kPageSize;  // checked at open()
    size_t pi = p.locate(addr);
    while (addr < end) {
      if (pi >= p.nruns() || p.run_starts[pi] > addr)
        im.bad("PARENT run at ", hex(r.start()), ": page ", hex(addr), " is not in the parent's ",
               p.path);
      const PageRun& t = p.run(pi);
      const uint64_t t_end = std::min(end, t.start() + t.pages() * kPageSize);
      const uint64_t n = (t_end - addr) / kPageSize;
      if (t.kind() == PageRun::PARENT) {
        // Already resolved in the parent: copy its sources, clipped to [addr, t_end).
        auto it = std::upper_bound(p.source_starts.begin(), p.source_starts.end(), addr);
        for (size_t si = static_cast<size_t>(it - p.source_starts.begin()) - 1;
             si < p.sources.size() && p.sources[si].start < t_end; ++si) {
          const Impl::Source& src = p.sources[si];
          const uint64_t s = std::max(addr, src.start);
          const uint64_t e = std::min(t_end, src.start + src.pages * kPageSize);
          if (s >= e) continue;
          im.add_source(s, (e - s) / kPageSize, src.store, src.kind,
                        src.first_page + (s - src.start) / kPageSize);
        }
      } else {
        im.add_source(
            addr, n, &p, t.kind(),
            t.kind() == PageRun::DATA ? t.first_page() + (addr - t.start()) / kPageSize : 0);
      }
      addr = t_end;
      ++pi;
    }
  }
  im.parent = std::move(parent);
  im.parent_linked = true;
}

bool PageStoreReader::parent_linked() const {
  return impl_->parent_linked;
}

uint64_t PageStoreReader::parent_pages() const {
  return impl_->parent_pages;
}

const unsigned char* PageStoreReader::page_hash(uint64_t addr) const {
  const Impl& im = *impl_;
  const uint64_t page = addr & ~static_cast<uint64_t>(kPageSize - 1);
  const size_t i = im.locate(page);
  if (i >= im.nruns()) return nullptr;
  const PageRun& r = im.run(i);
  if (r.kind() == PageRun::DATA)
    return im.stream_hash(r.first_page() + (page - r.start()) / kPageSize);
  if (r.kind() != PageRun::PARENT || !im.parent_linked) return nullptr;
  // The digest is the one of the store that holds the page's bytes, at the chain's end.
  auto it = std::upper_bound(im.source_starts.begin(), im.source_starts.end(), page);
  if (it == im.source_starts.begin()) return nullptr;
  const Impl::Source& s = im.sources[static_cast<size_t>(it - im.source_starts.begin()) - 1];
  if (s.kind != PageRun::DATA || page - s.start >= s.pages * kPageSize) return nullptr;
  return s.store->stream_hash(s.first_page + (page - s.start) / kPageSize);
}

std::vector<std::string> PageStoreReader::linked_paths() const {
  std::vector<std::string> out;
  auto add = [&](const PageStoreReader& st) {
    out.push_back(st.path());
    for (auto& p : st.linked_paths()) out.push_back(std::move(p));
  };
  for (const auto& [pid, st] : impl_->linked) add(*st);
  if (impl_->parent) add(*impl_->parent);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool PageStoreReader::refs_linked() const {
  return impl_->refs_linked;
}

uint64_t PageStoreReader::ref_pages() const {
  return impl_->ref_pages;
}

std::vector<int32_t> PageStoreReader::ref_pids() const {
  return impl_->ref_pids;
}

void PageStoreReader::verify_all() const {
  for (uint64_t i = 0; i < frame_count(); ++i) impl_->decompress(i);
}

bool PageStoreReader::has_frame_digests() const {
  return impl_->has_frame_digests;
}

const std::string& PageStoreReader::mac_digest() const {
  return impl_->mac_digest;
}

void load_sha256() {
  sha256_md();
}

std::string page_store_mac_digest(int fd, const std::string& path, uint64_t file_size) {
  if (file_size < kHeaderSize + kFooterSize)
    fail(path, ": file is ", file_size, " bytes, smaller than a page store's header and footer");
  unsigned char header[kHeaderSize];
  unsigned char footer[kFooterSize];
  const uint64_t footer_offset = file_size - kFooterSize;
  pread_all(fd, header, kHeaderSize, 0, path);
  pread_all(fd, footer, kFooterSize, footer_offset, path);
  if (std::memcmp(footer + 24, kFooterMagic, 8) != 0)
    fail(path, ": bad footer magic (truncated or not a page store)");
  const uint64_t index_offset = get_u64(footer);
  if (index_offset < kHeaderSize || index_offset > footer_offset ||
      footer_offset - index_offset > ZSTD_compressBound(kMaxIndexBytes))
    fail(path, ": index offset ", index_offset, " is not between the header and the footer (at ",
         footer_offset, "), or leaves more than a page store's index between them");
  std::vector<unsigned char> packed(footer_offset - index_offset);
  pread_all(fd, packed.data(), packed.size(), index_offset, path);
  return sha256_string(
      {{header, kHeaderSize}, {packed.data(), packed.size()}, {footer, kFooterSize}});
}

uint64_t PageStoreReader::frames_decompressed() const {
  return impl_->frames_decompressed.load(std::memory_order_relaxed);
}

uint64_t PageStoreReader::bytes_decompressed() const {
  return impl_->bytes_decompressed.load(std::memory_order_relaxed);
}

}  // namespace lazycr::image
