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

namespace lazycr::image {
namespace {

constexpr size_t kHeaderSize = 64;
constexpr size_t kFooterSize = 32;
constexpr char kHeaderMagic[8] = {'L', 'Z', 'C', 'R', 'P', 'A', 'G', 'E'};
constexpr char kFooterMagic[8] = {'L', 'Z', 'C', 'R', 'P', 'E', 'N', 'D'};
// The decompressed index is refused above this size, before anything is allocated for it:
// ~1 TiB of pages in 64 KiB frames (16 M frame sizes of ~3 bytes) or 3 M runs.
constexpr uint64_t kMaxIndexBytes = 64ull << 20;
// Pages live below the end of x86_64 user space (4-level paging).
constexpr uint64_t kAddrEnd = 0x0000800000000000ull;
constexpr uint64_t kMaxPages = kAddrEnd / kPageSize;
constexpr uint32_t kMinFramePages = kMinFrameSize / kPageSize;
constexpr uint32_t kMaxFramePages = kMaxFrameSize / kPageSize;
constexpr unsigned kMaxThreads = 1024;
// Frames in flight per compression thread (queued, compressing or waiting to be written).
// A producer that finds them all in flight sleeps until half are written: one wake-up per
// few frames, not one per frame (futex wake-ups and context switches were ~12% of a 512 MiB
// dump's CPU with 2 per thread and a wake-up per frame, perf).
constexpr size_t kFramesPerThread = 8;
// A frame is stored raw when zstd saves less than 1/kRawMargin of it: reading it back then
// costs a copy instead of a decompression, for at most ~3% more bytes.
constexpr size_t kRawMargin = 32;
// The early writeback asks the kernel to start writing each this many bytes of frames.
constexpr uint64_t kWritebackChunk = 8ull << 20;

bool saves_too_little(size_t compressed, size_t raw) {
  return compressed >= raw - raw / kRawMargin;
}

uint64_t raw_bitmap_bytes(uint64_t frames) {
  return (frames + 7) / 8;
}
bool bit(const std::string& bitmap, uint64_t i) {
  return (static_cast<unsigned char>(bitmap[i / 8]) >> (i % 8)) & 1;
}

void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

// Fast check: the first word is zero and every byte equals the one 8 bytes before it.
bool is_zero_page(const unsigned char* p) {
  uint64_t first;
  std::memcpy(&first, p, sizeof first);
  return first == 0 && std::memcmp(p, p + 8, kPageSize - 8) == 0;
}

void pwrite_all(int fd, const void* data, size_t len, uint64_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, ": write of ", len, " bytes at offset ", offset, " failed");
    }
    if (n == 0) fail(path, ": write at offset ", offset, " wrote nothing");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

// Reads exactly len bytes; a short read means the file shrank under us.
void pread_all(int fd, void* data, size_t len, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(path, ": read of ", len, " bytes at offset ", offset, " failed");
    }
    if (n == 0) fail(path, ": file ends at offset ", offset, " (truncated while open?)");
    p += n;
    len -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

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

// SHA-256 (libcrypto, SHA-NI): 1.6 GB/s on 64 KiB here, BLAKE2b-512 0.8 GB/s, and Debian 12
// has no BLAKE3 (bench/RESULTS.md "Frame digests"). The algorithm is fetched once: an implicit
// fetch per call costs microseconds, which a fault on a small frame would pay.
const EVP_MD* sha256_md() {
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
}

struct Bytes {
  const void* data;
  size_t size;
};

// SHA-256 of the concatenation of `parts` into out[kFrameDigestBytes].
void sha256(std::initializer_list<Bytes> parts, unsigned char* out) {
  struct CtxFree {
    void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
  };
  thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  bool ok = ctx && sha256_md() && EVP_DigestInit_ex2(ctx.get(), sha256_md(), nullptr) == 1;
  for (const Bytes& b : parts) ok = ok && EVP_DigestUpdate(ctx.get(), b.data, b.size) == 1;
  unsigned int len = 0;
  if (!ok || EVP_DigestFinal_ex(ctx.get(), out, &len) != 1 || len != kFrameDigestBytes)
    fail("libcrypto cannot compute a SHA-256");
}

std::string sha256_string(std::initializer_list<Bytes> parts) {
  unsigned char md[kFrameDigestBytes];
  sha256(parts, md);
  return std::string(reinterpret_cast<const char*>(md), sizeof md);
}

struct ZstdCCtxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
using CCtxPtr = std::unique_ptr<ZSTD_CCtx, ZstdCCtxDeleter>;

// Page frames go without zstd's checksum (their SHA-256 digests check them); the index,
// which image.mac covers but no digest of its own, keeps it.
CCtxPtr make_cctx(int level, bool checksum, const std::string& path) {
  CCtxPtr cctx(ZSTD_createCCtx());
  if (!cctx) fail(path, ": cannot create a zstd compression context");
  for (auto [param, value] :
       {std::pair{ZSTD_c_compressionLevel, level}, std::pair{ZSTD_c_checksumFlag, checksum ? 1 : 0},
        std::pair{ZSTD_c_contentSizeFlag, 1}}) {
    size_t r = ZSTD_CCtx_setParameter(cctx.get(), param, value);
    if (ZSTD_isError(r)) fail(path, ": zstd: ", ZSTD_getErrorName(r));
  }
  return cctx;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Writer

struct PageStoreWriter::Impl {
  struct Job {
    uint64_t seq = 0;
    std::unique_ptr<unsigned char[]> in;
    size_t in_size = 0;
    std::unique_ptr<unsigned char[]> out;
    size_t out_size = 0;
    bool raw = false;                         // store `in` as it is, not `out`
    unsigned char digest[kFrameDigestBytes];  // of what is stored, by the compressing thread
    const unsigned char* stored() const { return raw ? in.get() : out.get(); }
    size_t stored_size() const { return raw ? in_size : out_size; }
  };

  std::string path;
  PageStoreOptions options;
  uint32_t frame_pages = 0;
  size_t frame_bytes = 0;
  size_t out_capacity = 0;
  UniqueFd fd;
  dev_t dev = 0;
  ino_t ino = 0;
  bool finished = false;
  bool closed = false;  // finish() was called (successfully or not)

  // Producer state (the thread calling add_pages/finish).
  std::vector<PageRun> runs;
  uint64_t next_addr = 0;  // lowest address the next page may have
  uint64_t data_pages = 0;
  uint64_t zero_pages = 0;
  uint64_t ref_pages = 0;
  uint64_t parent_pages = 0;
  bool hashing = false;     // options.page_hashes or options.parent
  std::string page_hashes;  // PageIndex.page_hashes, kPageHashBytes per DATA page
  std::unique_ptr<unsigned char[]> parent_page;  // a parent page without a digest, read back
  std::unique_ptr<Job> current;                  // the frame being filled
  uint64_t next_seq = 0;

  // Pool state, under mu.
  std::mutex mu;
  std::condition_variable work_cv;      // workers: a job is queued or stop is set
  std::condition_variable producer_cv;  // producer: a frame was written
  std::deque<std::unique_ptr<Job>> queue;
  std::map<uint64_t, std::unique_ptr<Job>> done;  // compressed, waiting for their turn
  std::vector<std::unique_ptr<Job>> free_jobs;
  size_t in_flight = 0;
  size_t max_in_flight = 0;
  bool stop = false;
  bool writing = false;  // one worker writes finished frames, in sequence order
  uint64_t next_write = 0;
  uint64_t write_offset = kHeaderSize;
  std::vector<uint32_t> frame_sizes;  // stored bytes of each frame written, in order
  std::string frame_digests;          // their SHA-256s, kFrameDigestBytes each, in order
  std::string raw_frames;             // bitmap of the frames stored raw (PageIndex.raw_frames)
  uint64_t raw_count = 0;
  uint64_t writeback_from = kHeaderSize;  // early writeback requested up to here
  std::exception_ptr error;
  std::vector<std::thread> workers;

  std::atomic<uint64_t> pages_added{0};
  std::atomic<uint64_t> bytes_written{0};

  size_t low_water() const { return max_in_flight / 2; }

  uint32_t version() const {
    return options.compression == PageIndex::LZ4 ? kPageStoreVersionLz4 : kPageStoreVersion;
  }

  void make_header(unsigned char* header) const {
    std::memset(header, 0, kHeaderSize);
    std::memcpy(header, kHeaderMagic, 8);
    put_u32(header + 8, version());
    put_u32(header + 12, kHeaderSize);
    put_u32(header + 16, kPageSize);
    put_u32(header + 20, frame_pages);
    put_u32(header + 24, static_cast<uint32_t>(options.level));
  }

  ~Impl() {
    stop_pool();
    if (!finished && fd.valid()) {
      fd.reset();
      // Remove the file only if the path still names the file we created.
      struct stat st;
      if (::lstat(path.c_str(), &st) == 0 && st.st_dev == dev && st.st_ino == ino)
        ::unlink(path.c_str());
    }
  }

  void init() {
    if (options.frame_size % kPageSize != 0)
      fail(path, ": frame size ", options.frame_size, " is not a multiple of ", kPageSize);
    if (options.frame_size < kMinFrameSize || options.frame_size > kMaxFrameSize)
      fail(path, ": frame size ", options.frame_size, " is outside [", kMinFrameSize, ", ",
           kMaxFrameSize, "]");
    if (options.level < ZSTD_minCLevel() || options.level > ZSTD_maxCLevel())
      fail(path, ": zstd level ", options.level, " is outside [", ZSTD_minCLevel(), ", ",
           ZSTD_maxCLevel(), "]");
    if (options.compression != PageIndex::ZSTD && options.compression != PageIndex::NONE &&
        options.compression != PageIndex::LZ4)
      fail(path, ": unknown compression ", static_cast<int>(options.compression));
    if (options.compression == PageIndex::LZ4 && options.level < 1)
      fail(path, ": lz4 acceleration ", options.level, " is below 1");
    if (options.threads > kMaxThreads)
      fail(path, ": ", options.threads, " compression threads is more than ", kMaxThreads);
    frame_pages = options.frame_size / kPageSize;
    frame_bytes = options.frame_size;
    out_capacity = std::max(ZSTD_compressBound(frame_bytes), lz4_frame_bound(frame_bytes));
    unsigned threads = options.threads;
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    max_in_flight = kFramesPerThread * threads;
    if (!sha256_md()) fail(path, ": libcrypto has no SHA-256 for the frame digests");
    hashing = options.page_hashes || options.parent != nullptr;
    if (options.parent) {
      if (!options.parent->parent_linked() || !options.parent->refs_linked())
        fail(path, ": parent store ", options.parent->path(), " is not linked to its image");
      parent_page.reset(new unsigned char[kPageSize]);
    }

    int raw = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (raw < 0) fail_errno(path, ": cannot create page store");
    UniqueFd f(raw);
    struct stat st;
    if (::fstat(f.get(), &st) != 0) fail_errno(path, ": fstat failed");
    if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file");
    dev = st.st_dev;
    ino = st.st_ino;
    fd = std::move(f);

    // Check the parameters once here so workers cannot fail on them.
    make_cctx(options.level, false, path);
    current = new_job();
    for (unsigned i = 0; i < threads; ++i) workers.emplace_back([this] { worker(); });
  }

  std::unique_ptr<Job> new_job() {
    auto job = std::make_unique<Job>();
    job->in.reset(new unsigned char[frame_bytes]);
    job->out.reset(new unsigned char[out_capacity]);
    return job;
  }

  void stop_pool() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    work_cv.notify_all();
    for (auto& t : workers) t.join();
    workers.clear();
  }

  void rethrow_if_failed() {
    std::lock_guard<std::mutex> lock(mu);
    if (error) std::rethrow_exception(error);
  }

  void worker() {
    CCtxPtr cctx;
    std::unique_lock<std::mutex> lock(mu);
    for (;;) {
      work_cv.wait(lock, [this] { return stop || !queue.empty(); });
      if (queue.empty()) return;  // stop and nothing left
      std::unique_ptr<Job> job = std::move(queue.front());
      queue.pop_front();
      bool skip = error != nullptr || stop;
      lock.unlock();
      if (!skip) {
        try {
          if (!cctx && options.compression == PageIndex::ZSTD)
            cctx = make_cctx(options.level, false, path);
          compress(cctx.get(), *job);
          // Here, on the compressing threads, not in the one writer's turn: the digests of
          // a dump cost no time the writer waits for.
          sha256({{job->stored(), job->stored_size()}}, job->digest);
        } catch (...) {
          lock.lock();
          if (!error) error = std::current_exception();
          lock.unlock();
        }
      }
      lock.lock();
      done.emplace(job->seq, std::move(job));
      if (writing) continue;
      // Write every finished frame whose turn has come, in order, without holding the lock.
      writing = true;
      for (auto it = done.find(next_write); it != done.end(); it = done.find(next_write)) {
        std::unique_ptr<Job> j = std::move(it->second);
        done.erase(it);
        bool write = error == nullptr && !stop;
        uint64_t offset = write_offset;
        lock.unlock();
        if (write) {
          try {
            pwrite_all(fd.get(), j->stored(), j->stored_size(), offset, path);
            bytes_written.fetch_add(j->stored_size(), std::memory_order_relaxed);
            start_writeback(offset + j->stored_size());
          } catch (...) {
            lock.lock();
            if (!error) error = std::current_exception();
            lock.unlock();
            write = false;
          }
        }
        lock.lock();
        if (write) {
          // stored_size() <= ZSTD_compressBound(kMaxFrameSize), far below 2^32.
          const uint64_t i = frame_sizes.size();
          frame_sizes.push_back(static_cast<uint32_t>(j->stored_size()));
          frame_digests.append(reinterpret_cast<const char*>(j->digest), kFrameDigestBytes);
          if (raw_frames.size() < raw_bitmap_bytes(i + 1)) raw_frames.push_back('\0');
          if (j->raw) {
            raw_frames[i / 8] = static_cast<char>(raw_frames[i / 8] | (1 << (i % 8)));
            ++raw_count;
          }
          write_offset += j->stored_size();
        }
        ++next_write;
        --in_flight;
        free_jobs.push_back(std::move(j));
        if (in_flight <= low_water() || error) producer_cv.notify_all();
      }
      writing = false;
    }
  }

  // True when none of three sample pages (first, middle, last) compresses by 1/kRawMargin:
  // the frame is then taken as incompressible without compressing all of it (random data
  // costs zstd ~0.3 ns a byte even to find nothing; three pages cost a fifth of that at
  // 64 KiB frames). A frame mixing kinds of data is compressed whole unless all three samples
  // missed its compressible pages.
  bool probe_incompressible(ZSTD_CCtx* cctx, Job& job) {
    const size_t pages = job.in_size / kPageSize;
    if (pages < 4) return false;  // the probe would cost as much as the frame
    for (size_t p : {size_t{0}, pages / 2, pages - 1}) {
      size_t r = ZSTD_compress2(cctx, job.out.get(), out_capacity, job.in.get() + p * kPageSize,
                                kPageSize);
      if (ZSTD_isError(r))
        fail(path, ": zstd compression of frame ", job.seq, " failed: ", ZSTD_getErrorName(r));
      if (!saves_too_little(r, kPageSize)) return false;
    }
    return true;
  }

  // Fills job.out (or sets job.raw) from job.in.
  void compress(ZSTD_CCtx* cctx, Job& job) {
    job.raw = true;
    if (options.compression == PageIndex::NONE) return;
    if (options.compression == PageIndex::LZ4) {
      // No probe: LZ4 skips ahead ever faster through data it finds no match in, so an
      // incompressible frame costs it little more than a probe would.
      size_t r =
          lz4_compress_frame(job.in.get(), job.in_size, job.out.get(), out_capacity, options.level);
      job.out_size = r;
      job.raw = r == 0 || saves_too_little(r, job.in_size);
      return;
    }
    if (probe_incompressible(cctx, job)) return;
    size_t r = ZSTD_compress2(cctx, job.out.get(), out_capacity, job.in.get(), job.in_size);
    if (ZSTD_isError(r))
      fail(path, ": zstd compression of frame ", job.seq, " failed: ", ZSTD_getErrorName(r));
    job.out_size = r;
    job.raw = saves_too_little(r, job.in_size);
  }

  // Asks the kernel to start writing what was written up to `end` (no waiting): the final
  // fsync then waits only for the tail. Errors surface at that fsync.
  void start_writeback(uint64_t end) {
    if (!options.early_writeback || end - writeback_from < kWritebackChunk) return;
    ::sync_file_range(fd.get(), static_cast<off_t>(writeback_from),
                      static_cast<off_t>(end - writeback_from), SYNC_FILE_RANGE_WRITE);
    writeback_from = end;
  }

  // Hands the current frame to the pool; blocks while too many frames are in flight.
  void submit() {
    current->seq = next_seq++;
    std::unique_lock<std::mutex> lock(mu);
    if (in_flight >= max_in_flight)
      producer_cv.wait(lock, [this] { return in_flight <= low_water() || error; });
    if (error) std::rethrow_exception(error);
    ++in_flight;
    queue.push_back(std::move(current));
    if (!free_jobs.empty()) {
      current = std::move(free_jobs.back());
      free_jobs.pop_back();
    }
    lock.unlock();
    work_cv.notify_one();
    if (!current) current = new_job();
    current->in_size = 0;
  }

  void add_run(uint64_t addr, PageRun::Kind kind) {
    if (!runs.empty()) {
      PageRun& last = runs.back();
      if (last.kind() == kind && last.start() + last.pages() * kPageSize == addr) {
        last.set_pages(last.pages() + 1);
        return;
      }
    }
    PageRun& run = runs.emplace_back();
    run.set_start(addr);
    run.set_pages(1);
    run.set_kind(kind);
    if (kind == PageRun::DATA) run.set_first_page(data_pages);
  }

  void check_range(const char* what, uint64_t addr, size_t npages) const {
    if (closed) fail(path, ": ", what, " after finish()");
    if (addr % kPageSize != 0) fail(path, ": address ", hex(addr), " is not page aligned");
    if (addr < next_addr)
      fail(path, ": address ", hex(addr), " is below the end of the pages already added (",
           hex(next_addr), ")");
    if (addr >= kAddrEnd || npages > (kAddrEnd - addr) / kPageSize)
      fail(path, ": pages at ", hex(addr), " + ", npages, " pages end beyond user space (",
           hex(kAddrEnd), ")");
  }

  void add_ref_pages(uint64_t addr, size_t npages, int32_t ref_pid, uint64_t ref_addr) {
    check_range("add_ref_pages", addr, npages);
    if (ref_pid <= 0) fail(path, ": REF pages at ", hex(addr), " name pid ", ref_pid);
    if (ref_addr % kPageSize != 0)
      fail(path, ": REF pages at ", hex(addr), ": referenced address ", hex(ref_addr),
           " is not page aligned");
    if (ref_addr >= kAddrEnd || npages > (kAddrEnd - ref_addr) / kPageSize)
      fail(path, ": REF pages at ", hex(addr), ": ", npages, " pages at ", hex(ref_addr),
           " of pid ", ref_pid, " end beyond user space");
    if (npages == 0) return;
    rethrow_if_failed();
    const uint64_t bytes = npages * kPageSize;
    if (!runs.empty()) {
      PageRun& last = runs.back();
      const uint64_t last_bytes = last.pages() * kPageSize;
      if (last.kind() == PageRun::REF && last.ref_pid() == ref_pid &&
          last.start() + last_bytes == addr && last.ref_addr() + last_bytes == ref_addr) {
        last.set_pages(last.pages() + npages);
        ref_pages += npages;
        next_addr = addr + bytes;
        pages_added.fetch_add(npages, std::memory_order_relaxed);
        return;
      }
    }
    PageRun& run = runs.emplace_back();
    run.set_start(addr);
    run.set_pages(npages);
    run.set_kind(PageRun::REF);
    run.set_ref_pid(ref_pid);
    run.set_ref_addr(ref_addr);
    ref_pages += npages;
    next_addr = addr + bytes;
    pages_added.fetch_add(npages, std::memory_order_relaxed);
  }

  // Whether the parent image holds this very content at addr: by digest where the parent
  // recorded one, else (a store written without digests, a REF page) by content.
  bool same_as_parent(uint64_t addr, const unsigned char* page, const unsigned char* digest) {
    const PageStoreReader& parent = *options.parent;
    std::optional<PageLocation> loc = parent.find(addr);
    if (!loc || loc->kind == PageRun::ZERO) return false;  // this page is not all zero
    if (const unsigned char* h = parent.page_hash(addr))
      return std::memcmp(h, digest, kPageHashBytes) == 0;
    parent.read(addr, 1, parent_page.get());
    return std::memcmp(parent_page.get(), page, kPageSize) == 0;
  }

  // Records the page at addr as ZERO, PARENT (the parent image holds it) or DATA (with its
  // digest when hashing); true for DATA, which the caller puts in the frame.
  bool record_page(uint64_t addr, const unsigned char* p) {
    if (is_zero_page(p)) {
      add_run(addr, PageRun::ZERO);
      ++zero_pages;
      return false;
    }
    unsigned char digest[kFrameDigestBytes];
    if (hashing) sha256({{p, kPageSize}}, digest);
    if (hashing && options.parent && same_as_parent(addr, p, digest)) {
      add_run(addr, PageRun::PARENT);
      ++parent_pages;
      return false;
    }
    if (hashing) page_hashes.append(reinterpret_cast<const char*>(digest), kPageHashBytes);
    add_run(addr, PageRun::DATA);
    ++data_pages;
    return true;
  }

  bool parent_holds(uint64_t addr) const {
    if (!options.parent) return false;
    std::optional<PageLocation> loc = options.parent->find(addr);
    return loc && (loc->kind == PageRun::DATA || loc->kind == PageRun::PARENT ||
                   loc->kind == PageRun::ZERO);
  }

  void add_unchanged_pages(uint64_t addr, size_t npages) {
    check_range("add_unchanged_pages", addr, npages);
    rethrow_if_failed();
    for (size_t i = 0; i < npages; ++i, addr += kPageSize) {
      std::optional<PageLocation> loc;
      if (options.parent) loc = options.parent->find(addr);
      if (!loc || (loc->kind != PageRun::DATA && loc->kind != PageRun::PARENT &&
                   loc->kind != PageRun::ZERO))
        fail(path, ": page ", hex(addr), " is unchanged but not in the parent image");
      if (loc->kind == PageRun::ZERO) {
        add_run(addr, PageRun::ZERO);
        ++zero_pages;
      } else {
        add_run(addr, PageRun::PARENT);
        ++parent_pages;
      }
      pages_added.fetch_add(1, std::memory_order_relaxed);
    }
    next_addr = addr;
  }

  void add_pages(uint64_t addr, const void* data, size_t npages) {
    check_range("add_pages", addr, npages);
    if (npages == 0) return;
    if (data == nullptr) fail(path, ": add_pages with no data");
    rethrow_if_failed();
    const unsigned char* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < npages; ++i, p += kPageSize, addr += kPageSize) {
      if (record_page(addr, p)) {
        std::memcpy(current->in.get() + current->in_size, p, kPageSize);
        current->in_size += kPageSize;
        if (current->in_size == frame_bytes) submit();
      }
      pages_added.fetch_add(1, std::memory_order_relaxed);
    }
    next_addr = addr;
  }

