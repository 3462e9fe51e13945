// The lazy memory strategy (`lazycr restore --lazy`): DESIGN.md section 5 step 8 and
// section 6. The process runs before its private anonymous memory is back; a page server
// process feeds each page on first touch through a userfaultfd and prefetches the rest.
//
// What is lazy: private anonymous areas (ANON, HEAP, STACK) with stored pages, except
// - locked areas (mlock at the protect step faults every page in, and a present page never
//   reaches the server: the process would keep zeros), and
// - wipe-on-fork areas (a child forked later must find zeros there, but the server would
//   serve it the parent's owed pages),
// - and any area userfaultfd refuses to register (filled eagerly on the spot: every lazy
//   candidate is mapped writable until the protect step for that reason).
// Everything else with stored pages (private file areas, shared memory) is written by the
// eager filler as in an eager restore.
//
// What gets filled before the process runs, and why: the restorer and the kernel must never
// touch a lazy page while nobody can serve it (the access would wait forever, and a tracee
// blocked in a fault stops the restore). Kernel-mode accesses to lazy pages fault into the
// uffd like user ones (we never use UFFD_USER_MODE_ONLY, which would turn them into EFAULT).
// Two measures, both taken:
// - The server starts right after registration ([server], before the final protections,
//   mm, process state, descriptors and threads), so any later touch is served, not fatal.
//   Only page copies from the restorer itself happen between registration and that fork.
// - "Hot" pages are filled at registration with UFFDIO_COPY from the restorer (never with
//   writes into the process, which before registration could populate a whole transparent
//   huge page of zeros, and after it would wait for a server): per thread, the pages holding
//   its rseq area (the kernel writes cpu_id there on every return to user space once the
//   thread-state step registers it, and the registers step writes rseq_cs back), the page
//   at rip, the pages around rsp (one below for the red zone and signal frames, one above)
//   and the page at fs_base (the TCB: stack protector, errno, TLS pointers); and the pages
//   of the command line and environment (arg_start..arg_end, env_start..env_end): the
//   kernel reads /proc/PID/cmdline and environ with a remote access that cannot wait for a
//   userfaultfd (no FAULT_FLAG_ALLOW_RETRY), so while they are owed, ps would see an empty
//   command line. They are not handed to the server.
// Other remote reads of owed pages by that same path (/proc/PID/mem, ptrace PEEKDATA, a
// debugger attaching) fail with EIO/EFAULT until the page is served; process_vm_readv waits
// for it. That is a limit of userfaultfd, not of lazycr.
// Before registering, lazy areas are checked with PAGEMAP_SCAN for pages already present (a
// page the restore touched to keep areas apart, a THP populated by it): present pages would
// never fault, so they are dropped (MADV_DONTNEED) first; normally none is found.
//
// The userfaultfd is created inside the process (injected userfaultfd(O_CLOEXEC|O_NONBLOCK),
// or /dev/userfaultfd + USERFAULTFD_IOC_NEW when the system call is refused), pulled out with
// pidfd_getfd and closed inside at once. UFFDIO_API (EVENT_FORK, EVENT_REMAP, EVENT_REMOVE,
// EVENT_UNMAP, THREAD_ID) and UFFDIO_REGISTER (MISSING; neighbouring lazy areas in one call)
// are done from here.
// One thing stays parked in the process while pages are owed: the keeper socket
// (uffd/keeper.h, restore/park.h), which holds a reference to its uffd and to those of the
// children it forks, so that they die only with it. The page server's guardian holds another
// (a dead server means a killed process); the parked one covers the server and the guardian
// dying at the same instant (a hang that can be killed, never zero pages). The server closes
// it inside the process once nothing is owed: then the process has exactly its image's
// descriptors again.
//
// The page server process and lazycr's handle on it: restore/lazy_server.cc.
#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "common/error.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "common/log.h"
#include "common/signals.h"
#include "restore/memory.h"
#include "restore/park.h"
#include "restore/tree_fill.h"
#include "uffd/uffd.h"

