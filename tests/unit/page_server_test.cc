// The lazy page server against the real kernel (no mocks): a forked child plays the restored
// process. It maps an area at the page store's addresses (MAP_FIXED_NOREPLACE), creates a
// userfaultfd with the raw system call (never UFFD_USER_MODE_ONLY), tells the test its fd
// number and waits. The test pulls the uffd out with pidfd_getfd, does UFFDIO_API (EVENT_FORK,
// EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP, THREAD_ID) and UFFDIO_REGISTER (MISSING) on it, hands
// it to a PageServer and says "go". The child then closes its own copy of the uffd, as a
// restored process has none (the restorer closes it after pulling it out): the server, and
// its guardian when there is one, hold the only references. Then the child runs its scenario
// and writes its verdict to a pipe.
//
// Page content is a function of the page's address in the store (a mix of the address),
// with all-zero pages (ZERO runs) and a gap the store does not hold. Each scenario's
// expectations follow the kernel's semantics: a moved page keeps its content, a dropped page
// reads zero, a new mapping reads zero.
//
// Synchronization is by pipes; the only timeout is a watchdog that turns a hang into a
// failure. Children use raw system calls and stack buffers where glibc could take locks.
#include "uffd/page_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/kernel_features.h"
#include "common/signals.h"
#include "image-format/page_store.h"
#include "uffd/uffd.h"

namespace lazycr::uffd {
namespace {

constexpr uint64_t P = 4096;
constexpr uint64_t kBase = 0x5a5a00000000ull;  // the store's (and the child's area) address
constexpr uint64_t kPages = 512;               // area pages (2 MiB)
constexpr uint64_t kLen = kPages * P;
constexpr uint64_t kMoved = kBase + (1ull << 30);   // mremap destination in scenario (b)
constexpr uint64_t kGapFirst = 200, kGapEnd = 208;  // pages the store does not hold
constexpr int kGuardSeconds = 60;                   // failure guard only

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The dense store (g_dense_path, for the children forked while g_dense is set) holds every
// page of the area as DATA: one owed range, long prefetch chunks.
bool g_dense = false;

bool zero_page(uint64_t page) {
  return !g_dense && ((page >= kGapFirst && page < kGapEnd) || page % 7 == 3);
}

// Does the page at `p` hold what the store has (or the kernel gives) for source page `src`?
bool holds(const void* p, uint64_t src_page) {
  const volatile uint64_t* w = static_cast<const volatile uint64_t*>(p);
  const uint64_t src = kBase + src_page * P;
  const bool zero = zero_page(src_page);
  for (uint64_t k = 0; k < P / 8; ++k)
    if (w[k] != (zero ? 0 : mix(src + 8 * k))) return false;
  return true;
}

bool is_zero(const void* p) {
  const volatile uint64_t* w = static_cast<const volatile uint64_t*>(p);
  for (uint64_t k = 0; k < P / 8; ++k)
    if (w[k] != 0) return false;
  return true;
}

char* at(uint64_t page) {
  return reinterpret_cast<char*>(kBase + page * P);
}

// ---- child side: raw calls and stack buffers ---------------------------------------------

void say(int fd, const char* s) {
  (void)!::write(fd, s, std::strlen(s));
}

// "FAIL <what> page N\n" without allocating.
void say_fail(int fd, const char* what, uint64_t page) {
  char buf[128];
  int n = std::snprintf(buf, sizeof(buf), "FAIL %s page %llu\n", what,
                        static_cast<unsigned long long>(page));
  (void)!::write(fd, buf, static_cast<size_t>(n));
}

// Checks pages [first, end) hold their own content; reports the first that does not.
bool check_range(int out, uint64_t first, uint64_t end, const char* what) {
  for (uint64_t i = first; i < end; ++i) {
    if (!holds(at(i), i)) {
      say_fail(out, what, i);
      return false;
    }
  }
  return true;
}

char wait_cmd(int in) {
  char c = 0;
  while (::read(in, &c, 1) < 0 && errno == EINTR) {
  }
  return c;
}

struct ChildIo {
  int cmd;     // commands from the test
  int report;  // verdict to the test
};

using Scenario = std::function<void(const ChildIo&)>;
using Prepare = std::function<void()>;

// ---- test side -------------------------------------------------------------------------------

std::string g_store_dir;
std::string g_store_path;
std::string g_dense_path;

std::shared_ptr<const image::PageStoreReader> open_store(const std::string& path) {
  return std::shared_ptr<const image::PageStoreReader>(image::PageStoreReader::open(path));
}

void write_store(const std::string& path, bool dense = false) {
  image::PageStoreOptions o;
  o.frame_size = image::kMinFrameSize;  // 4 pages a frame: many frames
  o.threads = 1;
  image::PageStoreWriter w(path, o);
  std::vector<uint64_t> page(P / 8);
  g_dense = dense;
  for (uint64_t i = 0; i < kPages; ++i) {
    if (!dense && i >= kGapFirst && i < kGapEnd) continue;
    const uint64_t a = kBase + i * P;
    for (uint64_t k = 0; k < P / 8; ++k) page[k] = zero_page(i) ? 0 : mix(a + 8 * k);
    w.add_pages(a, page.data(), 1);
  }
  g_dense = false;
  w.finish();
}

class PageServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/page_server_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_store_dir = tmpl;
    g_store_path = g_store_dir + "/pages-1.lzp";
    write_store(g_store_path);
    g_dense_path = g_store_dir + "/pages-dense.lzp";
    write_store(g_dense_path, true);
  }
  static void TearDownTestSuite() { std::filesystem::remove_all(g_store_dir); }