  PageStoreWriter::Room frame_room(size_t max_pages) {
    if (closed) fail(path, ": frame_room after finish()");
    rethrow_if_failed();
    // A full frame is submitted at once, so the frame being filled has room for a page.
    size_t left = (frame_bytes - current->in_size) / kPageSize;
    return {current->in.get() + current->in_size, std::min(left, max_pages)};
  }

  void add_pages_in_place(uint64_t addr, const unsigned char* data, size_t npages) {
    check_range("add_pages_in_place", addr, npages);
    if (npages == 0) return;
    rethrow_if_failed();
    unsigned char* base = current->in.get();
    if (data < base + current->in_size || data > base + frame_bytes ||
        npages > static_cast<size_t>(base + frame_bytes - data) / kPageSize)
      fail(path, ": add_pages_in_place of ", npages, " pages outside the room of the frame");
    for (size_t i = 0; i < npages; ++i, data += kPageSize, addr += kPageSize) {
      if (record_page(addr, data)) {
        // Pages after a zero or parent page move down over it; the destination is below.
        unsigned char* dst = base + current->in_size;
        if (dst != data) std::memcpy(dst, data, kPageSize);
        current->in_size += kPageSize;
      }
      pages_added.fetch_add(1, std::memory_order_relaxed);
    }
    next_addr = addr;
    if (current->in_size == frame_bytes) submit();
  }

