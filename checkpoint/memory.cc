// Memory areas of a frozen process and the pages the restore cannot get elsewhere.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "checkpoint/collect.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "common/log.h"

namespace lazycr::checkpoint {
namespace {

using image::kPageSize;
using image::MemoryArea;

constexpr size_t kReadBufferBytes = 1u << 20;  // one batch: small enough to stay in cache
constexpr size_t kMaxIov = 1024;               // IOV_MAX

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string map_files_path(pid_t pid, uint64_t start, uint64_t end) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "/proc/%d/map_files/%llx-%llx", pid,
                static_cast<unsigned long long>(start), static_cast<unsigned long long>(end));
  return buf;
}

struct Range {
  uint64_t start;
  uint64_t pages;
};

// Pages of [start, end) selected by PAGEMAP_SCAN: present or swapped, not the shared zero
// page, and (when exclude_file) not backed by the file.
void scan_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, bool exclude_file,
                       std::vector<Range>& out) {
  std::vector<abi::page_region> regions(512);
  uint64_t pos = start;
  while (pos < end) {
    abi::pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.start = pos;
    arg.end = end;
    arg.vec = reinterpret_cast<uint64_t>(regions.data());
    arg.vec_len = regions.size();
    uint64_t excluded = PAGE_IS_PFNZERO | (exclude_file ? PAGE_IS_FILE : 0);
    arg.category_inverted = excluded;
    arg.category_mask = excluded;
    arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    long n = ::ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0) fail_errno("PAGEMAP_SCAN ", std::hex, pos, "-", end);
    for (long i = 0; i < n; i++) {
      uint64_t s = regions[i].start, e = regions[i].end;
      if (!out.empty() && out.back().start + out.back().pages * kPageSize == s)
        out.back().pages += (e - s) / kPageSize;
      else
        out.push_back({s, (e - s) / kPageSize});
    }
    if (arg.walk_end <= pos) break;
    pos = arg.walk_end;
  }
}

