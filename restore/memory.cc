// The eager memory strategy: every stored page is written before the process resumes.
#include "restore/memory.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/json.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;
using image::PageRun;

constexpr size_t kBufferBytes = 8u << 20;  // one batch of process_vm_writev
constexpr size_t kMaxIov = 1024;           // IOV_MAX

uint64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A stretch of pages to write: from the store (DATA) or zeros.
struct Segment {
  uint64_t addr;
  uint64_t pages;
  bool zero;
};

class EagerFiller final : public MemoryStrategy {
 public:
  EagerFiller(const image::PageStoreReader& store, const cpu_set_t* helper_cpus)
      : store_(store) {
    if (helper_cpus != nullptr) {
      helper_cpus_ = *helper_cpus;
      has_helper_cpus_ = true;
    }
  }

  ~EagerFiller() override {
    for (char* b : bufs_)
      if (b != nullptr) ::munmap(b, kBufferBytes);
  }

  const char* name() const override { return "eager"; }

  uint32_t shaping_prot(const MemoryArea& area) const override {
    // process_vm_writev honours protections: areas with pages to write are writable (and
    // readable: a write-only mapping is fine for the kernel, but keep it plain) until filled.
    if (area.stored_pages() > 0 && fills(area)) return area.prot() | PROT_READ | PROT_WRITE;
    return area.prot();
  }

  void prepare_area(RemoteProcess&, const MemoryArea& area) override {
    if (area.stored_pages() == 0 || !fills(area)) return;
    // Runs overlapping the area, clipped to it. The reader checked that runs are sorted and
    // that every stored page lies inside an area.
    const auto& runs = store_.index().runs();
    auto it = std::upper_bound(runs.begin(), runs.end(), area.start(),
                               [](uint64_t a, const PageRun& r) { return a < r.start(); });
    if (it != runs.begin()) --it;
    // Pages the store records as zero are already zero in a fresh anonymous or shared-anon
    // mapping; a private file mapping shows the file there, so those are written.
    const bool write_zero = area.kind() == MemoryArea::PRIVATE_FILE;
    for (; it != runs.end() && it->start() < area.end(); ++it) {
      uint64_t s = std::max(it->start(), area.start());
      uint64_t e = std::min(it->start() + it->pages() * kPageSize, area.end());
      if (s >= e) continue;
      bool zero = it->kind() == PageRun::ZERO;
      if (zero && !write_zero) continue;
      segments_.push_back({s, (e - s) / kPageSize, zero});
    }
  }