  PageStoreStats finish() {
    if (closed) fail(path, ": finish() called twice");
    closed = true;
    if (current->in_size > 0) submit();
    {
      std::unique_lock<std::mutex> lock(mu);
      producer_cv.wait(lock, [this] { return in_flight == 0; });
    }
    stop_pool();
    if (error) std::rethrow_exception(error);

    uint64_t nframes = (data_pages + frame_pages - 1) / frame_pages;
    if (frame_sizes.size() != nframes)
      fail(path, ": internal error: ", frame_sizes.size(), " frames written, ", nframes,
           " expected");
    PageIndex index;
    index.set_page_size(kPageSize);
    index.set_frame_pages(frame_pages);
    index.set_level(options.level);
    index.set_data_pages(data_pages);
    index.set_zero_pages(zero_pages);
    index.mutable_runs()->Reserve(static_cast<int>(runs.size()));
    for (auto& r : runs) *index.add_runs() = std::move(r);
    runs.clear();
    index.mutable_frame_sizes()->Add(frame_sizes.begin(), frame_sizes.end());
    index.set_frame_sha256(std::move(frame_digests));
    if (raw_count > 0) index.set_raw_frames(std::move(raw_frames));
    index.set_compression(options.compression);
    index.set_page_hashes(std::move(page_hashes));
    index.set_parent_pages(parent_pages);
    size_t raw_size = index.ByteSizeLong();
    if (raw_size > kMaxIndexBytes)
      fail(path, ": index is ", raw_size, " bytes, more than the limit of ", kMaxIndexBytes);
    std::string raw;
    if (!index.SerializeToString(&raw)) fail(path, ": cannot serialize the page index");
    CCtxPtr cctx = make_cctx(options.level, true, path);
    std::string packed(ZSTD_compressBound(raw.size()), '\0');
    size_t psize = ZSTD_compress2(cctx.get(), packed.data(), packed.size(), raw.data(), raw.size());
    if (ZSTD_isError(psize))
      fail(path, ": zstd compression of the index failed: ", ZSTD_getErrorName(psize));
    uint64_t index_offset = write_offset;
    pwrite_all(fd.get(), packed.data(), psize, index_offset, path);

    unsigned char footer[kFooterSize] = {};
    put_u64(footer, index_offset);
    put_u64(footer + 8, psize);
    put_u32(footer + 16, version());
    put_u32(footer + 20, 0);
    std::memcpy(footer + 24, kFooterMagic, 8);
    pwrite_all(fd.get(), footer, kFooterSize, index_offset + psize, path);

    // The header goes last: a store that was not finished never has a valid header.
    unsigned char header[kHeaderSize];
    make_header(header);
    std::string mac_digest =
        sha256_string({{header, kHeaderSize}, {packed.data(), psize}, {footer, kFooterSize}});
    pwrite_all(fd.get(), header, kHeaderSize, 0, path);
    bytes_written.fetch_add(psize + kFooterSize + kHeaderSize, std::memory_order_relaxed);

    if (::fsync(fd.get()) != 0) fail_errno(path, ": fsync failed");
    if (::close(fd.release()) != 0) fail_errno(path, ": close failed");
    finished = true;

    PageStoreStats stats;
    stats.data_pages = data_pages;
    stats.zero_pages = zero_pages;
    stats.ref_pages = ref_pages;
    stats.parent_pages = parent_pages;
    stats.frames = nframes;
    stats.raw_frames = raw_count;
    stats.file_bytes = index_offset + psize + kFooterSize;
    stats.mac_digest = std::move(mac_digest);
    return stats;
  }
};

