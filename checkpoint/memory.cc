// Memory areas of a frozen process and the pages the restore cannot get elsewhere.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <tuple>

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

// One batch, one process_vm_readv: several frames' rooms (16 at 64 KiB frames), small enough
// to stay in cache.
constexpr size_t kReadBufferBytes = 1u << 20;
constexpr size_t kMaxIov = 1024;  // IOV_MAX

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

using Range = MemoryPlan::Run;

UniqueFd open_pagemap(pid_t pid) {
  std::string path = cat("/proc/", pid, "/pagemap");
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno("cannot open ", path);
  return fd;
}

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
  // via_mem: read everything through /proc/PID/mem (see write_memory).
  PageReader(pid_t pid, image::PageStoreWriter& writer,
             const std::function<void(uint64_t)>& progress, bool via_mem)
      : pid_(pid), writer_(writer), progress_(progress), via_mem_(via_mem) {
    void* p = ::mmap(nullptr, kReadBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (p == MAP_FAILED) fail_errno("cannot allocate the page read buffer");
    buf_ = static_cast<char*>(p);
  }
  ~PageReader() { ::munmap(buf_, kReadBufferBytes); }

  // Reads ranges of the process's memory (address order) and feeds the writer; REF ranges
  // go to the writer as they are.
  void read_ranges(const std::vector<Range>& ranges, bool readable) {
    size_t i = 0;
    uint64_t skip = 0;  // pages of ranges[i] already done
    std::vector<iovec> remote;
    std::vector<Range> batch;
    while (i < ranges.size()) {
      if (ranges[i].unchanged) {
        writer_.add_unchanged_pages(ranges[i].start, ranges[i].pages);
        stats_.unread_pages += ranges[i].pages;
        i++;
        continue;
      }
      if (ranges[i].ref_pid != 0) {
        writer_.add_ref_pages(ranges[i].start, ranges[i].pages, ranges[i].ref_pid,
                              ranges[i].ref_addr);
        stats_.ref_pages += ranges[i].pages;
        i++;
        continue;
      }
      // Gather one batch: what the writer's rooms hold (pages are read straight into its
      // frames: no copy; several frames per call), and kMaxIov ranges.
      writer_.frame_rooms(kReadBufferBytes / kPageSize, rooms_);
      size_t room_bytes = 0;
      local_.clear();
      for (const auto& r : rooms_) {
        local_.push_back({r.data, r.pages * kPageSize});
        room_bytes += r.pages * kPageSize;
      }
      remote.clear();
      batch.clear();
      size_t used = 0;
      while (i < ranges.size() && ranges[i].ref_pid == 0 && !ranges[i].unchanged &&
             remote.size() < kMaxIov && used < room_bytes) {
        uint64_t left = ranges[i].pages - skip;
        uint64_t take = std::min<uint64_t>(left, (room_bytes - used) / kPageSize);
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
      // The batch's ranges cut where the rooms end: one piece, one destination.
      pieces_.clear();
      size_t room = 0, room_off = 0;
      for (const auto& r : batch) {
        for (uint64_t done = 0; done < r.pages;) {
          uint64_t n = std::min<uint64_t>(r.pages - done, rooms_[room].pages - room_off);
          pieces_.push_back(
              {r.start + done * kPageSize, rooms_[room].data + room_off * kPageSize, n});
          done += n;
          room_off += n;
          if (room_off == rooms_[room].pages) {
            room++;
            room_off = 0;
          }
        }
      }
      size_t nlocal = 0;
      for (size_t left = used; left > 0; nlocal++) {
        local_[nlocal].iov_len = std::min(left, local_[nlocal].iov_len);
        left -= local_[nlocal].iov_len;
      }
      if (readable && !via_mem_) {
        ssize_t n =
            ::process_vm_readv(pid_, local_.data(), nlocal, remote.data(), remote.size(), 0);
        if (n != static_cast<ssize_t>(used)) {
          if (n < 0) fail_errno("process_vm_readv of pid ", pid_, " at ", std::hex, batch[0].start);
          // A short read stops at the first page that could not be read; fall back per range.
          read_with_mem(pieces_);
        }
      } else {
        read_with_mem(pieces_);
      }
      for (const auto& p : pieces_) {
        writer_.add_pages_in_place(p.addr, p.data, p.pages);
        stats_.pages_read += p.pages;
      }
      stats_.bytes_read += used;
      progress_(stats_.pages_read);
    }
  }

  // Contents of a shared object (shmem, memfd, deleted file) through /proc/PID/map_files,
  // reading only its data extents so holes are neither read nor allocated. With `runs` (the
  // object's pages stored so far in this dump), pages another process stored become REFs.
  // `copy`: the object as copied at the freeze (live dump), read instead of the mapping.
  void read_shared_object(const MemoryArea& a, uint64_t& stored,
                          std::vector<PageDedup::Stored>* runs, const UniqueFd* copy = nullptr) {
    std::string path = copy != nullptr && *copy ? cat("the copy of ", a.name())
                                                : map_files_path(pid_, a.start(), a.end());
    UniqueFd own;
    if (copy == nullptr || !*copy) {
      own.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!own) fail_errno("cannot open ", path, " (", a.name(), ")");
    }
    const UniqueFd& fd = own ? own : *copy;
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
        uint64_t addr = a.start() + (pos - a.pgoff());
        uint64_t limit = dend;
        if (runs != nullptr) {
          const PageDedup::Stored* cover = nullptr;
          for (const auto& r : *runs) {
            if (r.pid == pid_) continue;  // a REF names an earlier process, never itself
            uint64_t r_end = r.offset + r.pages * kPageSize;
            if (r.offset <= pos && pos < r_end) {
              cover = &r;
              break;
            }
            if (r.offset > pos) limit = std::min(limit, r.offset);
          }
          if (cover != nullptr) {
            uint64_t n =
                (std::min(dend, cover->offset + cover->pages * kPageSize) - pos) / kPageSize;
            writer_.add_ref_pages(addr, n, cover->pid, cover->addr + (pos - cover->offset));
            stored += n;
            stats_.ref_pages += n;
            pos += n * kPageSize;
            continue;
          }
        }
        size_t len = std::min<uint64_t>(kReadBufferBytes, limit - pos);
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
        writer_.add_pages(addr, buf_, pages);
        if (runs != nullptr) {
          PageDedup::Stored* last = runs->empty() ? nullptr : &runs->back();
          if (last != nullptr && last->pid == pid_ &&
              last->offset + last->pages * kPageSize == pos &&
              last->addr + last->pages * kPageSize == addr)
            last->pages += pages;
          else
            runs->push_back({pid_, pos, pages, addr});
        }
        stored += pages;
        stats_.pages_read += pages;
        stats_.bytes_read += len;
        progress_(stats_.pages_read);
        pos += len;
      }
      off = dend;
    }
  }

  // Pages copied while frozen (plan.copied), in run order.
  void feed_copied(const std::vector<Range>& ranges, const std::string& copied) {
    size_t off = 0;
    for (const auto& r : ranges) {
      if (r.unchanged) {
        writer_.add_unchanged_pages(r.start, r.pages);
        stats_.unread_pages += r.pages;
        continue;
      }
      if (r.ref_pid != 0) {
        writer_.add_ref_pages(r.start, r.pages, r.ref_pid, r.ref_addr);
        stats_.ref_pages += r.pages;
        continue;
      }
      writer_.add_pages(r.start, copied.data() + off, r.pages);
      off += r.pages * kPageSize;
      stats_.pages_read += r.pages;
      stats_.bytes_read += r.pages * kPageSize;
    }
    progress_(stats_.pages_read);
  }

  const MemoryStats& stats() const { return stats_; }
  void add_stats(const MemoryStats& s) {
    stats_.pages_read += s.pages_read;
    stats_.bytes_read += s.bytes_read;
    stats_.ref_pages += s.ref_pages;
  }

 private:
  // Where one piece of a batch goes: `pages` pages from `addr`, read into `data`.
  struct Piece {
    uint64_t addr;
    unsigned char* data;
    uint64_t pages;
  };

  // /proc/PID/mem ignores protections (the tracer reads with FOLL_FORCE).
  void read_with_mem(const std::vector<Piece>& pieces) {
    if (!mem_) {
      std::string path = cat("/proc/", pid_, "/mem");
      mem_.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!mem_) fail_errno("cannot open ", path);
    }
    for (const auto& p : pieces) {
      size_t len = p.pages * kPageSize;
      size_t got = 0;
      while (got < len) {
        ssize_t n = ::pread(mem_.get(), p.data + got, len - got, static_cast<off_t>(p.addr + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) fail_errno("cannot read memory of pid ", pid_, " at ", std::hex, p.addr + got);
        got += static_cast<size_t>(n);
      }
    }
  }

  pid_t pid_;
  image::PageStoreWriter& writer_;
  const std::function<void(uint64_t)>& progress_;
  bool via_mem_;
  char* buf_ = nullptr;
  std::vector<image::PageStoreWriter::Room> rooms_;
  std::vector<iovec> local_;
  std::vector<Piece> pieces_;
  UniqueFd mem_;
  MemoryStats stats_;
};

}  // namespace

