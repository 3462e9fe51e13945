// Write tracking between dumps: see write_tracking.h.
#include "checkpoint/write_tracking.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/error.h"
#include "common/kernel_features.h"
#include "common/linux_abi.h"
#include "common/log.h"
#include "common/proc.h"
#include "common/signals.h"

namespace lazycr::checkpoint {
namespace {

constexpr uint64_t kTrackFeatures = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
constexpr int kHolderWaitMs = 5000;

std::string hexa(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string range_text(uint64_t start, uint64_t end) {
  return cat(hexa(start), "-", hexa(end));
}

// Whether fd `fd` is a userfaultfd (each has an inode of its own under anon_inode).
bool is_userfaultfd_link(const std::string& target) {
  return target == "anon_inode:[userfaultfd]";
}

// A userfaultfd the process holds itself: its registrations and ours would collide.
bool has_own_userfaultfd(pid_t pid) {
  const std::string dir = cat("/proc/", pid, "/fd");
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return false;
  bool found = false;
  char target[64];
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string link = dir + "/" + e->d_name;
    ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    if (is_userfaultfd_link(target)) found = true;
  }
  ::closedir(d);
  return found;
}

int pidfd_open(pid_t pid) {
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
}

// The areas the tracking covers: private anonymous memory, not already registered with a
// userfaultfd (unless `ours`: the uffd taken over from the parent's holder registered it;
// another uffd's registration makes UFFDIO_REGISTER fail with EBUSY). Not private mappings of
// files, though WP_ASYNC alone would register them (vma_can_userfault): the protection leaves
// a uffd-wp marker in every empty entry, which PAGEMAP_SCAN reports as a swapped page, so each
// page of a library never touched would be read and stored by the next dump (a tracked chain
// of a 256 MiB process stored 2.0% per link instead of 1%, most of it libraries' text); telling
// those apart needs the page store to say which pages the parent lacks. Shared memory and
// file-backed private pages are read and compared by content.
bool trackable(const image::MemoryArea& a, bool ours) {
  if (a.shared()) return false;
  if (a.kind() != image::MemoryArea::ANON && a.kind() != image::MemoryArea::HEAP &&
      a.kind() != image::MemoryArea::STACK)
    return false;
  if (ours) return true;
  const std::string& f = a.vmflags();
  return f.find("um") == std::string::npos && f.find("uw") == std::string::npos &&
         f.find("ui") == std::string::npos;
}

// Write-protects the pages of [start, end) written since the last protection (all of them the
// first time), in one pass; false when the area is not registered with WP_ASYNC any more.
bool protect_written(int pagemap, uint64_t start, uint64_t end) {
  abi::pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
  arg.start = start;
  arg.end = end;
  arg.category_anyof_mask = PAGE_IS_WRITTEN;
  arg.return_mask = PAGE_IS_WRITTEN;
  return ::ioctl(pagemap, PAGEMAP_SCAN, &arg) >= 0;
}

// The holder: keeps `fds` (a uffd and a pidfd per process, moved to 3, 4, 5, 6, ...) until
// every process has exited. Runs in a forked child of a possibly threaded process: raw system
// calls only, no allocation.
[[noreturn]] void run_holder(const int* fds, size_t nfds, int report_fd, pollfd* polls) {
  ::setsid();
  sigset_t all;
  sigfillset(&all);
  ::sigprocmask(SIG_UNBLOCK, &all, nullptr);
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGQUIT}) ::signal(s, SIG_DFL);
  const int base = 3 + static_cast<int>(nfds);
  int high[256];
  for (size_t i = 0; i < nfds; i++) {
    high[i] = ::fcntl(fds[i], F_DUPFD, base > report_fd ? base : report_fd + 1);
    if (high[i] < 0) ::_exit(1);
  }
  int null_fd = ::open("/dev/null", O_RDWR);
  if (null_fd < 0) ::_exit(1);
  pid_t grandchild = ::fork();
  if (grandchild < 0) ::_exit(1);
  if (grandchild > 0) {
    ssize_t n = ::write(report_fd, &grandchild, sizeof grandchild);
    ::_exit(n == sizeof grandchild ? 0 : 1);
  }
  for (int i = 0; i < 3; i++) ::dup2(null_fd, i);
  for (size_t i = 0; i < nfds; i++)
    if (::dup2(high[i], 3 + static_cast<int>(i)) < 0) ::_exit(1);
  ::syscall(SYS_close_range, base, ~0U, 0);
  ::prctl(PR_SET_NAME, "lazycr-track", 0, 0, 0);
  if (::chdir("/") != 0) {
    // stays where lazycr was: harmless
  }
  size_t live = nfds / 2;
  for (size_t i = 0; i < live; i++) polls[i] = {4 + 2 * static_cast<int>(i), POLLIN, 0};
  while (live > 0) {
    int n = ::poll(polls, nfds / 2, -1);
    if (n < 0) continue;
    for (size_t i = 0; i < nfds / 2; i++) {
      if (polls[i].fd < 0 || polls[i].revents == 0) continue;
      ::close(polls[i].fd - 1);  // the process exited: its uffd is of no use any more
      ::close(polls[i].fd);
      polls[i].fd = -1;
      live--;
    }
  }
  ::_exit(0);
}