  void SetUp() override {
    const auto& k = kernel_features();
    const uint64_t need = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP |
                          UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |
                          UFFD_FEATURE_THREAD_ID;
    if ((k.uffd_features & need) != need || !k.cap_sys_ptrace || !k.pidfd_getfd)
      GTEST_SKIP() << "needs uffd events, CAP_SYS_PTRACE and pidfd_getfd";
    ::signal(SIGPIPE, SIG_IGN);
  }
};

// A forked "restored process" waiting for "go".
struct Child {
  pid_t pid = -1;
  UniqueFd pidfd;
  UniqueFd cmd;     // write end
  UniqueFd report;  // read end
  int uffd_number = -1;

  Child() = default;
  Child(Child&& o) noexcept
      : pid(std::exchange(o.pid, -1)),
        pidfd(std::move(o.pidfd)),
        cmd(std::move(o.cmd)),
        report(std::move(o.report)),
        uffd_number(o.uffd_number) {}
  Child& operator=(Child&&) = delete;
  ~Child() {
    if (pid > 0) {
      send_signal(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  void send(char c) { (void)!::write(cmd.get(), &c, 1); }
  // Everything the child (and its children) wrote, until they all closed the pipe.
  std::string read_report() {
    std::string out;
    char buf[512];
    for (;;) {
      ssize_t n = ::read(report.get(), buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      out.append(buf, static_cast<size_t>(n));
    }
    return out;
  }
  // Reads up to and including the first '\n'.
  std::string read_line() {
    std::string out;
    char c;
    while (::read(report.get(), &c, 1) == 1) {
      out += c;
      if (c == '\n') break;
    }
    return out;
  }
  int wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return status;
  }
};

Child spawn(const Scenario& scenario, const Prepare& prepare = nullptr) {
  int c[2], r[2];
  if (::pipe2(c, O_CLOEXEC) != 0 || ::pipe2(r, O_CLOEXEC) != 0) throw Error("pipe failed");
  pid_t pid = ::fork();
  if (pid < 0) throw Error("fork failed");
  if (pid == 0) {
    ::close(c[1]);
    ::close(r[0]);
    const ChildIo io{c[0], r[1]};
    void* p = ::mmap(reinterpret_cast<void*>(kBase), kLen, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != reinterpret_cast<void*>(kBase)) {
      say(io.report, "-1\nFAIL mmap at the store's address\n");
      ::_exit(1);
    }
    ::madvise(p, kLen, MADV_NOHUGEPAGE);
    if (prepare) prepare();
    const int ufd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    char line[32];
    int n = std::snprintf(line, sizeof(line), "%d\n", ufd);
    (void)!::write(io.report, line, static_cast<size_t>(n));
    if (ufd < 0) ::_exit(1);
    if (wait_cmd(io.cmd) != 'g') ::_exit(1);
    ::close(ufd);  // the server's copy (and the guardian's) are the only ones now
    scenario(io);
    ::_exit(0);
  }
  ::close(c[0]);
  ::close(r[1]);
  Child ch;
  ch.pid = pid;
  ch.cmd.reset(c[1]);
  ch.report.reset(r[0]);
  ch.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  std::string first = ch.read_line();
  ch.uffd_number = std::atoi(first.c_str());
  if (ch.uffd_number < 0 || !ch.pidfd) throw Error("child did not set up: " + first);
  return ch;
}

// Pulls the child's uffd and makes it ready for the server (API, REGISTER of the area).
UniqueFd pull_uffd(const Child& ch) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, ch.pidfd.get(), ch.uffd_number, 0));
  if (fd < 0) fail_errno("pidfd_getfd");
  Userfaultfd u = Userfaultfd::adopt(fd);
  u.api(UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
        UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID);
  u.register_range(kBase, kLen, UFFDIO_REGISTER_MODE_MISSING);
  UniqueFd out(::fcntl(u.fd(), F_DUPFD_CLOEXEC, 0));
  if (!out) fail_errno("dup");
  return out;  // u closes its own copy
}

UniqueFd dup_fd(int fd) {
  return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
}