std::vector<MemoryArea> collect_areas(pid_t pid, const std::vector<proc::MapsEntry>& maps) {
  std::vector<MemoryArea> areas;
  // A library maps one file 4-5 times: stat it once (the frozen time pays each stat).
  std::map<std::tuple<uint32_t, uint32_t, uint64_t, std::string>, image::FileIdentity> files;
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
      const auto key = std::tuple(m.dev_major, m.dev_minor, m.inode, p);
      auto known = files.find(key);
      if (known != files.end()) {
        *a.mutable_file() = known->second;
      } else {
        *a.mutable_file() = file_identity(p, map_files_path(pid, m.start, m.end));
        if (m.inode != 0) files.emplace(key, a.file());  // inode 0: no file to know again
      }
    } else {
      // Anonymous, including named anonymous areas ("[anon:...]") and thread stacks.
      a.set_kind(m.shared ? MemoryArea::SHARED_ANON : MemoryArea::ANON);
    }
    areas.push_back(std::move(a));
  }
  return areas;
}

namespace {

// Splits ranges (present pages) into pages to store and pages an earlier process of the dump
// already stored: same physical page (PFN), which a fork leaves shared until either side
// writes it. Records this process's shared-looking pages for the processes after it.
std::vector<Range> dedup_ranges(pid_t pid, int pagemap_fd, const std::vector<Range>& ranges,
                                PageDedup& dedup) {
  std::vector<Range> out;
  auto push = [&](uint64_t addr, pid_t ref_pid, uint64_t ref_addr) {
    if (!out.empty()) {
      Range& b = out.back();
      uint64_t end = b.start + b.pages * kPageSize;
      if (end == addr && b.ref_pid == ref_pid &&
          (ref_pid == 0 || b.ref_addr + b.pages * kPageSize == ref_addr)) {
        b.pages++;
        return;
      }
    }
    out.push_back({addr, 1, ref_pid, ref_addr});
  };
  std::vector<uint64_t> entries;
  for (const auto& r : ranges) {
    entries.resize(r.pages);
    ssize_t want = static_cast<ssize_t>(r.pages * 8);
    if (::pread(pagemap_fd, entries.data(), want, static_cast<off_t>(r.start / kPageSize * 8)) !=
        want)
      fail_errno("reading pagemap of pid ", pid, " at ", std::hex, r.start);
    for (uint64_t i = 0; i < r.pages; i++) {
      uint64_t addr = r.start + i * kPageSize;
      uint64_t e = entries[i];
      uint64_t pfn = e & abi::kPmPfnMask;
      if (!(e & abi::kPmPresent) || pfn == 0) {
        push(addr, 0, 0);
        continue;
      }
      auto it = dedup.pfns.find(pfn);
      if (it != dedup.pfns.end() && it->second.pid != pid) {
        push(addr, it->second.pid, it->second.addr);
        continue;
      }
      // A page mapped only here cannot be shared with a later process.
      if (it == dedup.pfns.end() && !(e & abi::kPmExclusive))
        dedup.pfns.emplace(pfn, PageDedup::Owner{pid, addr});
      push(addr, 0, 0);
    }
  }
  // The owner's page may have moved (migration, compaction) since it was recorded, and its
  // frame been reused: a REF stands only if the owner still maps that very frame now.
  std::vector<Range> checked;
  for (const auto& r : out) {
    if (r.ref_pid == 0) {
      checked.push_back(r);
      continue;
    }
    std::vector<uint64_t> mine(r.pages), theirs(r.pages);
    int owner_fd = dedup.pagemap_of(r.ref_pid);
    ssize_t want = static_cast<ssize_t>(r.pages * 8);
    if (::pread(pagemap_fd, mine.data(), want, static_cast<off_t>(r.start / kPageSize * 8)) !=
            want ||
        ::pread(owner_fd, theirs.data(), want, static_cast<off_t>(r.ref_addr / kPageSize * 8)) !=
            want)
      fail_errno("re-reading pagemaps of pids ", pid, " and ", r.ref_pid);
    for (uint64_t i = 0; i < r.pages; i++) {
      bool same = (mine[i] & abi::kPmPresent) && (theirs[i] & abi::kPmPresent) &&
                  (mine[i] & abi::kPmPfnMask) == (theirs[i] & abi::kPmPfnMask);
      Range one{r.start + i * kPageSize, 1, same ? r.ref_pid : 0,
                same ? r.ref_addr + i * kPageSize : 0};
      if (!checked.empty()) {
        Range& b = checked.back();
        if (b.start + b.pages * kPageSize == one.start && b.ref_pid == one.ref_pid &&
            (one.ref_pid == 0 || b.ref_addr + b.pages * kPageSize == one.ref_addr)) {
          b.pages++;
          continue;
        }
      }
      checked.push_back(one);
    }
  }
  return checked;
}

}  // namespace