// A uffd made inside the process (it is the process's mm that gets registered), taken, and
// closed there again before the process runs; empty (logged) when that fails.
UniqueFd make_tracking_uffd(FrozenProcess& fp) {
  const pid_t pid = fp.pid();
  long fd = fp.call(fp.leader(), "userfaultfd", SYS_userfaultfd,
                    O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  UniqueFd uffd(static_cast<int>(::syscall(SYS_pidfd_getfd, fp.pidfd(), fd, 0)));
  const int err = errno;
  fp.call(fp.leader(), "close", SYS_close, static_cast<uint64_t>(fd));
  if (!uffd) {
    log::info("write tracking: ", describe_pid(pid),
              " is not tracked: pidfd_getfd: ", std::strerror(err));
    return {};
  }
  uffdio_api api{};
  api.api = UFFD_API;
  // Only WP_ASYNC: no EVENT_FORK, EVENT_REMAP, EVENT_REMOVE or EVENT_UNMAP, whose events would
  // block the program's fork, mremap, madvise and munmap until read, and nobody reads them.
  api.features = kTrackFeatures;
  if (::ioctl(uffd.get(), UFFDIO_API, &api) != 0) {
    log::info("write tracking: ", describe_pid(pid),
              " is not tracked: UFFDIO_API: ", std::strerror(errno));
    return {};
  }
  return uffd;
}

}  // namespace

std::string write_tracking_unsupported() {
  const KernelFeatures& f = kernel_features();
  if (!f.pagemap_scan) return "the kernel has no PAGEMAP_SCAN ioctl (Linux 6.7)";
  if (!f.pidfd_getfd) return "the kernel has no pidfd_getfd";
  if (!(f.uffd_features & UFFD_FEATURE_WP_ASYNC))
    return "the kernel's userfaultfd lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7)";
  if (!(f.uffd_features & UFFD_FEATURE_WP_UNPOPULATED))
    return "the kernel's userfaultfd lacks UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)";
  return "";
}

WriteTracking::~WriteTracking() {
  // A dump that failed: its holder must not outlive it (the previous holder, untouched, still
  // vouches for the parent image).
  if (!committed_ && new_holder_) send_signal_pidfd(new_holder_.get(), SIGKILL);
}

void WriteTracking::take_over(const image::Inventory& parent, FrozenTree& tree) {
  if (!parent.has_write_tracking()) {
    log::info(
        "write tracking: none recorded in the parent image (dumped without --track): "
        "comparing pages by content");
    return;
  }
  const image::WriteTracking& rec = parent.write_tracking();
  UniqueFd holder(pidfd_open(rec.holder_pid()));
  std::optional<proc::Stat> hs = proc::try_read_stat(rec.holder_pid());
  if (!holder || !hs || hs->start_time != rec.holder_start_ticks() || hs->state == 'Z') {
    log::info("write tracking lost: its holder process ", rec.holder_pid(),
              " is gone (ended, or its processes exited): comparing pages by content");
    return;
  }
  for (const auto& tp : rec.processes()) {
    const pid_t pid = tp.pid();
    if (std::find(tree.preorder().begin(), tree.preorder().end(), pid) == tree.preorder().end() ||
        tree.node(pid).zombie())
      continue;
    std::optional<proc::Stat> st = proc::try_read_stat(pid);
    if (!st || st->start_time != tp.start_ticks()) {
      log::info("write tracking lost for pid ", pid, ": not the process the parent image tracked");
      continue;
    }
    if (has_own_userfaultfd(pid)) {
      log::info("write tracking not used for ", describe_pid(pid),
                ": it holds a userfaultfd of its own");
      continue;
    }
    UniqueFd uffd(static_cast<int>(::syscall(SYS_pidfd_getfd, holder.get(), tp.holder_fd(), 0)));
    struct stat sb;
    if (!uffd || ::fstat(uffd.get(), &sb) != 0 || sb.st_ino != tp.uffd_ino()) {
      log::info("write tracking lost for pid ", pid, ": the holder no longer has its uffd");
      continue;
    }
    Tracked t;
    t.uffd = std::move(uffd);
    t.start_ticks = tp.start_ticks();
    for (const auto& a : tp.areas()) t.areas.emplace_back(a.start(), a.end());
    taken_.emplace(pid, std::move(t));
  }
  for (pid_t pid : tree.preorder())
    if (!tree.node(pid).zombie() && taken_.find(pid) == taken_.end())
      log::info("write tracking: ", describe_pid(pid),
                " is not tracked (new since the parent image, e.g. a fork child, or lost): "
                "comparing its pages by content");
  old_holder_ = std::move(holder);
}