namespace lazycr::restore {
namespace {

using image::kPageSize;
using image::MemoryArea;
using image::PageRun;

constexpr uint64_t kPage = kPageSize;

std::string area_name(const MemoryArea& a) {
  return cat(hex(a.start()), "-", hex(a.end()), a.name().empty() ? "" : " ", a.name());
}

uint64_t stored_in(const image::PageStoreReader& store, uint64_t start, uint64_t end) {
  const auto& runs = store.index().runs();
  auto it = std::upper_bound(runs.begin(), runs.end(), start,
                             [](uint64_t a, const PageRun& r) { return a < r.start(); });
  if (it != runs.begin()) --it;
  uint64_t n = 0;
  for (; it != runs.end() && it->start() < end; ++it) {
    uint64_t s = std::max(it->start(), start);
    uint64_t e = std::min(it->start() + it->pages() * kPage, end);
    if (s < e) n += (e - s) / kPage;
  }
  return n;
}

void close_fd_in(RemoteProcess& t, long fd, const char* what) noexcept {
  try {
    t.inject(cat("close(", fd, ") of ", what), SYS_close, static_cast<uint64_t>(fd));
  } catch (const Error& e) {
    log::warn(e.what());
  }
}

// ---- the strategy -------------------------------------------------------------------------

class LazyStrategy final : public MemoryStrategy {
 public:
  LazyStrategy(const image::Process& proc, const image::PageStoreReader& store,
               const RestoreOptions& opts, const cpu_set_t& cpus, LazyServerGroup& group,
               const TreeSharing* sharing)
      : proc_(proc),
        store_(store),
        opts_(opts),
        cpus_(cpus),
        eager_(make_eager_filler(store, &cpus_, opts.preread.get())),
        group_(group),
        tree_fill_(sharing, proc.pid(), *eager_, cpus) {}

  const char* name() const override { return "lazy"; }

  uint32_t shaping_prot(const MemoryArea& area) const override {
    // Writable until the protect step: an area userfaultfd refuses is filled eagerly.
    if (lazy_candidate(area)) return area.prot() | PROT_READ | PROT_WRITE;
    return eager_->shaping_prot(area);
  }

  void prepare_area(RemoteProcess& target, const MemoryArea& area) override {
    if (lazy_candidate(area))
      add_candidate(target, area, false);
    else
      eager_->prepare_area(target, area);
  }

  void prepare_inherited_area(RemoteProcess& target, const MemoryArea& area,
                              int parent_pid) override {
    if (!lazy_candidate(area)) return eager_->prepare_inherited_area(target, area, parent_pid);
    add_candidate(target, area, true);
  }

  // Before this process's children are forked (restore.cc): the eager areas, and the pages
  // of lazy areas that its children share with it (restore/tree_sharing.h).
  void fill_mapped(RemoteProcess& target) override {
    eager_->fill_mapped(target);
    tree_fill_.fill(target);
  }

  void register_lazy(RemoteProcess& target) override {
    if (candidates_.empty()) return;
    drop_present_pages(target);
    make_uffd(target);
    keeper_ = park_keeper(target, proc_);
    register_areas(target);
    fill_hot_pages();
    // Areas userfaultfd refused: eagerly, while they are still writable.
    if (!refused_.empty()) {
      for (const MemoryArea* a : refused_) eager_->prepare_area(target, *a);
      eager_->fill_mapped(target);
    }
    compute_server_areas();
  }

  void start_server(RemoteProcess& target) override {
    if (!uffd_.valid()) return;
    ServedProcess sp;
    sp.pid = target.pid();
    sp.uffd = uffd_.fd();
    sp.pidfd = target.pidfd();
    sp.store = &store_;
    sp.areas = server_areas_;
    sp.keeper_send = keeper_.send_end.get();
    sp.keeper_recv = keeper_.recv_end.get();
    sp.parked_fd = keeper_.parked_fd;
    group_.add(std::move(sp));
  }

  void after_shaping(RemoteProcess& target) override { eager_->after_shaping(target); }

  void before_release(RemoteProcess& target) override {
    if (!uffd_.valid()) return;
    uffd_.reset();  // the server, its guardian and the parked keeper hold it now
    if (keeper_.recv_end && !still_parked(target.pid(), keeper_.parked_fd, keeper_.recv_end.get()))
      log::warn("pid ", target.pid(), ": descriptor ", keeper_.parked_fd,
                " is no longer the page server's keeper: only the guardian guards its memory");
    keeper_ = {};
    // Tests (LAZYCR_FAULT_INJECT=lazycr-stop-before-release): lazycr stops while it still
    // traces the process, and the server may meanwhile serve everything.
    const char* inject = ::getenv("LAZYCR_FAULT_INJECT");
    if (inject != nullptr && std::strcmp(inject, "lazycr-stop-before-release") == 0)
      send_signal(::getpid(), SIGSTOP);
  }