// The shared zero page's PFN, for the /proc/PID/pagemap fallback (0 if it cannot be found).
uint64_t zero_pfn() {
  static const uint64_t pfn = [] {
    void* p = ::mmap(nullptr, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return uint64_t{0};
    volatile char c = *static_cast<volatile char*>(p);
    (void)c;
    uint64_t entry = 0;
    UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (fd) ::pread(fd.get(), &entry, 8, reinterpret_cast<uint64_t>(p) / kPageSize * 8);
    ::munmap(p, kPageSize);
    return (entry & abi::kPmPresent) ? (entry & abi::kPmPfnMask) : uint64_t{0};
  }();
  return pfn;
}

void scan_pagemap_file(int pagemap_fd, uint64_t start, uint64_t end, bool exclude_file,
                       std::vector<Range>& out) {
  std::vector<uint64_t> entries(4096);
  uint64_t zpfn = zero_pfn();
  for (uint64_t pos = start; pos < end;) {
    size_t n = std::min<uint64_t>(entries.size(), (end - pos) / kPageSize);
    ssize_t got =
        ::pread(pagemap_fd, entries.data(), n * 8, static_cast<off_t>(pos / kPageSize * 8));
    if (got != static_cast<ssize_t>(n * 8)) fail_errno("reading pagemap at ", std::hex, pos);
    for (size_t i = 0; i < n; i++) {
      uint64_t e = entries[i];
      bool present = e & abi::kPmPresent;
      bool take = (present || (e & abi::kPmSwapped)) && !(exclude_file && (e & abi::kPmFile)) &&
                  !(present && zpfn != 0 && (e & abi::kPmPfnMask) == zpfn);
      if (!take) continue;
      uint64_t a = pos + i * kPageSize;
      if (!out.empty() && out.back().start + out.back().pages * kPageSize == a)
        out.back().pages++;
      else
        out.push_back({a, 1});
    }
    pos += n * kPageSize;
  }
}

class PageReader {
 public:
  PageReader(pid_t pid, image::PageStoreWriter& writer,
             const std::function<void(uint64_t)>& progress)
      : pid_(pid), writer_(writer), progress_(progress) {
    void* p = ::mmap(nullptr, kReadBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (p == MAP_FAILED) fail_errno("cannot allocate the page read buffer");
    buf_ = static_cast<char*>(p);
  }
  ~PageReader() { ::munmap(buf_, kReadBufferBytes); }

  // Reads ranges of the process's memory (address order) and feeds the writer.
  void read_ranges(const std::vector<Range>& ranges, bool readable) {
    size_t i = 0;
    uint64_t skip = 0;  // pages of ranges[i] already done
    while (i < ranges.size()) {
      // Gather one batch: up to the buffer size and kMaxIov ranges.
      std::vector<iovec> remote;
      std::vector<Range> batch;
      size_t used = 0;
      while (i < ranges.size() && remote.size() < kMaxIov && used < kReadBufferBytes) {
        uint64_t left = ranges[i].pages - skip;
        uint64_t take = std::min<uint64_t>(left, (kReadBufferBytes - used) / kPageSize);
        uint64_t addr = ranges[i].start + skip * kPageSize;
        remote.push_back({reinterpret_cast<void*>(addr), take * kPageSize});
        batch.push_back({addr, take});
        used += take * kPageSize;
        skip += take;
        if (skip == ranges[i].pages) {
          i++;
          skip = 0;
        }
      }
      if (readable) {
        iovec local{buf_, used};
        ssize_t n = ::process_vm_readv(pid_, &local, 1, remote.data(), remote.size(), 0);
        if (n != static_cast<ssize_t>(used)) {
          if (n < 0) fail_errno("process_vm_readv of pid ", pid_, " at ", std::hex, batch[0].start);
          // A short read stops at the first page that could not be read; fall back per range.
          read_with_mem(batch);
        }
      } else {
        read_with_mem(batch);
      }
      size_t off = 0;
      for (const auto& r : batch) {
        writer_.add_pages(r.start, buf_ + off, r.pages);
        off += r.pages * kPageSize;
        stats_.pages_read += r.pages;
      }
      stats_.bytes_read += used;
      progress_(stats_.pages_read);
    }
  }

  // Contents of a shared object (shmem, memfd, deleted file) through /proc/PID/map_files,
  // reading only its data extents so holes are neither read nor allocated.
  void read_shared_object(const MemoryArea& a, uint64_t& stored) {
    std::string path = map_files_path(pid_, a.start(), a.end());
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) fail_errno("cannot open ", path, " (", a.name(), ")");
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) fail_errno("fstat ", path);
    uint64_t obj_end = std::min<uint64_t>(
        a.pgoff() + (a.end() - a.start()),
        (static_cast<uint64_t>(st.st_size) + kPageSize - 1) / kPageSize * kPageSize);
    uint64_t off = a.pgoff();
    while (off < obj_end) {
      off_t data = ::lseek(fd.get(), static_cast<off_t>(off), SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data after off
        fail_errno("SEEK_DATA in ", path);
      }
      uint64_t dstart = static_cast<uint64_t>(data) / kPageSize * kPageSize;
      if (dstart >= obj_end) break;
      off_t hole = ::lseek(fd.get(), data, SEEK_HOLE);
      if (hole < 0) fail_errno("SEEK_HOLE in ", path);
      uint64_t dend = std::min<uint64_t>(
          obj_end, (static_cast<uint64_t>(hole) + kPageSize - 1) / kPageSize * kPageSize);
      for (uint64_t pos = dstart; pos < dend;) {
        size_t len = std::min<uint64_t>(kReadBufferBytes, dend - pos);
        size_t got = 0;
        while (got < len) {
          ssize_t n = ::pread(fd.get(), buf_ + got, len - got, static_cast<off_t>(pos + got));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) fail_errno("reading ", path);
          if (n == 0) break;
          got += static_cast<size_t>(n);
        }
        std::memset(buf_ + got, 0, len - got);  // the tail of the object's last page
        uint64_t pages = len / kPageSize;
        writer_.add_pages(a.start() + (pos - a.pgoff()), buf_, pages);
        stored += pages;
        stats_.pages_read += pages;
        stats_.bytes_read += len;
        progress_(stats_.pages_read);
        pos += len;
      }
      off = dend;
    }
  }

  const MemoryStats& stats() const { return stats_; }

 private:
  // /proc/PID/mem ignores protections (the tracer reads with FOLL_FORCE).
  void read_with_mem(const std::vector<Range>& batch) {
    if (!mem_) {
      std::string path = cat("/proc/", pid_, "/mem");
      mem_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!mem_) fail_errno("cannot open ", path);
    }
    size_t off = 0;
    for (const auto& r : batch) {
      size_t len = r.pages * kPageSize;
      size_t got = 0;
      while (got < len) {
        ssize_t n =
            ::pread(mem_.get(), buf_ + off + got, len - got, static_cast<off_t>(r.start + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail_errno("cannot read memory of pid ", pid_, " at ", std::hex, r.start + got);
        got += static_cast<size_t>(n);
      }
      off += len;
    }
  }

  pid_t pid_;
  image::PageStoreWriter& writer_;
  const std::function<void(uint64_t)>& progress_;
  char* buf_ = nullptr;
  UniqueFd mem_;
  MemoryStats stats_;
};

}  // namespace

