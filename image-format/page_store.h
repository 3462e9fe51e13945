// The page store: a seekable file of page frames (zstd-compressed, or raw where zstd saves
// too little) plus an index of runs. Layout and bounds: FORMAT.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "image-format/bounded_parse.h"
#include "image-format/pagestore.pb.h"

namespace lazycr::image {

inline constexpr uint32_t kPageSize = 4096;
// This build writes version 4: every frame has a SHA-256 digest in the index, so its zstd
// frames carry no XXH64 content checksum of their own (6% of a dump's CPU, bench/RESULTS.md);
// raw frames may or may not be there. It still reads version 3 (raw frames, zstd checksums)
// and version 2 (no raw frames, zstd checksums, digests optional).
inline constexpr uint32_t kPageStoreVersion = 4;
// Version 4 with LZ4 frames (compression LZ4) instead of zstd ones: a store that a build
// without LZ4 would misread as zstd carries a version such a build refuses by name.
inline constexpr uint32_t kPageStoreVersionLz4 = 5;
inline constexpr uint32_t kPageStoreVersionRaw = 3;
inline constexpr uint32_t kPageStoreVersionNoRaw = 2;
inline constexpr uint32_t kMinFrameSize = 16 * 1024;
inline constexpr uint32_t kMaxFrameSize = 4 * 1024 * 1024;
inline constexpr uint32_t kDefaultFrameSize = 64 * 1024;  // bench/RESULTS.md

// zstd -3: on a python dict heap 1.6x level 1's speed at 0.42x CRIU's image size (level 1:
// 0.31x), bench/RESULTS.md "Dump: no zstd checksum, default zstd:-3".
inline constexpr int kDefaultLevel = -3;
// LZ4's own default acceleration; recorded as the store's level for compression LZ4.
inline constexpr int kLz4Acceleration = 1;
// "auto"'s zstd: on redis memory (LZ4: 0.59 of the pages) 0.43 at 0.62x LZ4's speed, where
// zstd -3 as zstd makes it (literals raw) keeps 0.57 (bench/RESULTS.md "auto codec").
inline constexpr int kAutoZstdLevel = -3;
// Past about 16 LZ4 stores most of a frame as literals; the bound keeps images sane.
inline constexpr int kLz4MaxAcceleration = 64;

class PageStoreReader;

struct PageStoreOptions {
  uint32_t frame_size = kDefaultFrameSize;  // uncompressed bytes per frame, multiple of 4096
  // ZSTD: each frame compressed at `level`, or kept raw when a probe or zstd finds that it
  // does not compress (saves under 1/32); LZ4: each frame one LZ4 block at acceleration
  // `level` (>= 1), or raw when LZ4 saves under 1/32; NONE: every frame raw (level is still
  // recorded).
  PageIndex::Compression compression = PageIndex::ZSTD;
  int level = kDefaultLevel;  // zstd level
  // "auto": LZ4, unless choose_codec() finds that LZ4 leaves more than half of a sample of
  // the process's pages; then zstd at kAutoZstdLevel with its literals compressed (zstd
  // skips that at negative levels, and memory LZ4 does badly on is mostly literals).
  bool auto_codec = false;
  bool zstd_literals = false;  // ZSTD: compress literals at negative levels too
  unsigned threads = 0;        // compression threads; 0 = number of CPUs
  // Start the kernel's writeback of each few MiB as soon as they are written, so that the
  // final fsync waits for little (off: tests of the writer alone need not touch the disk).
  bool early_writeback = true;
  // Incremental images: record a digest of every page stored (PageIndex.page_hashes), so that
  // a later dump can name this one as its parent. Set by `parent` too.
  bool page_hashes = false;
  // This process's store in the parent image (linked to its own chain): pages with the same
  // content there become PARENT runs instead of being stored again.
  std::shared_ptr<const PageStoreReader> parent;
};

// "auto", "zstd", "zstd:LEVEL" (LEVEL in libzstd's range, negative for its fast levels), "lz4",
// "lz4:ACCELERATION" (LZ4_compress_fast's, 1 = LZ4's default) or "none" into options.compression
// and options.level; throws Error naming the text otherwise.
void parse_compression(const std::string& text, PageStoreOptions& options);
// The normalized form of what parse_compression() takes: "zstd:1", "lz4", "lz4:3", "none".
std::string compression_name(const PageStoreOptions& options);

struct PageStoreStats {
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t ref_pages = 0;     // pages in REF runs (stored in another process's store)
  uint64_t parent_pages = 0;  // pages in PARENT runs (unchanged since the parent image)
  uint64_t frames = 0;
  uint64_t raw_frames = 0;  // of `frames`, stored raw
  uint64_t file_bytes = 0;  // whole file, header to footer
  // What image.mac covers of this store (page_store_mac_digest()), computed as it was
  // written, so that signing never reads the store again (image_mac.h).
  std::string mac_digest;
};

inline constexpr size_t kFrameDigestBytes = 32;  // SHA-256 of each compressed frame
inline constexpr size_t kPageHashBytes = 16;     // PageIndex.page_hashes: half a SHA-256

// SHA-256 of the store's header, compressed index and footer: everything but the frames,
// which the index binds through their sizes and frame digests (FORMAT.md "Frame digests").
// Reads only those parts of the store open on `fd` (file_size bytes long); throws Error naming
// `path` when they are not where a page store has them.
std::string page_store_mac_digest(int fd, const std::string& path, uint64_t file_size);

// Takes pages in strictly increasing address order; all-zero pages become ZERO runs, pages
// stored by another process of the image become REF runs.
// Compression runs on a thread pool; memory use is bounded (a few frames per thread).
class PageStoreWriter {
 public:
  PageStoreWriter(const std::string& path, const PageStoreOptions& options);
  ~PageStoreWriter();  // without finish(): stops the pool and removes the file
  PageStoreWriter(const PageStoreWriter&) = delete;
  PageStoreWriter& operator=(const PageStoreWriter&) = delete;