  void on_running(RemoteProcess& target) override { eager_->on_running(target); }

  MemoryStats stats() const override {
    MemoryStats s = eager_->stats();
    s.pages_written += tree_fill_.stats().pages_written;
    s.pages_written += hot_pages_;
    s.bytes_written += hot_pages_ * kPage;
    s.lazy_areas = lazy_areas_;
    s.lazy_pages = lazy_pages_;
    s.hot_pages = hot_pages_;
    return s;
  }

 private:
  // A lazy candidate (`kept`: inherited from the parent). The pages it holds from the parent
  // and those it writes for its children (restore/tree_fill.h) are not owed to the server.
  void add_candidate(RemoteProcess& target, const MemoryArea& area, bool kept) {
    candidates_.push_back(&area);
    present_ = unite(std::move(present_), tree_fill_.add(target, area, kept));
  }

  // The pages of `a` the server owes (before the hot pages are taken out).
  std::vector<PageRange> owed_in(const MemoryArea& a) const {
    return subtract({{a.start(), a.end()}}, present_);
  }

  // Pages of lazy areas that are present already would never fault (a page the restore
  // faulted in to keep neighbours apart, a transparent huge page it populated, the parent's
  // content inherited where this process's differs): dropped. Pages this process holds as
  // its parent's, or wrote for its children, stay.
  void drop_present_pages(RemoteProcess& target) {
    const auto& k = lazy_restore_features();
    std::vector<PageRange> present;
    if (k.pagemap_scan) {
      UniqueFd pm(::open(cat("/proc/", target.pid(), "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
      if (!pm) fail_errno("open /proc/", target.pid(), "/pagemap");
      std::vector<abi::page_region> regions(256);
      for (const MemoryArea* a : candidates_) {
        for (const PageRange& o : owed_in(*a)) {
          uint64_t pos = o.start;
          while (pos < o.end) {
            abi::pm_scan_arg arg{};
            arg.size = sizeof arg;
            arg.start = pos;
            arg.end = o.end;
            arg.vec = reinterpret_cast<uint64_t>(regions.data());
            arg.vec_len = regions.size();
            arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
            arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
            long n = ::ioctl(pm.get(), PAGEMAP_SCAN, &arg);
            if (n < 0) fail_errno("PAGEMAP_SCAN of area ", area_name(*a));
            for (long i = 0; i < n; i++) present.push_back({regions[i].start, regions[i].end});
            if (arg.walk_end <= pos) break;
            pos = arg.walk_end;
          }
        }
      }
    } else {
      for (const MemoryArea* a : candidates_)
        for (const PageRange& o : owed_in(*a)) present.push_back({o.start, o.end});
    }
    for (const PageRange& r : present)
      target.inject(cat("madvise(MADV_DONTNEED) of ", hex(r.start), "-", hex(r.end),
                        " before registering it with userfaultfd"),
                    SYS_madvise, r.start, r.end - r.start, MADV_DONTNEED);
    dropped_present_ = present.size();
  }

  // userfaultfd() inside the process, pulled out, closed inside, UFFDIO_API.
  void make_uffd(RemoteProcess& target) {
    long fd = -1;
    try {
      fd = target.inject("userfaultfd(O_CLOEXEC | O_NONBLOCK) in the process", SYS_userfaultfd,
                         O_CLOEXEC | O_NONBLOCK);
    } catch (const Error& e) {
      if (!lazy_restore_features().dev_userfaultfd) throw;
      const uint64_t path = target.put_data("/dev/userfaultfd", sizeof "/dev/userfaultfd");
      long dev = target.inject(cat("open /dev/userfaultfd (", e.what(), ")"), SYS_openat,
                               static_cast<uint64_t>(AT_FDCWD), path, O_RDWR | O_CLOEXEC);
      try {
        fd = target.inject("ioctl(USERFAULTFD_IOC_NEW)", SYS_ioctl, static_cast<uint64_t>(dev),
                           USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
      } catch (...) {
        close_fd_in(target, dev, "/dev/userfaultfd");
        throw;
      }
      close_fd_in(target, dev, "/dev/userfaultfd");
    }
    long ours = ::syscall(SYS_pidfd_getfd, target.pidfd(), fd, 0);
    const int err = errno;
    // The process keeps none: its descriptors are exactly its image's.
    target.inject(cat("close(", fd, ") of the userfaultfd in the process"), SYS_close,
                  static_cast<uint64_t>(fd));
    if (ours < 0)
      fail_errno_value(
          err, cat("pidfd_getfd of the userfaultfd (fd ", fd, " of pid ", target.pid(), ")"));
    uffd_ = uffd::Userfaultfd::adopt(static_cast<int>(ours));
    uint64_t want = kLazyRequiredFeatures;
    if (lazy_restore_features().uffd_features & UFFD_FEATURE_THREAD_ID)
      want |= UFFD_FEATURE_THREAD_ID;
    uffd_.api(want);
  }

  static bool can_serve(uint64_t ioctls) {
    const uint64_t need = (uint64_t{1} << _UFFDIO_COPY) | (uint64_t{1} << _UFFDIO_ZEROPAGE) |
                          (uint64_t{1} << _UFFDIO_WAKE);
    return (ioctls & need) == need;
  }

  // Registers one area; false (and the area is unregistered) if userfaultfd refuses it.
  bool register_one(const MemoryArea& a) {
    try {
      uint64_t ioctls = uffd_.register_range(a.start(), a.end() - a.start());
      if (can_serve(ioctls)) return true;
      uffd_.unregister(a.start(), a.end() - a.start());
      log::info("area ", area_name(a), ": userfaultfd cannot fill it (ioctls ", hex(ioctls),
                "): restored eagerly");
    } catch (const Error& e) {
      log::info("area ", area_name(a), ": ", e.what(), ": restored eagerly");
    }
    return false;
  }

  // Neighbouring candidates are registered with one call; if that is refused, one by one.
  void register_areas(RemoteProcess&) {
    size_t i = 0;
    while (i < candidates_.size()) {
      size_t j = i + 1;
      while (j < candidates_.size() && candidates_[j]->start() == candidates_[j - 1]->end()) j++;
      bool whole = false;
      if (j - i > 1) {
        const uint64_t s = candidates_[i]->start(), e = candidates_[j - 1]->end();
        try {
          whole = can_serve(uffd_.register_range(s, e - s));
          if (!whole) uffd_.unregister(s, e - s);
        } catch (const Error&) {
          whole = false;
        }
      }
      for (size_t k = i; k < j; k++) {
        if (whole || register_one(*candidates_[k]))
          lazy_.push_back(candidates_[k]);
        else
          refused_.push_back(candidates_[k]);
      }
      i = j;
    }
    lazy_areas_ = lazy_.size();
  }

  // The lazy area holding page `addr`, or nullptr.
  const MemoryArea* lazy_area_of(uint64_t addr) const {
    auto it = std::upper_bound(lazy_.begin(), lazy_.end(), addr,
                               [](uint64_t a, const MemoryArea* m) { return a < m->start(); });
    if (it == lazy_.begin()) return nullptr;
    --it;
    return addr < (*it)->end() ? *it : nullptr;
  }

  // See the top of this file: rseq areas, rip, rsp +- a page, fs_base, per thread.
  void fill_hot_pages() {
    std::set<uint64_t> pages;
    auto add = [&](uint64_t from, uint64_t to) {  // bytes [from, to)
      if (to <= from) return;
      for (uint64_t pg = from & ~(kPage - 1); pg < to; pg += kPage)
        if (lazy_area_of(pg) != nullptr && !contains(present_, pg)) pages.insert(pg);
    };
    for (const auto& th : proc_.threads()) {
      const auto& r = th.regs();
      if (th.rseq().rseq_abi_pointer() != 0)
        add(th.rseq().rseq_abi_pointer(),
            th.rseq().rseq_abi_pointer() + std::max<uint32_t>(th.rseq().rseq_abi_size(), 32));
      add(r.rip(), r.rip() + 16);
      if (r.rsp() >= kPage) add(r.rsp() - kPage, r.rsp() + kPage);
      if (r.fs_base() != 0) add(r.fs_base(), r.fs_base() + 64);
    }
    // /proc/PID/cmdline and environ are read by the kernel with a remote access that cannot
    // wait for a userfaultfd (no FAULT_FLAG_ALLOW_RETRY): owed, they would read empty (ps).
    const auto& mm = proc_.mm();
    constexpr uint64_t kMaxArgBytes = 256 * kPage;
    add(mm.arg_start(), std::min(mm.arg_end(), mm.arg_start() + kMaxArgBytes));
    add(mm.env_start(), std::min(mm.env_end(), mm.env_start() + kMaxArgBytes));
    std::vector<char> buf;
    for (auto it = pages.begin(); it != pages.end();) {
      // A run of contiguous hot pages inside one area and one store run kind.
      const uint64_t start = *it;
      const MemoryArea* area = lazy_area_of(start);
      auto loc = store_.find(start);
      const bool data = loc && loc->kind != PageRun::ZERO;  // DATA, or REF (read() follows it)
      uint64_t end = start + kPage;
      ++it;
      while (it != pages.end() && *it == end && lazy_area_of(end) == area) {
        auto l2 = store_.find(end);
        if ((l2 && l2->kind != PageRun::ZERO) != data) break;
        end += kPage;
        ++it;
      }
      const uint64_t len = end - start;
      long res;
      if (data) {
        buf.resize(len);
        store_.read(start, len / kPage, buf.data());
        res = uffd_.copy(start, buf.data(), len);
      } else {
        res = uffd_.zeropage(start, len);
      }
      if (res < 0 && res != -EEXIST)
        fail_errno_value(static_cast<int>(-res),
                         cat("filling the hot pages ", hex(start), "-", hex(end)));
      if (res != static_cast<long>(len) && res != -EEXIST)
        fail("filling the hot pages ", hex(start), "-", hex(end), ": only ", res, " bytes");
      hot_.push_back({start, end});
      hot_pages_ += len / kPage;
    }
  }

  // The lazy areas minus the hot pages: what the server owes.
  void compute_server_areas() {
    size_t h = 0;
    for (const MemoryArea* a : lazy_) {
      const bool huge = has_vmflag(a->vmflags(), "hg");
      for (const PageRange& o : owed_in(*a)) {
        uint64_t pos = o.start;
        while (h < hot_.size() && hot_[h].end <= pos) h++;
        for (size_t k = h; k < hot_.size() && hot_[k].start < o.end; k++) {
          if (hot_[k].start > pos) server_areas_.push_back({pos, hot_[k].start, huge});
          pos = std::max(pos, hot_[k].end);
        }
        if (pos < o.end) server_areas_.push_back({pos, o.end, huge});
      }
    }
    for (const auto& s : server_areas_) lazy_pages_ += stored_in(store_, s.start, s.end);
  }

  const image::Process& proc_;
  const image::PageStoreReader& store_;
  const RestoreOptions& opts_;
  cpu_set_t cpus_;
  std::unique_ptr<MemoryStrategy> eager_;
  std::vector<const MemoryArea*> candidates_;  // in address order
  std::vector<const MemoryArea*> lazy_;        // registered
  std::vector<const MemoryArea*> refused_;     // filled eagerly instead
  std::vector<PageRange> hot_;
  std::vector<uffd::LazyArea> server_areas_;
  uffd::Userfaultfd uffd_;
  ParkedKeeper keeper_;
  LazyServerGroup& group_;
  TreeFill tree_fill_;
  std::vector<PageRange> present_;  // pages of lazy candidates not owed: see add_candidate()
  uint64_t hot_pages_ = 0, lazy_pages_ = 0, lazy_areas_ = 0;
  size_t dropped_present_ = 0;
};

}  // namespace

std::unique_ptr<MemoryStrategy> make_lazy_strategy(const image::Process& proc,
                                                   const image::PageStoreReader& store,
                                                   const RestoreOptions& opts,
                                                   const cpu_set_t& cpus, LazyServerGroup& group,
                                                   const TreeSharing* sharing) {
  return std::make_unique<LazyStrategy>(proc, store, opts, cpus, group, sharing);
}
}  // namespace lazycr::restore