int PageDedup::pagemap_of(pid_t pid) {
  auto& fd = pagemaps_[pid];
  if (!fd) {
    auto twin = twins_.find(pid);
    fd = open_pagemap(twin != twins_.end() ? twin->second : pid);
  }
  return fd.get();
}

void PageDedup::read_through(pid_t pid, pid_t twin) {
  if (pagemaps_.count(pid)) fail("pid ", pid, ": its pagemap was read before its twin's");
  twins_[pid] = twin;
}

namespace {

// Write tracking: the pages of `ranges` not written since the parent image, and held by it,
// become unchanged ranges (never read); the rest stays in `ranges`.
std::vector<Range> split_unwritten(const std::vector<std::pair<uint64_t, uint64_t>>& written,
                                   const image::PageStoreWriter& writer,
                                   std::vector<Range>& ranges) {
  std::vector<Range> read, unchanged;
  auto push = [](std::vector<Range>& v, uint64_t addr, bool u) {
    if (!v.empty() && v.back().start + v.back().pages * kPageSize == addr)
      v.back().pages++;
    else
      v.push_back({addr, 1, 0, 0, u});
  };
  size_t w = 0;
  for (const auto& r : ranges)
    for (uint64_t i = 0; i < r.pages; i++) {
      uint64_t addr = r.start + i * kPageSize;
      while (w < written.size() && written[w].second <= addr) w++;
      bool is_written = w < written.size() && written[w].first <= addr;
      if (!is_written && writer.parent_holds(addr))
        push(unchanged, addr, true);
      else
        push(read, addr, false);
    }
  ranges = std::move(read);
  return unchanged;
}

std::vector<Range> merge_by_address(std::vector<Range> a, const std::vector<Range>& b) {
  a.insert(a.end(), b.begin(), b.end());
  std::sort(a.begin(), a.end(), [](const Range& x, const Range& y) { return x.start < y.start; });
  return a;
}

bool has_vmflag(const MemoryArea& a, const char* flag) {
  const std::string& f = a.vmflags();
  for (size_t pos = 0; pos + 2 <= f.size(); pos += 3)
    if (f.compare(pos, 2, flag) == 0) return true;
  return false;
}

bool private_kind(const MemoryArea& a) {
  return a.kind() == MemoryArea::ANON || a.kind() == MemoryArea::HEAP ||
         a.kind() == MemoryArea::STACK || a.kind() == MemoryArea::PRIVATE_FILE;
}

// pread of another process's memory through /proc/PID/mem (any protection).
void read_process_mem(int mem_fd, pid_t pid, uint64_t addr, char* out, size_t len) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(mem_fd, out + got, len - got, static_cast<off_t>(addr + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail_errno("cannot read memory of pid ", pid, " at ", std::hex, addr + got);
    got += static_cast<size_t>(n);
  }
}

// A memfd holding the shared object's data extents over the area, at the same offsets.
UniqueFd copy_shared_object(pid_t pid, const MemoryArea& a, uint64_t& copied) {
  std::string path = map_files_path(pid, a.start(), a.end());
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno("cannot open ", path, " (", a.name(), ")");
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno("fstat ", path);
  UniqueFd copy(static_cast<int>(::memfd_create("lazycr-shared-copy", MFD_CLOEXEC)));
  if (!copy) fail_errno("memfd_create for the copy of ", a.name());
  if (::ftruncate(copy.get(), st.st_size) != 0) fail_errno("sizing the copy of ", a.name());
  const uint64_t end =
      std::min<uint64_t>(a.pgoff() + (a.end() - a.start()), static_cast<uint64_t>(st.st_size));
  std::vector<char> buf(kReadBufferBytes);
  for (uint64_t off = a.pgoff(); off < end;) {
    off_t data = ::lseek(fd.get(), static_cast<off_t>(off), SEEK_DATA);
    if (data < 0 && errno == ENXIO) break;
    if (data < 0) fail_errno("SEEK_DATA in ", path);
    off_t hole = ::lseek(fd.get(), data, SEEK_HOLE);
    if (hole < 0) fail_errno("SEEK_HOLE in ", path);
    uint64_t stop = std::min<uint64_t>(end, static_cast<uint64_t>(hole));
    for (uint64_t pos = static_cast<uint64_t>(data); pos < stop;) {
      size_t len = std::min<uint64_t>(buf.size(), stop - pos);
      ssize_t n = ::pread(fd.get(), buf.data(), len, static_cast<off_t>(pos));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) fail_errno("reading ", path);
      if (::pwrite(copy.get(), buf.data(), static_cast<size_t>(n), static_cast<off_t>(pos)) != n)
        fail_errno("writing the copy of ", a.name());
      pos += static_cast<size_t>(n);
      copied += static_cast<uint64_t>(n);
    }
    off = std::max<uint64_t>(stop, off + 1);
  }
  return copy;
}

}  // namespace