std::vector<MemoryArea> collect_areas(pid_t pid, const std::vector<proc::MapsEntry>& maps) {
  std::vector<MemoryArea> areas;
  for (const auto& m : maps) {
    MemoryArea a;
    a.set_start(m.start);
    a.set_end(m.end);
    a.set_prot((m.read ? PROT_READ : 0) | (m.write ? PROT_WRITE : 0) | (m.exec ? PROT_EXEC : 0));
    a.set_shared(m.shared);
    a.set_growsdown(m.vmflags.find("gd") != std::string::npos);
    a.set_pgoff(m.offset);
    a.set_name(m.path);
    a.set_vmflags(m.vmflags);
    const std::string& p = m.path;
    if (p == "[heap]") {
      a.set_kind(MemoryArea::HEAP);
    } else if (p == "[stack]") {
      a.set_kind(MemoryArea::STACK);
    } else if (p == "[vdso]") {
      a.set_kind(MemoryArea::VDSO);
    } else if (p == "[vvar]") {
      a.set_kind(MemoryArea::VVAR);
    } else if (p == "[vvar_vclock]") {
      a.set_kind(MemoryArea::VVAR_VCLOCK);
    } else if (p == "[vsyscall]") {
      a.set_kind(MemoryArea::VSYSCALL);
    } else if (m.inode != 0 || starts_with(p, "/")) {
      bool anon_object = ends_with(p, " (deleted)") || starts_with(p, "/memfd:") ||
                         starts_with(p, "/SYSV") || starts_with(p, "/dev/zero");
      if (m.shared)
        a.set_kind(anon_object ? MemoryArea::SHARED_ANON : MemoryArea::SHARED_FILE);
      else
        a.set_kind(MemoryArea::PRIVATE_FILE);
      *a.mutable_file() = file_identity(p, map_files_path(pid, m.start, m.end));
    } else {
      // Anonymous, including named anonymous areas ("[anon:...]") and thread stacks.
      a.set_kind(m.shared ? MemoryArea::SHARED_ANON : MemoryArea::ANON);
    }
    areas.push_back(std::move(a));
  }
  return areas;
}

MemoryStats dump_memory(pid_t pid, std::vector<MemoryArea>& areas, image::PageStoreWriter& writer,
                        const std::function<void(uint64_t pages)>& progress) {
  std::string pagemap_path = cat("/proc/", pid, "/pagemap");
  UniqueFd pagemap(::open(pagemap_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!pagemap) fail_errno("cannot open ", pagemap_path);
  bool use_scan = kernel_features().pagemap_scan;
  PageReader reader(pid, writer, progress);
  std::vector<Range> ranges;
  for (auto& a : areas) {
    uint64_t stored = 0;
    switch (a.kind()) {
      case MemoryArea::ANON:
      case MemoryArea::HEAP:
      case MemoryArea::STACK:
      case MemoryArea::PRIVATE_FILE: {
        // Private file pages still backed by the file come back from the file; a deleted
        // file cannot be reopened by path, so all its present pages are kept.
        bool exclude_file = a.kind() == MemoryArea::PRIVATE_FILE && !a.file().deleted();
        ranges.clear();
        if (use_scan)
          scan_pagemap_scan(pagemap.get(), a.start(), a.end(), exclude_file, ranges);
        else
          scan_pagemap_file(pagemap.get(), a.start(), a.end(), exclude_file, ranges);
        for (const auto& r : ranges) stored += r.pages;
        reader.read_ranges(ranges, (a.prot() & PROT_READ) != 0);
        break;
      }
      case MemoryArea::SHARED_ANON:
        reader.read_shared_object(a, stored);
        break;
      default:
        break;  // contents come from the file (SHARED_FILE) or the kernel (vdso, vvar)
    }
    a.set_stored_pages(stored);
  }
  return reader.stats();
}

}  // namespace lazycr::checkpoint
