// The eager memory strategy: every stored page is written before the process resumes.
#include "restore/memory.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "common/clock.h"
#include "common/error.h"
#include "common/json.h"
#include "image-format/page_store_direct.h"

namespace lazycr::restore {

bool eager_fills(const image::MemoryArea& area) {
  switch (area.kind()) {
    case image::MemoryArea::ANON:
    case image::MemoryArea::HEAP:
    case image::MemoryArea::STACK:
    case image::MemoryArea::PRIVATE_FILE:
    case image::MemoryArea::SHARED_ANON:
      return true;
    default:
      return false;
  }
}

bool has_vmflag(const std::string& vmflags, const char* f) {
  for (size_t i = 0; i + 2 <= vmflags.size(); i += 3)
    if (vmflags.compare(i, 2, f) == 0) return true;
  return false;
}

namespace {

using image::kPageSize;
using image::MemoryArea;
using image::PageRun;

constexpr size_t kBufferBytes = 8u << 20;  // one batch of process_vm_writev
constexpr size_t kMaxIov = 1024;           // IOV_MAX

// A stretch of pages to write: from the store (DATA) or zeros.
struct Segment {
  uint64_t addr;
  uint64_t pages;
  bool zero;
};

class EagerFiller final : public MemoryStrategy {
 public:
  EagerFiller(const image::PageStoreReader& store, const cpu_set_t* helper_cpus,
              const EagerPreread* preread)
      : store_(store), preread_(preread) {
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
    if (area.stored_pages() > 0 && eager_fills(area)) return area.prot() | PROT_READ | PROT_WRITE;
    return area.prot();
  }