namespace {

// A fork child has no copy of a MADV_DONTFORK area and zeros for a MADV_WIPEONFORK one.
bool twin_lacks(const MemoryArea& a) {
  return private_kind(a) && (has_vmflag(a, "dc") || has_vmflag(a, "wf"));
}

// The pages of one private area to store, read from `pagemap` (the process's or its twin's:
// the same addresses), with REFs per `dedup` and unchanged runs per `written`.
// Private file pages still backed by the file come back from the file; a deleted file cannot
// be reopened by path, so all its present pages are kept (unless the image stores that file as
// a ghost, which the restore maps again).
bool keeps_file_pages(const MemoryArea& a) {
  return a.kind() == MemoryArea::PRIVATE_FILE && a.file().deleted() && a.ghost_id() == 0;
}

void choose_pages(pid_t pid, int pagemap, const MemoryArea& a, MemoryPlan::Area& out,
                  PageDedup* dedup, const WrittenRanges* written,
                  const image::PageStoreWriter* writer) {
  const bool exclude_file = a.kind() == MemoryArea::PRIVATE_FILE && !keeps_file_pages(a);
  if (kernel_features().pagemap_scan)
    scan_pagemap_scan(pagemap, a.start(), a.end(), exclude_file, out.runs);
  else
    scan_pagemap_file(pagemap, a.start(), a.end(), exclude_file, out.runs);
  // Unwritten pages are set aside before dedup, so that no later process refers (REF)
  // to a page this store records as PARENT.
  std::vector<Range> unchanged;
  if (written != nullptr && writer != nullptr && a.kind() != MemoryArea::PRIVATE_FILE)
    if (auto w = (*written)(a.start(), a.end())) unchanged = split_unwritten(*w, *writer, out.runs);
  if (dedup != nullptr && a.kind() != MemoryArea::PRIVATE_FILE)
    out.runs = dedup_ranges(pid, pagemap, out.runs, *dedup);
  if (!unchanged.empty()) out.runs = merge_by_address(std::move(out.runs), unchanged);
}

}  // namespace