std::optional<std::vector<std::pair<uint64_t, uint64_t>>> WriteTracking::written(pid_t pid,
                                                                                 uint64_t start,
                                                                                 uint64_t end) {
  auto it = taken_.find(pid);
  if (it == taken_.end()) return std::nullopt;
  Tracked& t = it->second;
  bool covered = false;
  for (const auto& [s, e] : t.areas)
    if (s <= start && end <= e) covered = true;
  if (!covered) {
    log::info("write tracking: pid ", pid, " area ", range_text(start, end),
              " is new since the parent image: its pages compared by content");
    return std::nullopt;
  }
  if (!t.pagemap) {
    std::string path = cat("/proc/", pid, "/pagemap");
    t.pagemap.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!t.pagemap) fail_errno("cannot open ", path);
  }
  std::vector<std::pair<uint64_t, uint64_t>> out;
  std::vector<abi::page_region> regions(1024);
  for (uint64_t pos = start; pos < end;) {
    abi::pm_scan_arg arg{};
    arg.size = sizeof arg;
    // Only the scan: the protection moves on once the image is committed.
    arg.flags = PM_SCAN_CHECK_WPASYNC;
    arg.start = pos;
    arg.end = end;
    arg.vec = reinterpret_cast<uint64_t>(regions.data());
    arg.vec_len = regions.size();
    arg.category_anyof_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    long n = ::ioctl(t.pagemap.get(), PAGEMAP_SCAN, &arg);
    if (n < 0) {
      // EPERM: not registered with WP_ASYNC any more (unmapped and mapped again, mremap, exec).
      log::info("write tracking: pid ", pid, " area ", range_text(start, end),
                " is no longer the tracked mapping (", std::strerror(errno),
                "): its pages compared by content");
      return std::nullopt;
    }
    for (long i = 0; i < n; i++) {
      if (!out.empty() && out.back().second == regions[i].start)
        out.back().second = regions[i].end;
      else
        out.emplace_back(regions[i].start, regions[i].end);
    }
    if (arg.walk_end <= pos) break;
    pos = arg.walk_end;
  }
  return out;
}

void WriteTracking::arm(FrozenProcess& fp, const std::vector<image::MemoryArea>& areas) {
  const pid_t pid = fp.pid();
  if (has_own_userfaultfd(pid)) {
    log::info("write tracking: ", describe_pid(pid),
              " is not tracked: it holds a userfaultfd of its own");
    return;
  }
  Tracked t;
  t.start_ticks = proc::read_stat(pid).start_time;
  bool taken = false;
  if (auto it = taken_.find(pid); it != taken_.end()) {
    t.uffd.reset(::fcntl(it->second.uffd.get(), F_DUPFD_CLOEXEC, 3));
    if (!t.uffd) fail_errno("dup of the uffd of pid ", pid);
    taken = true;
  } else {
    t.uffd = make_tracking_uffd(fp);
    if (!t.uffd) return;
  }
  uint64_t pages = 0;
  auto register_areas = [&](bool ours) {
    for (const auto& a : areas) {
      if (!trackable(a, ours)) continue;
      uffdio_register reg{};
      reg.range.start = a.start();
      reg.range.len = a.end() - a.start();
      reg.mode = UFFDIO_REGISTER_MODE_WP;
      if (::ioctl(t.uffd.get(), UFFDIO_REGISTER, &reg) != 0) {
        log::debug("write tracking: pid ", pid, " area ", range_text(a.start(), a.end()),
                   " not registered: ", std::strerror(errno));
        continue;
      }
      t.areas.emplace_back(a.start(), a.end());
      pages += (a.end() - a.start()) / 4096;
    }
  };
  register_areas(taken);
  if (taken && t.areas.empty()) {
    // The uffd taken over registers the address space the process had when it was armed: after
    // an exec that one is gone and nothing can be registered with it. A new uffd for the new one.
    log::info("write tracking: ", describe_pid(pid),
              ": its tracked address space is gone (exec since the parent image): a new uffd");
    t.uffd = make_tracking_uffd(fp);
    if (!t.uffd) return;
    register_areas(false);
  }
  log::info("write tracking: ", describe_pid(pid), ": ", t.areas.size(), " areas (", pages,
            " pages) registered");
  if (!t.areas.empty()) armed_[pid] = std::move(t);
}