PageStoreWriter::PageStoreWriter(const std::string& path, const PageStoreOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = path;
  impl_->options = options;
  impl_->init();  // on failure impl_ is destroyed, which stops the pool and removes the file
}

PageStoreWriter::~PageStoreWriter() = default;

void PageStoreWriter::add_pages(uint64_t addr, const void* data, size_t npages) {
  impl_->add_pages(addr, data, npages);
}

PageStoreWriter::Room PageStoreWriter::frame_room(size_t max_pages) {
  return impl_->frame_room(max_pages);
}

void PageStoreWriter::add_pages_in_place(uint64_t addr, const void* data, size_t npages) {
  impl_->add_pages_in_place(addr, static_cast<const unsigned char*>(data), npages);
}

void PageStoreWriter::add_ref_pages(uint64_t addr, size_t npages, int32_t ref_pid,
                                    uint64_t ref_addr) {
  impl_->add_ref_pages(addr, npages, ref_pid, ref_addr);
}

PageStoreStats PageStoreWriter::finish() {
  return impl_->finish();
}

bool PageStoreWriter::parent_holds(uint64_t addr) const {
  return impl_->parent_holds(addr);
}

void PageStoreWriter::add_unchanged_pages(uint64_t addr, size_t npages) {
  impl_->add_unchanged_pages(addr, npages);
}

uint64_t PageStoreWriter::pages_added() const {
  return impl_->pages_added.load(std::memory_order_relaxed);
}

uint64_t PageStoreWriter::bytes_written() const {
  return impl_->bytes_written.load(std::memory_order_relaxed);
}

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
    if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())
      bad("header zstd level ", level, " is outside [", ZSTD_minCLevel(), ", ", ZSTD_maxCLevel(),
          "]");
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

uint64_t PageStoreReader::raw_frame_count() const {
  return impl_->raw_count;
}

const std::string& PageStoreReader::path() const {
  return impl_->path;
}
uint64_t PageStoreReader::file_size() const {
  return impl_->file_size;
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