// Stops the server after kGuardSeconds: a hang becomes a failure.
class Watchdog {
 public:
  explicit Watchdog(PageServer& server) {
    thread_ = std::thread([this, &server] {
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_for(lock, std::chrono::seconds(kGuardSeconds), [this] { return done_; })) {
        fired_ = true;
        server.stop();
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  bool fired() const { return fired_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::atomic<bool> fired_{false};
  std::thread thread_;
};

struct Outcome {
  std::string report;
  int status = 0;
  PageServerStats stats;
  std::string summary;
};

// Runs one scenario: spawn, hand over, "go", serve until done, collect the verdict.
// `after_run` runs once run() returned, before the report is read (e.g. to say "verify").
Outcome serve(const Scenario& scenario, PageServerOptions opt, const Prepare& prepare = nullptr,
              const std::function<void(Child&)>& after_run = nullptr,
              const std::string& store_path = g_store_path) {
  Child ch = spawn(scenario, prepare);
  PageServer server(opt);
  server.add_process(ch.pid, pull_uffd(ch), dup_fd(ch.pidfd.get()), open_store(store_path),
                     {{kBase, kBase + kLen}});
  ch.send('g');
  Outcome out;
  {
    Watchdog dog(server);
    server.run();
    EXPECT_FALSE(dog.fired()) << "the server did not finish in " << kGuardSeconds << " s";
  }
  if (after_run) after_run(ch);
  out.report = ch.read_report();
  out.status = ch.wait();
  out.stats = server.stats();
  out.summary = server.summary();
  return out;
}

PageServerOptions no_prefetch(uint64_t window = 64 * 1024) {
  PageServerOptions o;
  o.prefetch = false;
  o.window = window;
  return o;
}

bool exited_ok(int status) {
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// (a) Every page touched once: content, zero runs and the gap.
void touch_all(const ChildIo& io) {
  if (check_range(io.report, 0, kPages, "touch")) say(io.report, "ok\n");
}

TEST_F(PageServerTest, TouchEveryPageWindow64K) {
  Outcome o = serve(touch_all, no_prefetch());
  EXPECT_EQ(o.report, "ok\n");
  EXPECT_TRUE(exited_ok(o.status)) << o.status;
  EXPECT_GT(o.stats.faults, 0u);
  // A window is the aligned 16-page block of the fault, inside one store run: here DATA runs
  // of 6 pages between single ZERO pages, so about two faults per 7 pages, one more per
  // block edge inside a run, plus one per page of the gap.
  EXPECT_LE(o.stats.faults, 2 * kPages / 7 + kPages / 16 + 2 + (kGapEnd - kGapFirst));
  EXPECT_EQ(o.stats.prefetch_pages, 0u);
  EXPECT_EQ(o.stats.fault_pages + o.stats.zero_pages, kPages);
  EXPECT_EQ(o.stats.not_owed_faults, kGapEnd - kGapFirst);
  EXPECT_TRUE(o.stats.errors.empty());
  EXPECT_GE(o.stats.first_fault_ns, 0);
  EXPECT_GE(o.stats.all_served_ns, o.stats.first_fault_ns);
  EXPECT_EQ(o.stats.fault_latency_ns.size(), o.stats.faults);
  EXPECT_GT(o.stats.bytes_decompressed, 0u);
}

TEST_F(PageServerTest, TouchEveryPageWindow4K) {
  Outcome o = serve(touch_all, no_prefetch(4096));
  EXPECT_EQ(o.report, "ok\n");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_EQ(o.stats.faults, kPages);  // one fault per page
  EXPECT_EQ(o.stats.not_owed_faults, kGapEnd - kGapFirst);
}

// (b) mremap of a never-touched part: its content follows it to the new address; the UNMAP
// of the old range that follows does not drop it. A touched part moves too.
void remap(const ChildIo& io) {
  void* hole = ::mmap(reinterpret_cast<void*>(kMoved), 64 * P, PROT_NONE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (hole != reinterpret_cast<void*>(kMoved)) return say(io.report, "FAIL reserve\n");
  if (!check_range(io.report, 80, 84, "before move")) return;
  // Pages 50..69 never touched; 80..89 partly (80..83).
  void* m1 = ::mremap(at(50), 20 * P, 20 * P, MREMAP_MAYMOVE | MREMAP_FIXED,
                      reinterpret_cast<void*>(kMoved));
  void* m2 = ::mremap(at(80), 10 * P, 10 * P, MREMAP_MAYMOVE | MREMAP_FIXED,
                      reinterpret_cast<void*>(kMoved + 32 * P));
  if (m1 != reinterpret_cast<void*>(kMoved) || m2 != reinterpret_cast<void*>(kMoved + 32 * P))
    return say(io.report, "FAIL mremap\n");
  for (uint64_t i = 0; i < 20; ++i)
    if (!holds(reinterpret_cast<char*>(kMoved + i * P), 50 + i))
      return say_fail(io.report, "moved", 50 + i);
  for (uint64_t i = 0; i < 10; ++i)
    if (!holds(reinterpret_cast<char*>(kMoved + (32 + i) * P), 80 + i))
      return say_fail(io.report, "moved touched", 80 + i);
  if (!check_range(io.report, 40, 50, "left") || !check_range(io.report, 70, 80, "left")) return;
  say(io.report, "ok\n");
}

TEST_F(PageServerTest, MremapOfOwedPagesKeepsTheirContent) {
  Outcome o = serve(remap, no_prefetch());
  EXPECT_EQ(o.report, "ok\n");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_EQ(o.stats.events_remap, 2u);
  EXPECT_GE(o.stats.events_unmap, 2u);
}

// (c) MADV_DONTNEED of an owed range: zero there, content around it.
void dontneed(const ChildIo& io) {
  if (::madvise(at(100), 20 * P, MADV_DONTNEED) != 0) return say(io.report, "FAIL madvise\n");
  for (uint64_t i = 100; i < 120; ++i)
    if (!is_zero(at(i))) return say_fail(io.report, "dropped page not zero", i);
  if (!check_range(io.report, 90, 100, "kept") || !check_range(io.report, 120, 130, "kept")) return;
  // Dropping served pages gives zero too, and the neighbours stay.
  if (::madvise(at(92), 2 * P, MADV_DONTNEED) != 0) return say(io.report, "FAIL madvise 2\n");
  if (!is_zero(at(92)) || !is_zero(at(93))) return say(io.report, "FAIL served page kept\n");
  if (!check_range(io.report, 94, 100, "kept 2")) return;
  say(io.report, "ok\n");
}

TEST_F(PageServerTest, DontneedOfOwedPagesReadsZero) {
  Outcome o = serve(dontneed, no_prefetch());
  EXPECT_EQ(o.report, "ok\n");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_EQ(o.stats.events_remove, 2u);
}

// (d) munmap of owed ranges, then new memory there: a new anonymous mapping in the middle,
// and the area grown back in place by mremap (the grown part is registered with the same
// uffd, so a server that kept the unmapped pages owed would fill them with old content).
void unmap_and_map(const ChildIo& io) {
  if (::munmap(at(150), 10 * P) != 0) return say(io.report, "FAIL munmap\n");
  void* p = ::mmap(at(150), 10 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                   -1, 0);
  if (p != at(150)) return say(io.report, "FAIL mmap\n");
  for (uint64_t i = 150; i < 160; ++i)
    if (!is_zero(at(i))) return say_fail(io.report, "new mapping not zero", i);
  if (::munmap(at(480), 32 * P) != 0) return say(io.report, "FAIL munmap tail\n");
  void* grown = ::mremap(at(160), (480 - 160) * P, (512 - 160) * P, 0);
  if (grown != at(160)) return say(io.report, "FAIL mremap grow in place\n");
  for (uint64_t i = 480; i < 512; ++i)
    if (!is_zero(at(i))) return say_fail(io.report, "regrown page not zero", i);
  if (!check_range(io.report, 140, 150, "kept") || !check_range(io.report, 160, 170, "kept") ||
      !check_range(io.report, 470, 480, "kept"))
    return;
  say(io.report, "ok\n");
}

TEST_F(PageServerTest, MunmapThenNewMemoryIsNotFilledWithOldContent) {
  Outcome o = serve(unmap_and_map, no_prefetch());
  EXPECT_EQ(o.report, "ok\n");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_GE(o.stats.events_unmap, 2u);
}

// (e) fork: the grandchild owes what the child owed at the fork; both verify what they touch
// (pages touched before the fork are simply there in the grandchild).
void forks(const ChildIo& io) {
  if (!check_range(io.report, 300, 310, "before fork")) return;
  pid_t g = static_cast<pid_t>(::syscall(SYS_fork));
  if (g < 0) return say(io.report, "FAIL fork\n");
  if (g == 0) {
    if (check_range(io.report, 0, 64, "grandchild") &&
        check_range(io.report, 300, 310, "grandchild inherited") &&
        check_range(io.report, 400, 420, "grandchild"))
      say(io.report, "grandchild ok\n");
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(g, &status, 0);
  if (check_range(io.report, 32, 128, "parent after fork") &&
      check_range(io.report, 410, 430, "parent after fork"))
    say(io.report, "parent ok\n");
}

TEST_F(PageServerTest, ForkedChildOwesWhatItsParentOwed) {
  Outcome o = serve(forks, no_prefetch());
  EXPECT_EQ(o.report, "grandchild ok\nparent ok\n");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_EQ(o.stats.events_fork, 1u);
  EXPECT_EQ(o.stats.processes, 2u);
  EXPECT_EQ(o.stats.children_found, 1u) << "the grandchild's pid was not found";
  EXPECT_EQ(o.stats.exits, 2u);
}

// (f) Several threads fault the same pages at once (threads made before the uffd exists).
struct Racers {
  static constexpr int kThreads = 4;
  int start[2];
  std::atomic<int> bad{0};
  std::atomic<uint64_t> bad_page{0};
  pthread_t threads[kThreads];
};
Racers g_racers;

void* racer(void* arg) {
  const int k = static_cast<int>(reinterpret_cast<intptr_t>(arg));
  char c;
  (void)!::read(g_racers.start[0], &c, 1);
  for (uint64_t n = 0; n < kPages; ++n) {
    const uint64_t i = k % 2 ? kPages - 1 - n : n;  // two forward, two backward
    if (!holds(at(i), i)) {
      g_racers.bad_page = i;
      g_racers.bad++;
    }
  }
  return nullptr;
}

void start_racers() {
  if (::pipe(g_racers.start) != 0) ::_exit(1);
  for (int k = 0; k < Racers::kThreads; ++k)
    pthread_create(&g_racers.threads[k], nullptr, racer,
                   reinterpret_cast<void*>(static_cast<intptr_t>(k)));
}

void race(const ChildIo& io) {
  char go[Racers::kThreads] = {};
  (void)!::write(g_racers.start[1], go, sizeof(go));
  for (pthread_t t : g_racers.threads) pthread_join(t, nullptr);
  if (g_racers.bad == 0) return say(io.report, "ok\n");
  say_fail(io.report, "racer", g_racers.bad_page);
}

TEST_F(PageServerTest, ThreadsFaultingTheSamePagesAtOnce) {
  for (uint64_t window : {uint64_t{4096}, uint64_t{64 * 1024}}) {
    Outcome o = serve(race, no_prefetch(window), start_racers);
    EXPECT_EQ(o.report, "ok\n") << "window " << window;
    EXPECT_TRUE(exited_ok(o.status));
    EXPECT_TRUE(o.stats.errors.empty());
  }
}

// (g) Prefetch on: the child touches nothing until the server says nothing is owed (run()
// returned), then verifies every page.
TEST_F(PageServerTest, PrefetchServesEverythingWithoutFaults) {
  for (bool thread : {false, true}) {
    PageServerOptions opt;
    opt.prefetch = true;
    opt.prefetch_thread = thread;
    opt.prefetch_chunk = 64 * P;  // several chunks over the 2 MiB area
    Outcome o = serve(
        [](const ChildIo& io) {
          if (wait_cmd(io.cmd) != 'v') return;
          touch_all(io);
        },
        opt, nullptr, [](Child& ch) { ch.send('v'); });
    EXPECT_EQ(o.report, "ok\n") << "prefetch thread " << thread;
    EXPECT_TRUE(exited_ok(o.status));
    EXPECT_EQ(o.stats.faults, 0u);
    EXPECT_EQ(o.stats.prefetch_pages + o.stats.zero_pages, kPages - (kGapEnd - kGapFirst));
    EXPECT_GE(o.stats.all_served_ns, 0);
  }
}

// Prefetch running while the child touches everything: faults go first, content is right.
TEST_F(PageServerTest, PrefetchAndFaultsTogether) {
  for (bool thread : {false, true}) {
    PageServerOptions opt;
    opt.prefetch_thread = thread;
    opt.prefetch_chunk = 16 * P;
    Outcome o = serve(touch_all, opt);
    EXPECT_EQ(o.report, "ok\n");
    EXPECT_TRUE(exited_ok(o.status));
  }
}

// Prefetch of long owed ranges (the dense store: one range, chunks cut in pieces) while
// threads read along it, two in order and two against it: faults inside the chunk being
// filled wait for it, faults elsewhere stop it; every page right, every fault answered.
TEST_F(PageServerTest, PrefetchPiecesWithThreadsReadingAlong) {
  g_dense = true;
  for (bool thread : {false, true}) {
    PageServerOptions opt;
    opt.prefetch_thread = thread;  // default chunk: the whole area, in pieces
    Outcome o = serve(race, opt, start_racers, nullptr, g_dense_path);
    EXPECT_EQ(o.report, "ok\n") << "prefetch thread " << thread;
    EXPECT_TRUE(exited_ok(o.status));
    EXPECT_TRUE(o.stats.errors.empty());
    EXPECT_EQ(o.stats.fault_pages + o.stats.prefetch_pages, kPages);
    EXPECT_EQ(o.stats.zero_pages, 0u);
  }
  g_dense = false;
}

// An mprotect splits the area into VMAs inside one owed range: windows and prefetch chunks
// that cross the edge answer ENOENT and are cut, nothing is lost. And a system call reading a
// lazy page (kernel-mode access) faults it in like the program would.
void split_and_syscall(const ChildIo& io) {
  if (::mprotect(at(10), 2 * P, PROT_READ) != 0 || ::mprotect(at(301), P, PROT_READ) != 0)
    return say(io.report, "FAIL mprotect\n");
  int fds[2];
  if (::pipe(fds) != 0) return say(io.report, "FAIL pipe\n");
  char buf[P];
  if (::write(fds[1], at(400), P) != static_cast<ssize_t>(P) ||
      ::read(fds[0], buf, P) != static_cast<ssize_t>(P))
    return say(io.report, "FAIL write(2) from a lazy page\n");
  if (!holds(buf, 400)) return say(io.report, "FAIL write(2) copied wrong content\n");
  touch_all(io);
}

TEST_F(PageServerTest, AreaSplitByMprotectAndKernelAccess) {
  for (bool prefetch : {false, true}) {
    PageServerOptions opt = no_prefetch();
    opt.prefetch = prefetch;
    opt.prefetch_thread = false;
    Outcome o = serve(split_and_syscall, opt);
    EXPECT_EQ(o.report, "ok\n") << "prefetch " << prefetch;
    EXPECT_TRUE(exited_ok(o.status));
    EXPECT_TRUE(o.stats.errors.empty());
    // Without prefetch the child's faults decide every fill: the window of page 11 (owed
    // range 11..16) crosses the edge at page 12. With prefetch, who crosses it is timing.
    if (!prefetch) {
      EXPECT_GT(o.stats.enoent, 0u) << "no fill crossed a VMA edge: the test lost its point";
    }
  }
}

// stop() while pages are owed: the process is killed (never left to read zero pages).
TEST_F(PageServerTest, StopKillsProcessesStillOwedPages) {
  Child ch = spawn([](const ChildIo& io) {
    wait_cmd(io.cmd);
    check_range(io.report, 0, kPages, "after stop");
  });
  PageServer server(no_prefetch());
  server.add_process(ch.pid, pull_uffd(ch), dup_fd(ch.pidfd.get()), open_store(g_store_path),
                     {{kBase, kBase + kLen}});
  ch.send('g');
  server.stop();
  server.run();
  ch.send('c');
  EXPECT_EQ(ch.read_report(), "");
  const int status = ch.wait();
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  ASSERT_EQ(server.stats().errors.size(), 1u);
  EXPECT_NE(server.stats().errors[0].find("page server stopped with"), std::string::npos)
      << server.stats().errors[0];
}

// A process that exits while pages are owed: its state is freed and run() returns.
TEST_F(PageServerTest, ExitWhileOwedEndsTheRun) {
  Outcome o = serve([](const ChildIo& io) { check_range(io.report, 0, 4, "few"); }, no_prefetch());
  EXPECT_EQ(o.report, "");
  EXPECT_TRUE(exited_ok(o.status));
  EXPECT_EQ(o.stats.exits, 1u);
  EXPECT_GT(o.stats.dropped_pages, 0u);
  EXPECT_LT(o.stats.all_served_ns, 0);  // never all served
}

// A copy of the store with the frame holding `page` damaged; returns its path and that
// frame's number.
std::pair<std::string, uint64_t> corrupt_store(uint64_t page,
                                               const std::string& src = g_store_path) {
  const std::string bad = g_store_dir + "/pages-corrupt.lzp";
  std::filesystem::copy_file(src, bad, std::filesystem::copy_options::overwrite_existing);
  uint64_t frame = 0, offset = 0, size = 0;
  {
    auto r = image::PageStoreReader::open(bad);
    auto loc = r->find(kBase + page * P);
    if (!loc || loc->kind != image::PageRun::DATA) throw Error("not a DATA page");
    frame = loc->stream_page / r->index().frame_pages();
    offset = r->frame(frame).offset;
    size = r->frame(frame).size;
  }
  std::fstream f(bad, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset + size / 2));
  const char junk[8] = {'\x5a', '\x17', '\x00', '\x7f', '\x13', '\x66', '\x01', '\x42'};
  f.write(junk, sizeof(junk));
  return {bad, frame};
}

// (h) A corrupt frame: the process is killed, never given zeros; the message says why.
TEST_F(PageServerTest, CorruptFrameKillsTheProcess) {
  const uint64_t page = 41;  // a DATA page
  const auto [bad, frame] = corrupt_store(page);
  Outcome o = serve(
      [&](const ChildIo& io) {
        say(io.report, "touching\n");
        if (is_zero(at(page))) return say(io.report, "saw zeros\n");
        say(io.report, holds(at(page), page) ? "saw content\n" : "saw garbage\n");
      },
      no_prefetch(), nullptr, nullptr, bad);
  EXPECT_EQ(o.report, "touching\n") << "the child went on after the corrupt frame";
  EXPECT_TRUE(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL) << o.status;
  ASSERT_EQ(o.stats.errors.size(), 1u);
  const std::string& e = o.stats.errors[0];
  EXPECT_EQ(e.rfind("page server: pid ", 0), 0u) << e;
  EXPECT_NE(e.find(bad + ": frame " + std::to_string(frame)), std::string::npos) << e;
  EXPECT_NE(e.find("killed the process rather than serve wrong memory"), std::string::npos) << e;
  EXPECT_EQ(o.stats.killed, 1u);
  EXPECT_NE(o.summary.find("KILLED"), std::string::npos) << o.summary;
}

// A corrupt frame met by the background fill (fill pipeline on: whole frames are read straight
// into the chunk buffer, image-format/page_store_direct.h) while the process is idle: it is
// killed with the frame named, and never reads what that frame held.
TEST_F(PageServerTest, CorruptFrameDuringTheDrainKillsTheProcess) {
  // The first page of a whole (raw: the pages do not compress) frame inside one DATA run, so
  // that the fill reads it straight into its buffer, not through the frame cache.
  uint64_t page = 0;
  {
    auto r = image::PageStoreReader::open(g_store_path);
    const uint64_t fp = r->index().frame_pages();
    for (uint64_t i = 0; i + fp <= kPages && page == 0; ++i) {
      const auto a = r->find(kBase + i * P), b = r->find(kBase + (i + fp - 1) * P);
      if (a && b && a->kind == image::PageRun::DATA && b->kind == image::PageRun::DATA &&
          a->stream_page % fp == 0 && b->stream_page == a->stream_page + fp - 1)
        page = i;
    }
  }
  ASSERT_NE(page, 0u);
  const auto [bad, frame] = corrupt_store(page);
  PageServerOptions opt;
  opt.prefetch_thread = true;
  opt.prefetch_chunk = 64 * P;  // whole frames inside each chunk
  Outcome o = serve(
      [](const ChildIo& io) {
        if (wait_cmd(io.cmd) != 'v') return;
        touch_all(io);
      },
      opt, nullptr, [](Child& ch) { ch.send('v'); }, bad);
  EXPECT_EQ(o.report, "") << "the child went on after the corrupt frame";
  EXPECT_TRUE(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL) << o.status;
  EXPECT_EQ(o.stats.faults, 0u);
  ASSERT_EQ(o.stats.errors.size(), 1u);
  const std::string& e = o.stats.errors[0];
  EXPECT_NE(e.find(bad + ": frame " + std::to_string(frame)), std::string::npos) << e;
  EXPECT_NE(e.find("SHA-256"), std::string::npos) << e;
  EXPECT_NE(e.find("killed the process rather than serve wrong memory"), std::string::npos) << e;
}

// A store of LZ4 frames (the dump's default; the pages above do not compress, so they are
// stored raw): every page of the area DATA, a random word then the page number over and over.
std::string write_lz4_store() {
  const std::string path = g_store_dir + "/pages-lz4.lzp";
  image::PageStoreOptions o;
  image::parse_compression("lz4", o);
  o.frame_size = image::kMinFrameSize;
  o.threads = 1;
  image::PageStoreWriter w(path, o);
  std::vector<uint64_t> page(P / 8);
  for (uint64_t i = 0; i < kPages; ++i) {
    for (uint64_t k = 0; k < P / 8; ++k) page[k] = k == 0 ? mix(i) : i;
    w.add_pages(kBase + i * P, page.data(), 1);
  }
  w.finish();
  return path;
}

// A damaged LZ4 frame is refused by its digest, by name, before any of its bytes is decoded or
// copied: on the fault path (through the frame cache) and in the drain (the fill pipeline's
// workers read whole frames straight into their buffers), each of which checks the frame on
// the thread that decodes it.
TEST_F(PageServerTest, DamagedLz4FrameIsRefusedOnTheFaultPathAndInTheDrain) {
  const std::string lz4 = write_lz4_store();
  const uint64_t page = 64;  // the first page of frame 16, inside the second 64-page chunk
  const auto [bad, frame] = corrupt_store(page, lz4);
  {
    auto r = image::PageStoreReader::open(bad);
    ASSERT_TRUE(r->lz4_frames());
    ASSERT_FALSE(r->frame(frame).raw);
    ASSERT_EQ(r->find(kBase + page * P)->stream_page, frame * r->index().frame_pages());
  }
  PageServerOptions drain;
  drain.prefetch_thread = true;
  drain.prefetch_chunk = 64 * P;  // whole frames inside each chunk
  for (const bool on_fault : {true, false}) {
    SCOPED_TRACE(on_fault ? "fault path" : "drain");
    Outcome o = serve(
        [&](const ChildIo& io) {
          if (!on_fault && wait_cmd(io.cmd) != 'v') return;
          say(io.report, "touching\n");
          const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(at(page));
          say(io.report, w[0] == mix(page) && w[1] == page ? "saw content\n" : "saw garbage\n");
        },
        on_fault ? no_prefetch() : drain, nullptr, [](Child& ch) { ch.send('v'); }, bad);
    EXPECT_EQ(o.report, on_fault ? "touching\n" : "") << "went on after the damaged frame";
    EXPECT_TRUE(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL) << o.status;
    if (!on_fault) {
      EXPECT_EQ(o.stats.faults, 0u);
    }
    ASSERT_EQ(o.stats.errors.size(), 1u);
    const std::string& e = o.stats.errors[0];
    EXPECT_NE(e.find(bad + ": frame " + std::to_string(frame) + ": its "), std::string::npos) << e;
    EXPECT_NE(e.find("do not match their SHA-256 in the index"), std::string::npos) << e;
    EXPECT_NE(e.find("killed the process rather than serve wrong memory"), std::string::npos) << e;
  }
}

// The faulting page is read and filled before the rest of its window: a corrupt frame in
// the rest does not keep the faulting thread from its (sound) page, and the process is
// killed before it can read the pages of the corrupt frame.
TEST_F(PageServerTest, CorruptFrameInTheRestOfAWindow) {
  const uint64_t bad_page = 41;  // DATA run 39..44 (38 and 45 are ZERO), window 32..47
  const auto [bad, frame] = corrupt_store(bad_page);
  uint64_t good = 0;  // a page of that run and window in another frame
  {
    auto r = image::PageStoreReader::open(bad);
    for (uint64_t c : {39, 40, 42, 43, 44}) {
      auto loc = r->find(kBase + c * P);
      ASSERT_TRUE(loc && loc->kind == image::PageRun::DATA) << c;
      if (loc->stream_page / r->index().frame_pages() != frame) good = c;
    }
  }
  ASSERT_NE(good, 0u);
  Outcome o = serve(
      [&](const ChildIo& io) {
        say(io.report, "touching\n");
        say(io.report, holds(at(good), good) ? "good page ok\n" : "good page wrong\n");
        if (is_zero(at(bad_page))) return say(io.report, "saw zeros\n");
        say(io.report, "went on\n");
      },
      no_prefetch(), nullptr, nullptr, bad);
  // Whether the child reports its good page before the kill reaches it is timing.
  EXPECT_TRUE(o.report == "touching\n" || o.report == "touching\ngood page ok\n") << o.report;
  EXPECT_TRUE(WIFSIGNALED(o.status) && WTERMSIG(o.status) == SIGKILL) << o.status;
  EXPECT_EQ(o.stats.faults, 1u);
  EXPECT_EQ(o.stats.fault_pages, 1u) << "the faulting page was not filled before the window";
  ASSERT_EQ(o.stats.errors.size(), 1u);
  EXPECT_NE(o.stats.errors[0].find(bad + ": frame " + std::to_string(frame)), std::string::npos)
      << o.stats.errors[0];
}

// (i) The page server process is killed mid-way. With the guardian, the restored process is
// killed and never goes on; without it, the kernel gives the process zero pages in place of
// its memory (the danger the guardian exists for).
struct GuardianRun {
  std::string report;
  int status = 0;
  std::string guardian_log;
};

GuardianRun kill_server_midway(bool with_guardian) {
  Child ch = spawn([](const ChildIo& io) {
    if (!check_range(io.report, 0, 8, "phase 1")) return;
    say(io.report, "phase1\n");
    if (wait_cmd(io.cmd) != 'c') return;
    // The server is dead now: these pages are still owed.
    for (uint64_t i = 100; i < 110; ++i) {
      if (is_zero(at(i)) && !zero_page(i)) return say(io.report, "phase2 zeros\n");
    }
    say(io.report, "phase2 content\n");
  });
  int ready[2], log[2];
  if (::pipe2(ready, O_CLOEXEC) != 0 || ::pipe2(log, O_CLOEXEC) != 0) throw Error("pipe");
  pid_t server = ::fork();
  if (server == 0) {
    ::close(ready[0]);
    ::close(log[0]);
    try {
      PageServerOptions opt = no_prefetch();
      opt.guardian_log_fd = log[1];
      PageServer s(opt);
      s.add_process(ch.pid, pull_uffd(ch), dup_fd(ch.pidfd.get()), open_store(g_store_path),
                    {{kBase, kBase + kLen}});
      if (with_guardian) s.start_guardian();
      char line[32];
      int n = std::snprintf(line, sizeof(line), "%d\n", static_cast<int>(s.guardian_pid()));
      (void)!::write(ready[1], line, static_cast<size_t>(n));
      s.run();
    } catch (...) {
    }
    ::_exit(0);
  }
  ::close(ready[1]);
  ::close(log[1]);
  UniqueFd ready_rd(ready[0]), log_rd(log[0]);
  char buf[64] = {};
  ssize_t n = ::read(ready_rd.get(), buf, sizeof(buf) - 1);
  const pid_t guardian = n > 0 ? static_cast<pid_t>(std::atoi(buf)) : 0;
  GuardianRun out;
  ch.send('g');
  std::string phase1 = ch.read_line();
  if (phase1 != "phase1\n") {
    out.report = phase1;
    send_signal(server, SIGKILL);
    ::waitpid(server, nullptr, 0);
    return out;
  }
  send_signal(server, SIGKILL);
  ch.send('c');  // at once: the guardian may not have acted yet
  ::waitpid(server, nullptr, 0);
  out.report = ch.read_report();
  out.status = ch.wait();
  if (guardian > 0) {
    std::ostringstream text;
    char b[512];
    ssize_t k;
    while ((k = ::read(log_rd.get(), b, sizeof(b))) > 0) text.write(b, k);
    out.guardian_log = text.str();
    ::waitpid(guardian, nullptr, 0);  // we are its subreaper
  }
  return out;
}

TEST_F(PageServerTest, KilledServerGetsTheProcessKilledByTheGuardian) {
  ASSERT_EQ(::prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  GuardianRun r = kill_server_midway(true);
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  EXPECT_EQ(r.report, "") << "the process went on after the server died";
  EXPECT_TRUE(WIFSIGNALED(r.status) && WTERMSIG(r.status) == SIGKILL) << r.status;
  EXPECT_NE(r.guardian_log.find("lazycr guardian: the page server (pid "), std::string::npos)
      << r.guardian_log;
  EXPECT_NE(r.guardian_log.find("rather than let them read zero pages"), std::string::npos)
      << r.guardian_log;
}

TEST_F(PageServerTest, WithoutGuardianADeadServerMeansZeroPages) {
  GuardianRun r = kill_server_midway(false);
  EXPECT_EQ(r.report, "phase2 zeros\n") << "the kernel no longer gives zero pages here?";
  EXPECT_TRUE(exited_ok(r.status));
}

// The guardian exits by itself when the server finishes normally; stats are written as JSON.
TEST_F(PageServerTest, GuardianLeavesQuietlyAndStatsJson) {
  Child ch = spawn(touch_all);
  PageServerOptions opt = no_prefetch();
  PageServer server(opt);
  server.add_process(ch.pid, pull_uffd(ch), dup_fd(ch.pidfd.get()), open_store(g_store_path),
                     {{kBase, kBase + kLen}});
  server.start_guardian();
  const pid_t guardian = server.guardian_pid();
  ASSERT_GT(guardian, 0);
  ch.send('g');
  {
    Watchdog dog(server);
    server.run();
  }
  EXPECT_EQ(ch.read_report(), "ok\n");
  EXPECT_TRUE(exited_ok(ch.wait()));
  // finish() reaped it: the pid is no longer our child.
  EXPECT_EQ(::waitpid(guardian, nullptr, WNOHANG), -1);
  const std::string path = g_store_dir + "/stats.json";
  server.write_stats_json(path);
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  for (const char* key :
       {"\"time_to_first_fault_ns\"", "\"time_until_nothing_owed_ns\"", "\"by_fault\"",
        "\"by_prefetch\"", "\"zero\"", "\"p50\"", "\"p90\"", "\"p99\"", "\"max\"",
        "\"bytes_decompressed\"", "\"fork\"", "\"remap\"", "\"remove\"", "\"unmap\""})
    EXPECT_NE(text.str().find(key), std::string::npos) << key << " in " << text.str();
  EXPECT_NE(server.summary().find("faults"), std::string::npos);
}

TEST_F(PageServerTest, AddProcessRefusesBadAreas) {
  PageServer server(no_prefetch());
  auto store = open_store(g_store_path);
  EXPECT_THROW(server.add_process(0, UniqueFd(::dup(0)), UniqueFd(), store, {}), Error);
  EXPECT_THROW(
      server.add_process(1, UniqueFd(::dup(0)), UniqueFd(), store, {{kBase + 1, kBase + P}}),
      Error);
  EXPECT_THROW(server.add_process(1, UniqueFd(::dup(0)), UniqueFd(), store,
                                  {{kBase, kBase + 4 * P}, {kBase + 2 * P, kBase + 8 * P}}),
               Error);
  EXPECT_EQ(server.owed_pages(), 0u);
}

}  // namespace
}  // namespace lazycr::uffd
