// The page store's writer (page_store.h); the layout is in FORMAT.md.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
// ZSTD_c_literalCompressionMode (auto codec); a parameter of the stable ZSTD_CCtx_setParameter.
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/lz4_frame.h"
#include "image-format/page_store.h"
#include "image-format/page_store_internal.h"
#include "image-format/sha256_pair.h"

namespace lazycr::image {
namespace {

using namespace store_detail;

struct ZstdCCtxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
using CCtxPtr = std::unique_ptr<ZSTD_CCtx, ZstdCCtxDeleter>;

// Page frames go without zstd's checksum (their SHA-256 digests check them); the index,
// which image.mac covers but no digest of its own, keeps it.
CCtxPtr make_cctx(int level, bool checksum, const std::string& path, bool literals = false) {
  CCtxPtr cctx(ZSTD_createCCtx());
  if (!cctx) fail(path, ": cannot create a zstd compression context");
  for (auto [param, value] :
       {std::pair{ZSTD_c_compressionLevel, level}, std::pair{ZSTD_c_checksumFlag, checksum ? 1 : 0},
        std::pair{ZSTD_c_contentSizeFlag, 1},
        std::pair{ZSTD_c_literalCompressionMode,
                  static_cast<int>(literals ? ZSTD_ps_enable : ZSTD_ps_auto)}}) {
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
  std::vector<std::unique_ptr<Job>> spare;  // empty frames taken from free_jobs
  // frame_rooms(): empty frames lent after the current one, in the order they fill; and where
  // the pages add_pages_in_place() took end (in the current frame, 0, or lent[i], i + 1).
  std::deque<std::unique_ptr<Job>> lent;
  const unsigned char* consumed = nullptr;
  size_t consumed_frame = 0;

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
    if (options.compression == PageIndex::ZSTD &&
        (options.level < ZSTD_minCLevel() || options.level > ZSTD_maxCLevel()))
      fail(path, ": zstd level ", options.level, " is outside [", ZSTD_minCLevel(), ", ",
           ZSTD_maxCLevel(), "]");
    if (options.compression != PageIndex::ZSTD && options.compression != PageIndex::NONE &&
        options.compression != PageIndex::LZ4)
      fail(path, ": unknown compression ", static_cast<int>(options.compression));
    if (options.compression == PageIndex::LZ4 &&
        (options.level < 1 || options.level > kLz4MaxAcceleration))
      fail(path, ": lz4 acceleration ", options.level, " is outside [1, ", kLz4MaxAcceleration,
           "]");
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
      // Two frames at a time when two are queued: their digests are then computed together,
      // interleaved (sha256_pair.h: ~2x one digest's speed on the SHA extensions).
      std::unique_ptr<Job> job[2];
      for (auto& j : job) {
        if (queue.empty()) break;
        j = std::move(queue.front());
        queue.pop_front();
      }
      bool skip = error != nullptr || stop;
      lock.unlock();
      if (!skip) {
        try {
          if (!cctx && options.compression == PageIndex::ZSTD)
            cctx = make_cctx(options.level, false, path, options.zstd_literals);
          for (auto& j : job)
            if (j) compress(cctx.get(), *j);
          // Here, on the compressing threads, not in the one writer's turn: the digests of
          // a dump cost no time the writer waits for.
          if (job[1])
            sha256_pair(job[0]->stored(), job[0]->stored_size(), job[1]->stored(),
                        job[1]->stored_size(), job[0]->digest, job[1]->digest);
          else
            sha256({{job[0]->stored(), job[0]->stored_size()}}, job[0]->digest);
        } catch (...) {
          lock.lock();
          if (!error) error = std::current_exception();
          lock.unlock();
        }
      }
      lock.lock();
      for (auto& j : job)
        if (j) done.emplace(j->seq, std::move(j));
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

  // Hands the current frame to the pool; blocks while too many frames are in flight. The next
  // frame is the first lent one (frame_rooms), else a free one.
  void submit() {
    current->seq = next_seq++;
    std::unique_lock<std::mutex> lock(mu);
    if (in_flight >= max_in_flight)
      producer_cv.wait(lock, [this] { return in_flight <= low_water() || error; });
    if (error) std::rethrow_exception(error);
    ++in_flight;
    queue.push_back(std::move(current));
    for (auto& j : free_jobs) spare.push_back(std::move(j));
    free_jobs.clear();
    lock.unlock();
    work_cv.notify_one();
    if (!lent.empty()) {
      current = std::move(lent.front());
      lent.pop_front();
    } else if (!spare.empty()) {
      current = std::move(spare.back());
      spare.pop_back();
    } else {
      current = new_job();
    }
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
    return_lent();
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

  // Frames lent by frame_rooms() and not filled go back to the spares; the next pages go
  // after those already in the current frame.
  void return_lent() {
    for (auto& j : lent) spare.push_back(std::move(j));
    lent.clear();
    consumed = current->in.get() + current->in_size;
    consumed_frame = 0;
  }

  std::unique_ptr<Job> take_spare() {
    if (spare.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& j : free_jobs) spare.push_back(std::move(j));
      free_jobs.clear();
    }
    if (spare.empty()) return new_job();
    std::unique_ptr<Job> j = std::move(spare.back());
    spare.pop_back();
    return j;
  }

  PageStoreWriter::Room frame_room(size_t max_pages) {
    if (closed) fail(path, ": frame_room after finish()");
    rethrow_if_failed();
    return_lent();
    // A full frame is submitted at once, so the frame being filled has room for a page.
    size_t left = (frame_bytes - current->in_size) / kPageSize;
    return {current->in.get() + current->in_size, std::min(left, max_pages)};
  }

  void frame_rooms(size_t max_pages, std::vector<PageStoreWriter::Room>& rooms) {
    rooms.clear();
    rooms.push_back(frame_room(max_pages));
    size_t total = rooms.back().pages;
    while (total < max_pages) {
      std::unique_ptr<Job> j = take_spare();
      j->in_size = 0;
      const size_t n = std::min<size_t>(frame_pages, max_pages - total);
      rooms.push_back({j->in.get(), n});
      lent.push_back(std::move(j));
      total += n;
    }
  }

  // The frame holding `data`: 0 for the current one, i + 1 for lent[i]; fails elsewhere.
  size_t frame_of(const unsigned char* data, size_t npages) const {
    auto inside = [&](const Job& j) {
      return data >= j.in.get() && data < j.in.get() + frame_bytes &&
             npages <= static_cast<size_t>(j.in.get() + frame_bytes - data) / kPageSize;
    };
    if (inside(*current)) return 0;
    for (size_t i = 0; i < lent.size(); ++i)
      if (inside(*lent[i])) return i + 1;
    fail(path, ": add_pages_in_place of ", npages, " pages outside the room of the frame");
  }

  void add_pages_in_place(uint64_t addr, const unsigned char* data, size_t npages) {
    check_range("add_pages_in_place", addr, npages);
    if (npages == 0) return;
    rethrow_if_failed();
    size_t k = frame_of(data, npages);
    if (k < consumed_frame || (k == consumed_frame && data < consumed) ||
        (k == 0 && data < current->in.get() + current->in_size))
      fail(path, ": add_pages_in_place of ", npages, " pages outside the room of the frame");
    bool source_gone = false;  // `data` was in a frame now submitted
    for (size_t i = 0; i < npages; ++i, data += kPageSize, addr += kPageSize) {
      if (record_page(addr, data)) {
        // Pages after a zero or parent page move down over it (into an earlier frame when
        // the pages were read into a lent one); the destination is never after the source.
        unsigned char* dst = current->in.get() + current->in_size;
        if (dst != data) std::memcpy(dst, data, kPageSize);
        current->in_size += kPageSize;
        if (current->in_size == frame_bytes) {
          submit();  // the next lent frame, if any, becomes the current one
          if (k == 0)
            source_gone = true;  // the source was the frame's last page: the loop ends
          else
            --k;
        }
      }
    }
    pages_added.fetch_add(npages, std::memory_order_relaxed);
    next_addr = addr;
    if (source_gone) {
      consumed = current->in.get();
      consumed_frame = 0;
    } else {
      consumed = data;
      consumed_frame = k;
    }
  }

  PageStoreStats finish() {
    if (closed) fail(path, ": finish() called twice");
    closed = true;
    return_lent();
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

void PageStoreWriter::frame_rooms(size_t max_pages, std::vector<Room>& rooms) {
  impl_->frame_rooms(max_pages, rooms);
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

std::string PageStoreWriter::choose_codec(const void* sample, size_t bytes) {
  Impl& m = *impl_;
  if (!m.options.auto_codec) return compression_name(m.options);
  if (m.pages_added.load() != 0 || m.next_seq != 0)
    fail(m.path, ": the codec is chosen before any page is added");
  // A frame's worth at a time, as the store would compress it.
  const auto* in = static_cast<const unsigned char*>(sample);
  // Frames LZ4 cannot compress at all are stored raw whatever the codec: they say nothing.
  // zstd is taken where LZ4 leaves more than half of the others and zstd (literals
  // compressed) a tenth less; it is only tried then.
  std::vector<unsigned char> out(std::max(lz4_frame_bound(m.frame_bytes), m.out_capacity));
  std::vector<std::pair<size_t, size_t>> frames;  // compressible ones: offset, size
  uint64_t compressible = 0, lz4_bytes = 0, zstd_bytes = 0;
  for (size_t at = 0; at < bytes; at += m.frame_bytes) {
    const size_t n = std::min<size_t>(m.frame_bytes, bytes - at);
    const size_t r = lz4_compress_frame(in + at, n, out.data(), out.size(), m.options.level);
    if (r == 0 || saves_too_little(r, n)) continue;
    frames.push_back({at, n});
    compressible += n;
    lz4_bytes += r;
  }
  const bool lz4_does_badly = lz4_bytes * 2 > compressible;
  if (lz4_does_badly) {
    CCtxPtr cctx = make_cctx(kAutoZstdLevel, false, m.path, true);
    for (auto [at, n] : frames) {
      const size_t z = ZSTD_compress2(cctx.get(), out.data(), out.size(), in + at, n);
      zstd_bytes += ZSTD_isError(z) ? n : std::min(z, n);
    }
  }
  PageStoreOptions chosen = m.options;
  if (lz4_does_badly && zstd_bytes * 10 < lz4_bytes * 9) {
    chosen.compression = PageIndex::ZSTD;
    chosen.level = kAutoZstdLevel;
    chosen.zstd_literals = true;
  }
  chosen.auto_codec = false;
  const std::string name = compression_name(chosen);
  chosen.auto_codec = true;  // recorded as such in the inventory; the index holds the codec
  m.options = chosen;
  return name;
}

uint64_t PageStoreWriter::pages_added() const {
  return impl_->pages_added.load(std::memory_order_relaxed);
}

uint64_t PageStoreWriter::bytes_written() const {
  return impl_->bytes_written.load(std::memory_order_relaxed);
}
}  // namespace lazycr::image
