// The userfaultfd wrapper against the real kernel: faults served by a server thread with copy
// and zeropage, the errnos the page server branches on, and the layout events (REMOVE, UNMAP,
// REMAP, FORK) DESIGN.md section 6 relies on.
//
// Events block the process that caused them until they are read, so each event is provoked on
// another thread (see events_during). Timeouts below only turn a bug into a failure instead of
// a hang; nothing waits for time to pass.
#include "uffd/uffd.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/kernel_features.h"
#include "common/signals.h"

namespace lazycr::uffd {
namespace {

constexpr size_t kPage = 4096;
constexpr int kGuardMs = 60'000;  // failure guard only

// An anonymous private mapping, unmapped on destruction. Declare it before the Userfaultfd
// that covers it: the uffd is then closed first and the munmap sends no event.
class Area {
 public:
  explicit Area(size_t pages) : len_(pages * kPage) {
    void* p = ::mmap(nullptr, len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    // One fault per page, as the tests count them (no multi-size THP).
    ::madvise(p, len_, MADV_NOHUGEPAGE);
    base_ = static_cast<char*>(p);
  }
  ~Area() {
    if (base_) ::munmap(base_, len_);
  }
  Area(const Area&) = delete;
  Area& operator=(const Area&) = delete;

  char* base() const { return base_; }
  uint64_t addr(size_t page = 0) const { return reinterpret_cast<uint64_t>(base_) + page * kPage; }
  size_t len() const { return len_; }
  // Forget the mapping (it was moved or unmapped by the test); unmap `replacement` instead.
  void replace(char* replacement) { base_ = replacement; }

 private:
  char* base_ = nullptr;
  size_t len_;
};

uint8_t pattern(size_t page, size_t offset) {
  return static_cast<uint8_t>((page * 131 + offset * 7 + 1) & 0xff);
}

std::vector<uint8_t> page_of(size_t page) {
  std::vector<uint8_t> out(kPage);
  for (size_t j = 0; j < kPage; ++j) out[j] = pattern(page, j);
  return out;
}

bool page_matches(const char* p, size_t page) {
  for (size_t j = 0; j < kPage; ++j) {
    if (static_cast<uint8_t>(p[j]) != pattern(page, j)) return false;
  }
  return true;
}

bool page_is_zero(const char* p) {
  for (size_t j = 0; j < kPage; ++j) {
    if (p[j] != 0) return false;
  }
  return true;
}

Userfaultfd make_uffd(uint64_t features) {
  Userfaultfd uffd = Userfaultfd::create();
  uffd.api(features);
  return uffd;
}

bool offered(uint64_t feature) {
  return (kernel_features().uffd_features & feature) == feature;
}

// Runs `action` on another thread and reads every uffd message it causes until it returns.
// The reading side must not allocate while the action may be inside fork(): glibc holds the
// malloc locks across the clone call, which waits for its FORK event to be read.
std::vector<uffd_msg> events_during(Userfaultfd& uffd, const std::function<void()>& action) {
  UniqueFd done(::eventfd(0, EFD_CLOEXEC));
  if (!done) throw std::runtime_error("eventfd failed");
  std::vector<uffd_msg> msgs;
  msgs.reserve(1024);
  std::thread t([&] {
    action();
    uint64_t one = 1;
    (void)!::write(done.get(), &one, sizeof(one));
  });
  for (;;) {
    pollfd p[2] = {{uffd.fd(), POLLIN, 0}, {done.get(), POLLIN, 0}};
    int r = ::poll(p, 2, kGuardMs);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ADD_FAILURE() << "no uffd event and the action did not finish";
      uffd.reset();  // wakes the blocked action
      break;
    }
    uffd.read_events(msgs);
    if (p[1].revents & POLLIN) break;
  }
  t.join();
  if (uffd.valid()) uffd.read_events(msgs);
  return msgs;
}

// A thread answering page faults on one uffd until told to stop through an eventfd: copy() of
// the pattern, or zeropage() for every 4th page. It records which threads faulted.
class Server {
 public:
  Server(Userfaultfd& uffd, const Area& area) : uffd_(uffd), area_(area) {
    stop_.reset(::eventfd(0, EFD_CLOEXEC));
    thread_ = std::thread([this] { run(); });
  }
  ~Server() { stop(); }
  void stop() {
    if (!thread_.joinable()) return;
    uint64_t one = 1;
    (void)!::write(stop_.get(), &one, sizeof(one));
    thread_.join();
  }
  const std::string& error() const { return error_; }
  const std::vector<uint32_t>& fault_tids() const { return tids_; }
  int served() const { return served_; }