  // Two buffers in a pipeline: a helper thread reads (decompresses) the next batch from the
  // store while this thread writes the previous one into the process.
  void fill_mapped(RemoteProcess& target) override {
    uint64_t t0 = now_ns();
    if (segments_.empty()) return;
    for (auto& b : bufs_) {
      if (b != nullptr) continue;
      void* p = ::mmap(nullptr, kBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
      if (p == MAP_FAILED) fail_errno("cannot allocate a page write buffer");
      b = static_cast<char*>(p);
    }
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Batch> ready;
    std::vector<char*> free_bufs(bufs_.begin(), bufs_.end());
    bool produced_all = false, stop = false;
    std::exception_ptr producer_error;

    std::thread producer([&] {
      if (has_helper_cpus_) ::sched_setaffinity(0, sizeof helper_cpus_, &helper_cpus_);
      try {
        produce(mu, cv, ready, free_bufs, stop);
      } catch (...) {
        producer_error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu);
      produced_all = true;
      cv.notify_all();
    });
    try {
      for (;;) {
        Batch b;
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return !ready.empty() || produced_all; });
          if (ready.empty()) break;
          b = std::move(ready.front());
          ready.pop_front();
        }
        uint64_t w0 = now_ns();
        write_batch(target.pid(), b.buf, b.used, b.remote);
        stats_.write_ns += now_ns() - w0;
        std::lock_guard<std::mutex> lock(mu);
        free_bufs.push_back(b.buf);
        cv.notify_all();
      }
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(mu);
        stop = true;
        cv.notify_all();
      }
      producer.join();
      throw;
    }
    producer.join();
    if (producer_error) std::rethrow_exception(producer_error);
    segments_.clear();
    segments_.shrink_to_fit();
    stats_.fill_ns += now_ns() - t0;
  }

  void after_shaping(RemoteProcess&) override {}
  void on_running(RemoteProcess&) override {}
  MemoryStats stats() const override { return stats_; }

 private:
  // Areas whose stored pages this strategy writes: everything with contents in the store.
  static bool fills(const MemoryArea& area) {
    switch (area.kind()) {
      case MemoryArea::ANON:
      case MemoryArea::HEAP:
      case MemoryArea::STACK:
      case MemoryArea::PRIVATE_FILE:
      case MemoryArea::SHARED_ANON:
        return true;
      default:
        return false;
    }
  }

  struct Batch {
    char* buf = nullptr;
    size_t used = 0;
    std::vector<iovec> remote;
  };

  // Helper thread: cuts the segments into batches (one buffer, at most kMaxIov ranges each)
  // and fills them from the store, in address order.
  void produce(std::mutex& mu, std::condition_variable& cv, std::deque<Batch>& ready,
               std::vector<char*>& free_bufs, const bool& stop) {
    Batch b;
    auto next_buffer = [&]() -> bool {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return !free_bufs.empty() || stop; });
      if (stop) return false;
      b.buf = free_bufs.back();
      free_bufs.pop_back();
      b.used = 0;
      b.remote.clear();
      return true;
    };
    auto hand_over = [&] {
      std::lock_guard<std::mutex> lock(mu);
      ready.push_back(std::move(b));
      cv.notify_all();
      b = Batch();
    };
    if (!next_buffer()) return;
    for (const auto& seg : segments_) {
      uint64_t done = 0;
      while (done < seg.pages) {
        if (b.used == kBufferBytes || b.remote.size() == kMaxIov) {
          hand_over();
          if (!next_buffer()) return;
        }
        uint64_t n = std::min<uint64_t>(seg.pages - done, (kBufferBytes - b.used) / kPageSize);
        uint64_t addr = seg.addr + done * kPageSize;
        uint64_t r0 = now_ns();
        if (seg.zero)
          std::memset(b.buf + b.used, 0, n * kPageSize);
        else
          store_.read(addr, n, b.buf + b.used);
        stats_.read_ns += now_ns() - r0;
        if (!b.remote.empty() && reinterpret_cast<uint64_t>(b.remote.back().iov_base) +
                                         b.remote.back().iov_len == addr)
          b.remote.back().iov_len += n * kPageSize;
        else
          b.remote.push_back({reinterpret_cast<void*>(addr), n * kPageSize});
        b.used += n * kPageSize;
        done += n;
        stats_.pages_written += n;
      }
    }
    if (b.used > 0) hand_over();
  }

  // Writes buf[0, used) to the remote ranges, resuming after short writes.
  void write_batch(pid_t pid, char* buf, size_t used, const std::vector<iovec>& remote) {
    size_t done = 0;  // bytes written so far
    size_t ri = 0;    // first remote iovec not completely written
    size_t rskip = 0; // bytes of remote[ri] already written
    while (done < used) {
      std::vector<iovec> rest(remote.begin() + static_cast<long>(ri), remote.end());
      rest[0].iov_base = static_cast<char*>(rest[0].iov_base) + rskip;
      rest[0].iov_len -= rskip;
      iovec local{buf + done, used - done};
      ssize_t n = ::process_vm_writev(pid, &local, 1, rest.data(), rest.size(), 0);
      stats_.write_calls++;
      if (n < 0 && errno == EINTR) continue;
      uint64_t at = reinterpret_cast<uint64_t>(rest[0].iov_base);
      if (n < 0) fail_errno("process_vm_writev into pid ", pid, " at ", hex(at));
      if (n == 0) fail("process_vm_writev into pid ", pid, " at ", hex(at), ": no progress");
      done += static_cast<size_t>(n);
      stats_.bytes_written += static_cast<size_t>(n);
      size_t left = static_cast<size_t>(n);
      while (left > 0 && ri < remote.size()) {
        size_t avail = remote[ri].iov_len - rskip;
        if (left >= avail) {
          left -= avail;
          ri++;
          rskip = 0;
        } else {
          rskip += left;
          left = 0;
        }
      }
    }
  }

  const image::PageStoreReader& store_;
  std::vector<Segment> segments_;
  std::array<char*, 2> bufs_{};
  cpu_set_t helper_cpus_;
  bool has_helper_cpus_ = false;
  MemoryStats stats_;
};

}  // namespace

std::unique_ptr<MemoryStrategy> make_eager_filler(const image::PageStoreReader& store,
                                                  const cpu_set_t* helper_cpus) {
  return std::make_unique<EagerFiller>(store, helper_cpus);
}

}  // namespace lazycr::restore