MemoryPlan plan_memory(pid_t pid, const std::vector<MemoryArea>& areas, PageDedup* dedup,
                       const WrittenRanges* written, const image::PageStoreWriter* writer) {
  UniqueFd own_pagemap;
  const int pagemap =
      dedup != nullptr ? dedup->pagemap_of(pid) : (own_pagemap = open_pagemap(pid)).get();
  MemoryPlan plan;
  plan.areas.resize(areas.size());
  for (size_t k = 0; k < areas.size(); k++)
    if (private_kind(areas[k]))
      choose_pages(pid, pagemap, areas[k], plan.areas[k], dedup, written, writer);
  return plan;
}

MemoryPlan plan_frozen_copies(pid_t pid, const std::vector<MemoryArea>& areas) {
  MemoryPlan plan;
  plan.areas.resize(areas.size());
  UniqueFd pagemap, mem;
  for (size_t k = 0; k < areas.size(); k++) {
    const MemoryArea& a = areas[k];
    MemoryPlan::Area& out = plan.areas[k];
    if (twin_lacks(a)) {
      // Chosen and read now, never deduplicated: no other process of the tree can share
      // them through a fork (the child did not get them), and a REF would need the owner's
      // pagemap of the freeze instant, which only its twin keeps.
      if (!pagemap) pagemap = open_pagemap(pid);
      choose_pages(pid, pagemap.get(), a, out, nullptr, nullptr, nullptr);
      if (!mem) {
        std::string path = cat("/proc/", pid, "/mem");
        mem.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        if (!mem) fail_errno("cannot open ", path);
      }
      out.has_copy = true;
      out.planned = true;
      for (const auto& r : out.runs) {
        size_t at = out.copied.size();
        out.copied.resize(at + r.pages * kPageSize);
        read_process_mem(mem.get(), pid, r.start, out.copied.data() + at, r.pages * kPageSize);
      }
      plan.copied_bytes += out.copied.size();
    } else if (keeps_file_pages(a)) {
      // Its page-cache pages too: fork copies no page table of an area without anonymous
      // pages, so the twin's pagemap would not show them. Chosen now, read from the twin
      // later (reading faults them in again).
      if (!pagemap) pagemap = open_pagemap(pid);
      choose_pages(pid, pagemap.get(), a, out, nullptr, nullptr, nullptr);
      out.planned = true;
    } else if (a.kind() == MemoryArea::SHARED_ANON) {
      // Shared with the process and its twin alike: it would change under the background read.
      out.object_copy = copy_shared_object(pid, a, plan.copied_bytes);
    }
  }
  return plan;
}