  // `data` holds npages * kPageSize bytes for the pages starting at `addr` (page aligned,
  // above every page added before). The data is copied before this returns.
  void add_pages(uint64_t addr, const void* data, size_t npages);
  // The same without the copy: frame_room() lends the end of the frame being filled, room
  // for 1..max_pages pages (max_pages >= 1; fewer when the frame has less left); the caller
  // reads pages straight into it and hands them over with add_pages_in_place(), in address
  // order, each call's `data` inside the room and after the pages of the calls before. The
  // room is valid until the next call of any other method.
  struct Room {
    unsigned char* data;
    size_t pages;
  };
  Room frame_room(size_t max_pages);
  // Rooms for max_pages pages in all: frame_room()'s, then whole empty frames lent in the
  // order they will fill (so one read can fill several frames); pages read into them are
  // handed over with add_pages_in_place() in the rooms' order, each call inside one room.
  // Lent frames not reached are taken back by the next call of any other method.
  void frame_rooms(size_t max_pages, std::vector<Room>& rooms);
  void add_pages_in_place(uint64_t addr, const void* data, size_t npages);
  // The npages pages at `addr` have the content of process `ref_pid`'s pages at `ref_addr`
  // (fork-shared pages, stored once by the process that comes first in the inventory); they
  // must be DATA or ZERO there. Interleaves with add_pages in the same increasing address
  // order; contiguous refs to the same pid and contiguous ref_addr merge into one run.
  void add_ref_pages(uint64_t addr, size_t npages, int32_t ref_pid, uint64_t ref_addr);
  // Write tracking (checkpoint/write_tracking.h): whether the parent image holds the page at
  // addr (DATA, PARENT or ZERO), so that an unwritten page can be recorded without reading it.
  bool parent_holds(uint64_t addr) const;
  // With options.auto_codec: picks this store's codec from `sample` (pages of the process,
  // a few runs of 16 from across its memory; see PageStoreOptions::auto_codec). Before any page
  // is added. Returns the codec used, as compression_name() writes it ("lz4", "zstd:-3").
  std::string choose_codec(const void* sample, size_t bytes);
  // The npages pages at addr were not written since the parent image: recorded as PARENT
  // runs (ZERO where the parent has zeros) without reading or hashing them. Every page must
  // be one parent_holds(); in the same increasing address order as add_pages.
  void add_unchanged_pages(uint64_t addr, size_t npages);
  // Writes the index and footer, fsyncs, and returns the totals. Throws on any I/O error.
  PageStoreStats finish();

  // Pages added so far (REF pages included) / compressed bytes written so far (for progress
  // lines).
  uint64_t pages_added() const;
  uint64_t bytes_written() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct PageLocation {
  PageRun::Kind kind;
  uint64_t stream_page = 0;  // DATA only
  int32_t ref_pid = 0;       // REF only: the process whose store holds the page
  uint64_t ref_addr = 0;     // REF only: the page's address in that process
};

// Opens and validates a store; every value from the file is bounds-checked before use.
// read() is safe to call from several threads at once (link_refs() is not: call it first).
class PageStoreReader {
 public:
  // Throws Error naming the file and what is wrong.
  static std::unique_ptr<PageStoreReader> open(const std::string& path, size_t cache_frames = 16,
                                               MetadataBudget* budget = nullptr);
  ~PageStoreReader();

  const PageIndex& index() const;
  const std::string& path() const;
  uint64_t file_size() const;
  // The descriptor of the file open() checked (for pread only; it stays the reader's).
  int fd() const;