 private:
  void run() {
    try {
      std::vector<uffd_msg> msgs;
      for (;;) {
        pollfd p[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
        if (::poll(p, 2, -1) < 0) {
          if (errno == EINTR) continue;
          fail_errno("poll");
        }
        if (p[1].revents & POLLIN) return;
        msgs.clear();
        uffd_.read_events(msgs);
        for (const auto& m : msgs) serve(m);
      }
    } catch (const std::exception& e) {
      error_ = e.what();
      uffd_.reset();  // faulting threads wake up (and see zeros) instead of hanging
    }
  }
  void serve(const uffd_msg& m) {
    if (m.event != UFFD_EVENT_PAGEFAULT) fail("unexpected event ", int(m.event));
    const uint64_t addr = m.arg.pagefault.address & ~uint64_t(kPage - 1);
    if (addr < area_.addr() || addr >= area_.addr() + area_.len()) fail("fault outside area");
    const size_t page = (addr - area_.addr()) / kPage;
    long r;
    if (page % 4 == 3) {
      r = uffd_.zeropage(addr, kPage);
    } else {
      auto data = page_of(page);
      r = uffd_.copy(addr, data.data(), kPage);
    }
    if (r == -EEXIST) {
      uffd_.wake(addr, kPage);  // a failed copy does not wake the faulting thread
    } else if (r != static_cast<long>(kPage)) {
      fail("fill of page ", page, " gave ", r);
    }
    tids_.push_back(m.arg.pagefault.feat.ptid);
    ++served_;
  }

  Userfaultfd& uffd_;
  const Area& area_;
  UniqueFd stop_;
  std::thread thread_;
  std::string error_;
  std::vector<uint32_t> tids_;
  int served_ = 0;
};

TEST(Userfaultfd, CreateAndApi) {
  Userfaultfd uffd = Userfaultfd::create();
  ASSERT_TRUE(uffd.valid());
  const uint64_t all = uffd.api(0);
  EXPECT_EQ(all, kernel_features().uffd_features);
  EXPECT_TRUE(uffd.ioctls() & (1ull << _UFFDIO_REGISTER));
  // UFFDIO_API may be done once per uffd.
  EXPECT_THROW(uffd.api(0), Error);
}

TEST(Userfaultfd, UnknownFeatureThrowsWithErrno) {
  Userfaultfd uffd = Userfaultfd::create();
  try {
    uffd.api(1ull << 62);
    FAIL() << "UFFDIO_API accepted an unknown feature";
  } catch (const Error& e) {
    EXPECT_EQ(e.sys_errno(), EINVAL);
    EXPECT_NE(std::string(e.what()).find("UFFDIO_API"), std::string::npos) << e.what();
  }
}

TEST(Userfaultfd, ServesEveryPageOfA64PageArea) {
  constexpr size_t kPages = 64;
  Area area(kPages);
  const bool thread_id = offered(UFFD_FEATURE_THREAD_ID);
  Userfaultfd uffd = make_uffd(thread_id ? UFFD_FEATURE_THREAD_ID : 0);
  const uint64_t ioctls = uffd.register_range(area.addr(), area.len());
  EXPECT_TRUE(ioctls & (1ull << _UFFDIO_COPY));
  EXPECT_TRUE(ioctls & (1ull << _UFFDIO_ZEROPAGE));
  EXPECT_TRUE(ioctls & (1ull << _UFFDIO_WAKE));

  Server server(uffd, area);
  for (size_t i = 0; i < kPages; ++i) {
    const char* p = area.base() + i * kPage;
    if (i % 4 == 3) {
      EXPECT_TRUE(page_is_zero(p)) << "page " << i;
    } else {
      EXPECT_TRUE(page_matches(p, i)) << "page " << i;
    }
  }
  server.stop();
  ASSERT_EQ(server.error(), "");
  EXPECT_EQ(server.served(), static_cast<int>(kPages));
  if (thread_id) {
    for (uint32_t tid : server.fault_tids()) EXPECT_EQ(tid, static_cast<uint32_t>(::gettid()));
  }

  // Filling a present page is an answer, not an exception.
  auto data = page_of(0);
  EXPECT_EQ(uffd.copy(area.addr(0), data.data(), kPage), -EEXIST);
  EXPECT_EQ(uffd.zeropage(area.addr(3), kPage), -EEXIST);
  EXPECT_TRUE(page_matches(area.base(), 0));

  uffd.unregister(area.addr(), area.len());
}

TEST(Userfaultfd, PartialCopyReportsBytesCopied) {
  Area area(4);
  Userfaultfd uffd = make_uffd(0);
  uffd.register_range(area.addr(), area.len());
  // Fill page 1 ahead of any fault, then copy pages 0-2: the kernel stops at page 1.
  auto one = page_of(1);
  EXPECT_EQ(uffd.copy(area.addr(1), one.data(), kPage), static_cast<long>(kPage));
  std::vector<uint8_t> three(3 * kPage);
  for (size_t p = 0; p < 3; ++p) {
    auto d = page_of(p);
    std::memcpy(three.data() + p * kPage, d.data(), kPage);
  }
  EXPECT_EQ(uffd.copy(area.addr(0), three.data(), 3 * kPage), static_cast<long>(kPage));
  EXPECT_TRUE(page_matches(area.base(), 0));
  EXPECT_TRUE(page_matches(area.base() + kPage, 1));
  // Page 2 is still missing: fill it now rather than touching it.
  EXPECT_EQ(uffd.zeropage(area.addr(2), kPage), static_cast<long>(kPage));
  EXPECT_TRUE(page_is_zero(area.base() + 2 * kPage));
}

TEST(Userfaultfd, CopyOutsideRegisteredAreaIsENOENT) {
  Area registered(1), plain(1);
  Userfaultfd uffd = make_uffd(0);
  uffd.register_range(registered.addr(), registered.len());
  auto data = page_of(0);
  EXPECT_EQ(uffd.copy(plain.addr(), data.data(), kPage), -ENOENT);
  EXPECT_EQ(uffd.zeropage(registered.addr(), kPage), static_cast<long>(kPage));
}

TEST(Userfaultfd, MisalignedCopyThrows) {
  Area area(2);
  Userfaultfd uffd = make_uffd(0);
  uffd.register_range(area.addr(), area.len());
  auto data = page_of(0);
  try {
    uffd.copy(area.addr() + 1, data.data(), kPage);
    FAIL() << "misaligned UFFDIO_COPY did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.sys_errno(), EINVAL);
    EXPECT_NE(std::string(e.what()).find("UFFDIO_COPY"), std::string::npos) << e.what();
  }
  EXPECT_EQ(uffd.zeropage(area.addr(), area.len()), static_cast<long>(area.len()));
}

TEST(Userfaultfd, NoEventsPendingReadsNothing) {
  Area area(1);
  Userfaultfd uffd = make_uffd(0);
  uffd.register_range(area.addr(), area.len());
  std::vector<uffd_msg> msgs;
  EXPECT_EQ(uffd.read_events(msgs), 0u);
  EXPECT_TRUE(msgs.empty());
}

TEST(Userfaultfd, RemoveEventAfterMadviseDontneed) {
  if (!offered(UFFD_FEATURE_EVENT_REMOVE)) GTEST_SKIP() << "no EVENT_REMOVE";
  Area area(8);
  Userfaultfd uffd = make_uffd(UFFD_FEATURE_EVENT_REMOVE);
  uffd.register_range(area.addr(), area.len());
  for (size_t p = 0; p < 8; ++p) {
    auto d = page_of(p);
    ASSERT_EQ(uffd.copy(area.addr(p), d.data(), kPage), static_cast<long>(kPage));
  }
  int rc = -1;
  auto msgs = events_during(
      uffd, [&] { rc = ::madvise(area.base() + 2 * kPage, 3 * kPage, MADV_DONTNEED); });
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(msgs.size(), 1u);
  EXPECT_EQ(msgs[0].event, UFFD_EVENT_REMOVE);
  EXPECT_EQ(msgs[0].arg.remove.start, area.addr(2));
  EXPECT_EQ(msgs[0].arg.remove.end, area.addr(5));
  // Outside the removed range the content stays.
  EXPECT_TRUE(page_matches(area.base() + kPage, 1));
  EXPECT_TRUE(page_matches(area.base() + 5 * kPage, 5));
}

TEST(Userfaultfd, UnmapEventAfterMunmap) {
  if (!offered(UFFD_FEATURE_EVENT_UNMAP)) GTEST_SKIP() << "no EVENT_UNMAP";
  Area area(8);
  Userfaultfd uffd = make_uffd(UFFD_FEATURE_EVENT_UNMAP);
  uffd.register_range(area.addr(), area.len());
  int rc = -1;
  auto msgs = events_during(uffd, [&] { rc = ::munmap(area.base() + 4 * kPage, 4 * kPage); });
  EXPECT_EQ(rc, 0);
  ASSERT_EQ(msgs.size(), 1u);
  EXPECT_EQ(msgs[0].event, UFFD_EVENT_UNMAP);
  EXPECT_EQ(msgs[0].arg.remove.start, area.addr(4));
  EXPECT_EQ(msgs[0].arg.remove.end, area.addr(8));
  uffd.reset();  // no event for the rest when Area unmaps it
}

// DESIGN.md section 6: mremap of a registered area reports REMAP (from, to, len), then an
// UNMAP of the old range when EVENT_UNMAP is on.
TEST(Userfaultfd, RemapEventAfterMremap) {
  if (!offered(UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP)) GTEST_SKIP();
  Area area(8);
  Area target(8);  // reserves the destination
  Userfaultfd uffd = make_uffd(UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP);
  uffd.register_range(area.addr(), area.len());
  auto d = page_of(0);
  ASSERT_EQ(uffd.copy(area.addr(0), d.data(), kPage), static_cast<long>(kPage));
  const uint64_t from = area.addr(), to = target.addr();
  void* moved = MAP_FAILED;
  auto msgs = events_during(uffd, [&] {
    moved =
        ::mremap(area.base(), area.len(), area.len(), MREMAP_MAYMOVE | MREMAP_FIXED, target.base());
  });
  ASSERT_EQ(moved, static_cast<void*>(target.base()));
  area.replace(nullptr);  // the old range is gone; target now holds the moved area
  ASSERT_EQ(msgs.size(), 2u);
  EXPECT_EQ(msgs[0].event, UFFD_EVENT_REMAP);
  EXPECT_EQ(msgs[0].arg.remap.from, from);
  EXPECT_EQ(msgs[0].arg.remap.to, to);
  EXPECT_EQ(msgs[0].arg.remap.len, area.len());
  // Then the old range is reported unmapped: apply the REMAP first.
  EXPECT_EQ(msgs[1].event, UFFD_EVENT_UNMAP);
  EXPECT_EQ(msgs[1].arg.remove.start, from);
  EXPECT_EQ(msgs[1].arg.remove.end, from + area.len());
  EXPECT_TRUE(page_matches(target.base(), 0));
  uffd.reset();
}

// A forked child gets its own uffd, announced to the reader by a FORK event; its missing pages
// are served through that uffd; once the child is gone copies answer ESRCH.
TEST(Userfaultfd, ForkEventGivesTheChildsUffd) {
  if (!offered(UFFD_FEATURE_EVENT_FORK) || !kernel_features().cap_sys_ptrace) {
    GTEST_SKIP() << "EVENT_FORK needs CAP_SYS_PTRACE";
  }
  Area area(4);
  Userfaultfd uffd = make_uffd(UFFD_FEATURE_EVENT_FORK);
  uffd.register_range(area.addr(), area.len());
  auto d0 = page_of(0);
  ASSERT_EQ(uffd.copy(area.addr(0), d0.data(), kPage), static_cast<long>(kPage));

  pid_t child = -1;
  auto msgs = events_during(uffd, [&] {
    child = ::fork();
    if (child == 0) {
      // Page 0 was present at fork; page 1 faults into the child's own uffd.
      bool ok = page_matches(area.base(), 0) && page_matches(area.base() + kPage, 1);
      ::_exit(ok ? 0 : 1);
    }
  });
  ASSERT_GT(child, 0);
  ASSERT_EQ(msgs.size(), 1u);
  ASSERT_EQ(msgs[0].event, UFFD_EVENT_FORK);
  Userfaultfd child_uffd = Userfaultfd::adopt(static_cast<int>(msgs[0].arg.fork.ufd));

  pollfd p{child_uffd.fd(), POLLIN, 0};
  int r = ::poll(&p, 1, kGuardMs);
  if (r != 1) {
    send_signal(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    FAIL() << "the child did not fault";
  }
  std::vector<uffd_msg> faults;
  ASSERT_EQ(child_uffd.read_events(faults), 1u);
  ASSERT_EQ(faults[0].event, UFFD_EVENT_PAGEFAULT);
  EXPECT_EQ(faults[0].arg.pagefault.address & ~uint64_t(kPage - 1), area.addr(1));
  auto d1 = page_of(1);
  EXPECT_EQ(child_uffd.copy(area.addr(1), d1.data(), kPage), static_cast<long>(kPage));

  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
  // The child's mm is gone.
  long gone = child_uffd.copy(area.addr(2), d1.data(), kPage);
  EXPECT_TRUE(gone == -ESRCH || gone == -ENOSPC) << gone;
  // The parent's page 1 was never filled: it is still ours to serve.
  EXPECT_EQ(uffd.copy(area.addr(1), d1.data(), kPage), static_cast<long>(kPage));
}

TEST(Userfaultfd, AdoptRejectsInvalidFd) {
  EXPECT_THROW(Userfaultfd::adopt(-1), Error);
}

}  // namespace
}  // namespace lazycr::uffd