namespace {

// Whether [start, end) maps a page a fork copies (present or swapped, not the shared zero
// page, not backed by a file): stops at the first.
bool has_own_page(int pagemap_fd, uint64_t start, uint64_t end) {
  if (kernel_features().pagemap_scan) {
    abi::page_region region;
    abi::pm_scan_arg arg{};
    arg.size = sizeof arg;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<uint64_t>(&region);
    arg.vec_len = 1;
    arg.max_pages = 1;
    arg.category_inverted = PAGE_IS_PFNZERO | PAGE_IS_FILE;
    arg.category_mask = PAGE_IS_PFNZERO | PAGE_IS_FILE;
    arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    long n = ::ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0) fail_errno("PAGEMAP_SCAN ", std::hex, start, "-", end);
    return n > 0;
  }
  std::vector<Range> runs;
  scan_pagemap_file(pagemap_fd, start, end, true, runs);
  return !runs.empty();
}

void set_vmflag(MemoryArea& a, const char* flag, bool on) {
  if (has_vmflag(a, flag) == on) return;
  std::string f = a.vmflags();
  if (on) {
    f += f.empty() ? flag : cat(" ", flag);
  } else {
    for (size_t pos = 0; pos + 2 <= f.size(); pos += 3)
      if (f.compare(pos, 2, flag) == 0) {
        f.erase(pos, std::min<size_t>(3, f.size() - pos));
        break;
      }
    while (!f.empty() && f.back() == ' ') f.pop_back();
  }
  a.set_vmflags(f);
}

}  // namespace

size_t mark_what_twin_lacks(pid_t pid, pid_t twin, std::vector<MemoryArea>& areas) {
  std::set<std::pair<uint64_t, uint64_t>> in_twin;
  for (const auto& m : proc::parse_maps(proc::read_file(cat("/proc/", twin, "/maps"))))
    in_twin.insert({m.start, m.end});
  UniqueFd own, twins;
  size_t changed = 0;
  for (auto& a : areas) {
    if (!private_kind(a)) continue;
    // Fork copies every area but MADV_DONTFORK ones, as they are (no merge, no split).
    const bool absent = in_twin.count({a.start(), a.end()}) == 0;
    if (absent != has_vmflag(a, "dc")) {
      set_vmflag(a, "dc", absent);
      changed++;
    }
    if (absent || has_vmflag(a, "wf")) continue;
    // MADV_WIPEONFORK applies to private anonymous areas only. Any other such area holding a
    // page has an anon_vma, and fork copies its every present and swapped page table entry.
    if (a.kind() == MemoryArea::PRIVATE_FILE || a.file().inode() != 0) continue;
    if (!twins) twins = open_pagemap(twin);
    if (has_own_page(twins.get(), a.start(), a.end())) continue;
    if (!own) own = open_pagemap(pid);
    if (!has_own_page(own.get(), a.start(), a.end())) continue;
    set_vmflag(a, "wf", true);
    changed++;
  }
  return changed;
}