  // The data frames (ceil(data_pages / frame_pages) of them), where they lie in the file.
  // Frame i holds stream pages [i * frame_pages, ...) (index().frame_pages(); the last frame
  // may hold fewer).
  struct FrameInfo {
    uint64_t offset;  // file offset of the frame
    uint64_t size;    // bytes in the file
    // The frame is stored raw: its `size` bytes at `offset` are its pages as they are (size
    // is the page count * 4096). Otherwise it is one zstd frame, which read() decompresses.
    bool raw = false;
  };
  uint64_t frame_count() const;
  FrameInfo frame(uint64_t i) const;  // throws Error if i >= frame_count()
  // The frames that are not raw are LZ4 blocks (lz4_frame.h), not zstd frames.
  bool lz4_frames() const;
  // For a reader that takes a frame's bytes from the file itself (pread into its own buffer,
  // e.g. a raw frame copied straight to where the pages go): throws Error unless `data`
  // (size bytes) is frame i as the dump wrote it, i.e. matches its digest in the index. A
  // store without digests has no raw frames, and its zstd frames are checked by zstd. Never
  // use bytes of a frame before this returned.
  void check_frame(uint64_t i, const void* data, size_t size) const;
  // check_frame() of frames i and j at once (their digests computed together, sha256_pair.h);
  // the error names the first of them that does not match.
  void check_frame_pair(uint64_t i, const void* a, size_t asize, uint64_t j, const void* b,
                        size_t bsize) const;
  // Frames stored raw (FrameInfo::raw).
  uint64_t raw_frame_count() const;

  // One binary search over the runs; nullopt if the page is not in the store. A REF page
  // reports where it lives (ref_pid, ref_addr), not what is there.
  std::optional<PageLocation> find(uint64_t addr) const;
  // Copies pages [addr, addr + npages * 4096) into out. Every page must be in the store
  // (DATA, ZERO, or REF once linked); throws Error otherwise or on a corrupt frame. At most
  // one decompression per frame touched (frames come from an LRU cache; REF pages from the
  // referenced store's cache, so pages shared by a parent and its children are decompressed
  // once).
  void read(uint64_t addr, size_t npages, void* out) const;

  // Makes read() follow REF runs: `store_of(pid)` returns the store of process pid (nullptr
  // if there is none). Each referenced range must be DATA or ZERO in that store (refs never
  // chain), and a referenced store that has REF runs itself must be linked already, so links
  // never form a cycle: link in inventory order. The linked stores are kept alive by this
  // one. Throws Error naming the run and the pid; a store without REF runs needs no link (a
  // no-op). Call once, before any read().
  using StoreOf = std::function<std::shared_ptr<const PageStoreReader>(int32_t pid)>;
  void link_refs(const StoreOf& store_of);
  // True when read() can serve every page: no REF runs, or link_refs() succeeded.
  bool refs_linked() const;
  // Incremental images: makes read() serve PARENT runs from `parent` (this process's store in
  // the parent image, whose own PARENT runs are linked already). The chain is resolved here,
  // once: every PARENT range is mapped to the store that holds its bytes at the end of the
  // chain, so a read costs one lookup here and none per link. Throws Error naming the run and
  // the parent store when a PARENT page is not in `parent`. Call before link_refs() and any
  // read(); a store without PARENT runs needs no parent (a no-op).
  void link_parent(std::shared_ptr<const PageStoreReader> parent);
  // True when read() can serve every PARENT page: none, or link_parent() succeeded.
  bool parent_linked() const;
  uint64_t parent_pages() const;
  // The 16-byte digest recorded for the page at addr: of a DATA page, in this store; of a
  // PARENT page (once linked), in the store down the chain that holds it. nullptr when that
  // store has no digests, or the page is ZERO, REF or not in the store.
  const unsigned char* page_hash(uint64_t addr) const;
  // Paths of the stores read() may read besides this one (REF targets and the parent chain,
  // transitively): a process that serves this store must keep them open.
  std::vector<std::string> linked_paths() const;
  // Pages in REF runs, and the distinct pids they refer to (sorted).
  uint64_t ref_pages() const;
  std::vector<int32_t> ref_pids() const;
  // Decompresses every frame and checks its checksum; throws on the first bad one.
  void verify_all() const;

  // Whether every frame is checked against a digest of the index before it is decompressed
  // (a store without frames has nothing to check). Stores written before frame digests have
  // none: only a MAC over their whole file vouches for their frames (image_mac.h).
  bool has_frame_digests() const;
  // page_store_mac_digest() of the header, index and footer this reader parsed and uses.
  const std::string& mac_digest() const;

  // Counters for stats: frames loaded into the cache (decompressed, or read raw and checked)
  // and their content bytes.
  uint64_t frames_decompressed() const;
  uint64_t bytes_decompressed() const;

 private:
  PageStoreReader();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lazycr::image