  void prepare_area(RemoteProcess&, const MemoryArea& area) override {
    if (area.stored_pages() == 0 || !eager_fills(area)) return;
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

  // An area this process inherited from its parent at fork, holding the parent's restored
  // pages (copy-on-write, one physical page for both): only the pages that differ are written.
  // Pages the image stores as the parent's own (REF to the parent at the same address) stay
  // shared; pages the process did not have are dropped (an anonymous area reads zeros there).
  // A shared object needs nothing: the parent filled it.
  void prepare_inherited_area(RemoteProcess&, const MemoryArea& area, int parent_pid) override {
    if (area.kind() == MemoryArea::SHARED_ANON) return;
    const auto& runs = store_.index().runs();
    auto it = std::upper_bound(runs.begin(), runs.end(), area.start(),
                               [](uint64_t a, const PageRun& r) { return a < r.start(); });
    if (it != runs.begin()) --it;
    uint64_t covered = area.start();
    auto drop_upto = [&](uint64_t to) {
      if (to > covered) drops_.push_back({covered, (to - covered) / kPageSize, false});
    };
    for (; it != runs.end() && it->start() < area.end(); ++it) {
      uint64_t s = std::max(it->start(), area.start());
      uint64_t e = std::min(it->start() + it->pages() * kPageSize, area.end());
      if (s >= e) continue;
      drop_upto(s);
      covered = e;
      if (it->kind() == PageRun::REF && it->ref_pid() == parent_pid &&
          it->ref_addr() == it->start())
        continue;  // the parent's page, already here
      segments_.push_back({s, (e - s) / kPageSize, it->kind() == PageRun::ZERO});
    }
    drop_upto(area.end());
  }

  // Batches (one buffer of up to 8 MiB and 1024 ranges each) are independent: two workers,
  // this thread and a helper, each take the next batch, read (decompress) it from the store
  // into their own buffer and write it into the process, so that both CPUs work on reads and
  // writes alike.
  void fill_mapped(RemoteProcess& target) override {
    for (const Segment& d : drops_)
      target.inject(cat("madvise(MADV_DONTNEED) of the inherited pages ", hex(d.addr), "-",
                        hex(d.addr + d.pages * kPageSize), " the process did not have"),
                    SYS_madvise, d.addr, d.pages * kPageSize, MADV_DONTNEED);
    drops_.clear();
    uint64_t t0 = now_ns();
    if (segments_.empty()) return;
    std::vector<Plan> plans = plan_batches();
    for (auto& b : bufs_) {
      if (b != nullptr) continue;
      void* p =
          ::mmap(nullptr, kBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) fail_errno("cannot allocate a page write buffer");
      b = static_cast<char*>(p);
    }
    std::atomic<size_t> next{0};
    std::atomic<bool> stop{false};
    WorkerStats helper_stats;
    std::exception_ptr helper_error;
    const pid_t pid = target.pid();
    std::thread helper([&] {
      if (has_helper_cpus_) ::sched_setaffinity(0, sizeof helper_cpus_, &helper_cpus_);
      try {
        work(pid, plans, bufs_[1], next, stop, helper_stats);
      } catch (...) {
        helper_error = std::current_exception();
        stop = true;
      }
    });
    WorkerStats mine;
    try {
      work(pid, plans, bufs_[0], next, stop, mine);
    } catch (...) {
      stop = true;
      helper.join();
      throw;
    }
    helper.join();
    if (helper_error) std::rethrow_exception(helper_error);
    for (const WorkerStats* w : {&mine, &helper_stats}) {
      stats_.read_ns += w->read_ns;
      stats_.write_ns += w->write_ns;
      stats_.write_calls += w->write_calls;
      stats_.bytes_written += w->bytes;
      stats_.pages_written += w->bytes / kPageSize;
    }
    segments_.clear();
    segments_.shrink_to_fit();
    stats_.fill_ns += now_ns() - t0;
  }

  void after_shaping(RemoteProcess&) override {}
  void on_running(RemoteProcess&) override {}
  MemoryStats stats() const override { return stats_; }

 private:
  // One batch: pieces of segments that fill one buffer.
  struct Plan {
    std::vector<Segment> pieces;
  };
  struct WorkerStats {
    uint64_t read_ns = 0, write_ns = 0, write_calls = 0, bytes = 0;
  };

  std::vector<Plan> plan_batches() const {
    std::vector<Plan> plans(1);
    size_t used = 0;
    for (const auto& seg : segments_) {
      uint64_t done = 0;
      while (done < seg.pages) {
        if (used == kBufferBytes || plans.back().pieces.size() == kMaxIov) {
          plans.emplace_back();
          used = 0;
        }
        uint64_t n = std::min<uint64_t>(seg.pages - done, (kBufferBytes - used) / kPageSize);
        plans.back().pieces.push_back({seg.addr + done * kPageSize, n, seg.zero});
        used += n * kPageSize;
        done += n;
      }
    }
    return plans;
  }

  void work(pid_t pid, const std::vector<Plan>& plans, char* buf, std::atomic<size_t>& next,
            const std::atomic<bool>& stop, WorkerStats& ws) {
    std::vector<iovec> remote;
    remote.reserve(kMaxIov);
    // Each page is read once: whole frames go straight into buf (no cache copy, digests two
    // at a time), the rest through the store's cache.
    image::DirectPageReader direct;
    for (size_t i = next++; i < plans.size() && !stop; i = next++) {
      uint64_t r0 = now_ns();
      size_t used = 0;
      remote.clear();
      for (const auto& piece : plans[i].pieces) {
        size_t bytes = piece.pages * kPageSize;
        if (piece.zero)
          std::memset(buf + used, 0, bytes);
        else if (preread_ == nullptr ||
                 !preread_->copy(store_, piece.addr, piece.pages, buf + used))
          direct.read(store_, piece.addr, piece.pages, buf + used);
        if (!remote.empty() &&
            reinterpret_cast<uint64_t>(remote.back().iov_base) + remote.back().iov_len ==
                piece.addr)
          remote.back().iov_len += bytes;
        else
          remote.push_back({reinterpret_cast<void*>(piece.addr), bytes});
        used += bytes;
      }
      uint64_t w0 = now_ns();
      ws.read_ns += w0 - r0;
      ws.write_calls += write_batch(pid, buf, used, remote);
      ws.write_ns += now_ns() - w0;
      ws.bytes += used;
    }
  }

  // Writes buf[0, used) to the remote ranges, resuming after short writes. Returns the number
  // of process_vm_writev calls.
  static uint64_t write_batch(pid_t pid, char* buf, size_t used, const std::vector<iovec>& remote) {
    uint64_t calls = 0;
    size_t done = 0;   // bytes written so far
    size_t ri = 0;     // first remote iovec not completely written
    size_t rskip = 0;  // bytes of remote[ri] already written
    while (done < used) {
      std::vector<iovec> rest(remote.begin() + static_cast<long>(ri), remote.end());
      rest[0].iov_base = static_cast<char*>(rest[0].iov_base) + rskip;
      rest[0].iov_len -= rskip;
      iovec local{buf + done, used - done};
      ssize_t n = ::process_vm_writev(pid, &local, 1, rest.data(), rest.size(), 0);
      calls++;
      if (n < 0 && errno == EINTR) continue;
      uint64_t at = reinterpret_cast<uint64_t>(rest[0].iov_base);
      if (n < 0) fail_errno("process_vm_writev into pid ", pid, " at ", hex(at));
      if (n == 0) fail("process_vm_writev into pid ", pid, " at ", hex(at), ": no progress");
      done += static_cast<size_t>(n);
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
    return calls;
  }

  const image::PageStoreReader& store_;
  const EagerPreread* preread_;
  std::vector<Segment> segments_;
  std::vector<Segment> drops_;  // inherited pages to drop (prepare_inherited_area)
  std::array<char*, 2> bufs_{};
  cpu_set_t helper_cpus_;
  bool has_helper_cpus_ = false;
  MemoryStats stats_;
};

}  // namespace

std::unique_ptr<MemoryStrategy> make_eager_filler(const image::PageStoreReader& store,
                                                  const cpu_set_t* helper_cpus,
                                                  const EagerPreread* preread) {
  return std::make_unique<EagerFiller>(store, helper_cpus, preread);
}

}  // namespace lazycr::restore