void plan_from_twin(pid_t pid, pid_t twin, const std::vector<MemoryArea>& areas, MemoryPlan& plan,
                    PageDedup* dedup) {
  UniqueFd own_pagemap;
  int pagemap;
  if (dedup != nullptr) {
    dedup->read_through(pid, twin);
    pagemap = dedup->pagemap_of(pid);
  } else {
    own_pagemap = open_pagemap(twin);
    pagemap = own_pagemap.get();
  }
  for (size_t k = 0; k < areas.size(); k++)
    if (private_kind(areas[k]) && !plan.areas[k].planned)
      choose_pages(pid, pagemap, areas[k], plan.areas[k], dedup, nullptr, nullptr);
}

MemoryStats write_memory(pid_t pid, pid_t read_pid, MemoryPlan& plan,
                         std::vector<MemoryArea>& areas, image::PageStoreWriter& writer,
                         const std::function<void(uint64_t pages)>& progress, PageDedup* dedup,
                         bool via_mem) {
  PageReader reader(read_pid, writer, progress, via_mem);
  for (size_t k = 0; k < areas.size(); k++) {
    MemoryArea& a = areas[k];
    MemoryPlan::Area& p = plan.areas[k];
    uint64_t stored = 0;
    if (private_kind(a)) {
      for (const auto& r : p.runs) stored += r.pages;
      if (p.has_copy)
        reader.feed_copied(p.runs, p.copied);
      else
        reader.read_ranges(p.runs, (a.prot() & PROT_READ) != 0);
    } else if (a.kind() == MemoryArea::SHARED_ANON) {
      // One object, mapped by several processes (or twice): identified by its inode. Read
      // through `pid`'s mapping (map_files), or from the copy made at the freeze.
      PageReader object_reader(pid, writer, progress, via_mem);
      object_reader.read_shared_object(a, stored,
                                       dedup != nullptr && a.file().inode() != 0
                                           ? &dedup->objects[{a.file().dev(), a.file().inode()}]
                                           : nullptr,
                                       &p.object_copy);
      MemoryStats s = object_reader.stats();
      reader.add_stats(s);
    }
    // Other kinds: contents come from the file (SHARED_FILE) or the kernel (vdso, vvar).
    a.set_stored_pages(stored);
  }
  return reader.stats();
}

std::string sample_planned_pages(pid_t read_pid, const MemoryPlan& plan,
                                 const std::vector<MemoryArea>& areas, size_t chunks) {
  constexpr uint64_t kChunkPages = 16;
  struct Piece {
    uint64_t start, pages;
  };
  std::vector<Piece> pieces;
  uint64_t total = 0;
  for (size_t k = 0; k < areas.size() && k < plan.areas.size(); k++) {
    if (!private_kind(areas[k]) || plan.areas[k].has_copy) continue;
    for (const auto& r : plan.areas[k].runs)
      if (r.ref_pid == 0 && !r.unchanged) {
        pieces.push_back({r.start, r.pages});
        total += r.pages;
      }
  }
  std::string out;
  if (total == 0 || chunks == 0) return out;
  UniqueFd mem(::open(cat("/proc/", read_pid, "/mem").c_str(), O_RDONLY | O_CLOEXEC));
  if (!mem) fail_errno("cannot open /proc/", read_pid, "/mem");
  // The n-th chunk starts at page n * total / chunks of the pages to store, and stays within
  // its run (shorter at a run's end).
  size_t piece = 0;
  uint64_t before = 0;  // pages of the pieces before `piece`
  for (size_t n = 0; n < chunks; n++) {
    const uint64_t at = n * total / chunks;
    while (before + pieces[piece].pages <= at) before += pieces[piece++].pages;
    const uint64_t offset = at - before;
    const uint64_t pages = std::min(kChunkPages, pieces[piece].pages - offset);
    const size_t old = out.size();
    out.resize(old + pages * kPageSize);
    read_process_mem(mem.get(), read_pid, pieces[piece].start + offset * kPageSize,
                     out.data() + old, pages * kPageSize);
  }
  return out;
}

}  // namespace lazycr::checkpoint