std::optional<image::WriteTracking> WriteTracking::start_holder() {
  if (armed_.empty()) return std::nullopt;
  // The image is good without tracking: a holder that cannot start costs the next dump its
  // speed, not this dump.
  try {
    return start_holder_or_throw();
  } catch (const Error& e) {
    log::warn("write tracking not armed: ", e.what());
    if (new_holder_) send_signal_pidfd(new_holder_.get(), SIGKILL);
    new_holder_.reset();
    armed_.clear();
    return std::nullopt;
  }
}

std::optional<image::WriteTracking> WriteTracking::start_holder_or_throw() {
  std::vector<int> fds;
  std::vector<UniqueFd> pidfds;
  for (auto& [pid, t] : armed_) {
    UniqueFd p(pidfd_open(pid));
    if (!p) fail_errno("pidfd_open(", pid, ")");
    fds.push_back(t.uffd.get());
    fds.push_back(p.get());
    pidfds.push_back(std::move(p));
  }
  if (fds.size() > 256) fail("write tracking: more than 128 processes to track");
  std::vector<pollfd> polls(fds.size() / 2);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) fail_errno("pipe2");
  UniqueFd rd(pipe_fds[0]), wr(pipe_fds[1]);
  pid_t child = ::fork();
  if (child < 0) fail_errno("fork of the write tracking holder");
  if (child == 0) run_holder(fds.data(), fds.size(), wr.get(), polls.data());
  wr.reset();
  pid_t holder = 0;
  ssize_t n = ::read(rd.get(), &holder, sizeof holder);
  int status = 0;
  ::waitpid(child, &status, 0);
  if (n != sizeof holder || holder <= 0) fail("write tracking: the holder process did not start");
  new_holder_.reset(pidfd_open(holder));
  if (!new_holder_) fail_errno("pidfd_open of the write tracking holder ", holder);
  image::WriteTracking rec;
  rec.set_holder_pid(holder);
  rec.set_holder_start_ticks(proc::read_stat(holder).start_time);
  int holder_fd = 3;
  for (auto& [pid, t] : armed_) {
    auto* tp = rec.add_processes();
    tp->set_pid(pid);
    tp->set_start_ticks(t.start_ticks);
    tp->set_holder_fd(holder_fd);
    holder_fd += 2;
    struct stat sb;
    if (::fstat(t.uffd.get(), &sb) != 0) fail_errno("fstat of a uffd");
    tp->set_uffd_ino(sb.st_ino);
    for (const auto& [s, e] : t.areas) {
      auto* a = tp->add_areas();
      a->set_start(s);
      a->set_end(e);
    }
  }
  log::info("write tracking: holder process ", holder, " keeps ", armed_.size(), " uffds");
  return rec;
}

void WriteTracking::commit_and_protect() {
  committed_ = true;
  if (old_holder_) {
    // The parent image's tracking ends here: nothing may vouch for it once the protection
    // moves on to this image.
    send_signal_pidfd(old_holder_.get(), SIGKILL);
    pollfd p{old_holder_.get(), POLLIN, 0};
    if (::poll(&p, 1, kHolderWaitMs) != 1) {
      log::warn("write tracking: the previous holder did not exit; this image is not tracked");
      if (new_holder_) send_signal_pidfd(new_holder_.get(), SIGKILL);
      return;
    }
    old_holder_.reset();
  }
  for (auto& [pid, t] : armed_) {
    UniqueFd pagemap(::open(cat("/proc/", pid, "/pagemap").c_str(), O_RDONLY | O_CLOEXEC));
    if (!pagemap) {
      // Unprotected pages only read as written: the next dump reads more, never less.
      log::warn("write tracking: cannot open /proc/", pid, "/pagemap: ", std::strerror(errno));
      continue;
    }
    for (const auto& [s, e] : t.areas)
      if (!protect_written(pagemap.get(), s, e))
        log::warn("write tracking: pid ", pid, " area ", range_text(s, e),
                  " could not be write-protected: ", std::strerror(errno));
  }
}

}  // namespace lazycr::checkpoint
