// Lazy page server figures (bench/RESULTS.md, "Lazy page server"): fault service latency for
// single faults (window 4 KiB vs 64 KiB, random and sequential touches, 64 KiB windows on one
// frame or straddling two), the background drain rate with prefetch on, and faults served
// while prefetch runs, with the server and the faulting process on the same CPU, on different
// CPUs, or unpinned.
//
// The "restored process" is a forked child that maps the store's area, creates a userfaultfd
// and hands it over exactly as tests/unit/page_server_test.cc does. The store: 512 MiB of
// semi-compressible pages (1 KiB pseudo-random then 3 KiB of zeros, about 4:1 with zstd -1),
// default 64 KiB frames, on LAZYCR_BENCH_DIR (default /dev/shm, so no disk I/O is measured).
// A second store holds the same area behind 8 pages stored at a lower address (not part of
// the area): its frames start half-way into each 64 KiB window, as in a real image, where the
// stream of stored pages runs through all areas and never lines up with windows.
//
// Usage: page_server_bench [MiB] [--part latency,drain,prefetch] [--chunk BYTES] [--runs N]
//   MiB: the area (default 512); --part: the sections to run (default all); --chunk: the
//   server's prefetch_chunk (default: the server's default); --runs: repeat each row N times.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "common/signals.h"
#include "image-format/page_store.h"
#include "uffd/page_server.h"
#include "uffd/uffd.h"

namespace {

using namespace lazycr;
using lazycr::uffd::PageServer;
using lazycr::uffd::PageServerOptions;
using lazycr::uffd::PageServerStats;

constexpr uint64_t P = 4096;
constexpr uint64_t kBase = 0x5a5a00000000ull;
constexpr int kLatencyTouches = 4000;
// The straddling store: this many pages stored below the area shift its frames by half a
// 64 KiB window.
constexpr uint64_t kShiftPages = 8;
constexpr uint64_t kShiftBase = kBase - (1ull << 30);

uint64_t g_pages = 0;  // pages in the store / the child's area

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void write_store(const std::string& path, bool shifted) {
  image::PageStoreOptions o;
  image::PageStoreWriter w(path, o);
  constexpr uint64_t kBatch = 256;  // 1 MiB per add_pages
  std::vector<uint64_t> buf(kBatch * P / 8, 0);
  if (shifted) {
    for (uint64_t i = 0; i < kShiftPages * P / 8; ++i) buf[i] = mix(i) | 1;
    w.add_pages(kShiftBase, buf.data(), kShiftPages);
  }
  for (uint64_t first = 0; first < g_pages; first += kBatch) {
    const uint64_t n = std::min(kBatch, g_pages - first);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t a = kBase + (first + i) * P;
      uint64_t* page = buf.data() + i * (P / 8);
      for (uint64_t k = 0; k < 1024 / 8; ++k) page[k] = mix(a + 8 * k);
    }
    w.add_pages(kBase + first * P, buf.data(), n);
  }
  w.finish();
}

void pin(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof(set), &set);
}

// kSparse: random touches with a 50 µs sleep between them (it leaves the CPU to the server,
// as a process waiting for I/O would), then, once the server is done, every page checked:
// faults arrive while prefetch is busy.
enum class Pattern { kRandom, kSequential, kIdle, kSparse };
constexpr int64_t kSparseGapNs = 50'000;

struct Config {
  const char* name;
  Pattern pattern;
  uint64_t window;
  bool prefetch;
  bool prefetch_thread;
  int server_cpu;  // -1: not pinned
  int child_cpu;
  bool straddle = false;  // the store whose frames straddle 64 KiB windows
};

uint64_t g_chunk = 0;  // prefetch_chunk; 0: the server's default

struct Result {
  PageServerStats stats;
  std::vector<uint32_t> touch_ns;  // child-observed, per touch
  bool verified = false;
  int64_t child_total_ns = 0;
  double server_cpu_ms = 0;  // CPU time (user + system) of the server's threads during run()
};

double cpu_ms() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 +
         (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

// Faults answered by a prefetch chunk's wake-up (0 for a server that does not count them, so
// that this file also builds against older servers for comparisons).
template <typename Stats>
uint64_t prefetch_waits(const Stats& s) {
  if constexpr (requires { s.prefetch_waits; }) {
    return s.prefetch_waits;
  } else {
    return 0;
  }
}

uint64_t pct(std::vector<uint32_t> v, double q) {
  if (v.empty()) return 0;
  size_t k = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
  return v[k];
}

// The child: touches pages as the pattern says and writes its per-touch times, or waits for
// "v" and checks the first word of every page.
[[noreturn]] void child_main(const Config& c, int cmd, int report) {
  const uint64_t len = g_pages * P;
  void* p = ::mmap(reinterpret_cast<void*>(kBase), len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_NORESERVE, -1, 0);
  if (p != reinterpret_cast<void*>(kBase)) ::_exit(2);
  ::madvise(p, len, MADV_NOHUGEPAGE);
  const int ufd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  (void)!::write(report, &ufd, sizeof(ufd));
  char go = 0;
  if (::read(cmd, &go, 1) != 1 || go != 'g') ::_exit(3);
  ::close(ufd);
  pin(c.child_cpu);
  static uint32_t times[kLatencyTouches];
  int64_t total = 0;
  int ok = 1;
  auto check_all = [&] {
    if (::read(cmd, &go, 1) != 1 || go != 'v') ::_exit(4);
    for (uint64_t i = 0; i < g_pages; ++i) {
      const uint64_t a = kBase + i * P;
      if (*reinterpret_cast<volatile uint64_t*>(a) != mix(a)) ok = 0;
    }
  };
  if (c.pattern == Pattern::kIdle) {
    const int64_t t = now_ns();
    check_all();
    total = now_ns() - t;
  } else {
    const uint64_t blocks = g_pages / 16;
    const int64_t t0 = now_ns();
    for (int i = 0; i < kLatencyTouches; ++i) {
      // Random: a different 64 KiB block each time (7919 is prime, blocks a power of two).
      const uint64_t page = c.pattern == Pattern::kSequential
                                ? static_cast<uint64_t>(i)
                                : (static_cast<uint64_t>(i) * 7919 % blocks) * 16 + i % 16;
      const uint64_t a = kBase + page * P;
      if (c.pattern == Pattern::kSparse) {
        const timespec gap{0, kSparseGapNs};
        ::nanosleep(&gap, nullptr);
      }
      const int64_t t = now_ns();
      const uint64_t v = *reinterpret_cast<volatile uint64_t*>(a);
      times[i] = static_cast<uint32_t>(now_ns() - t);
      if (v != mix(a)) ok = 0;
    }
    total = now_ns() - t0;
    (void)!::write(report, times, sizeof(times));
    if (c.pattern == Pattern::kSparse) check_all();
  }
  (void)!::write(report, &total, sizeof(total));
  (void)!::write(report, &ok, sizeof(ok));
  ::_exit(0);
}

bool read_all(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

Result run_one(const Config& c, const std::string& store_path) {
  int cmd[2], rep[2];
  if (::pipe2(cmd, O_CLOEXEC) != 0 || ::pipe2(rep, O_CLOEXEC) != 0) fail_errno("pipe");
  pid_t pid = ::fork();
  if (pid < 0) fail_errno("fork");
  if (pid == 0) {
    ::close(cmd[1]);
    ::close(rep[0]);
    child_main(c, cmd[0], rep[1]);
  }
  ::close(cmd[0]);
  ::close(rep[1]);
  UniqueFd cmd_w(cmd[1]), rep_r(rep[0]);
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  int child_ufd = -1;
  if (!read_all(rep_r.get(), &child_ufd, sizeof(child_ufd)) || child_ufd < 0)
    fail("child could not set up");
  int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), child_ufd, 0));
  if (fd < 0) fail_errno("pidfd_getfd");
  uffd::Userfaultfd u = uffd::Userfaultfd::adopt(fd);
  u.api(UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
        UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_THREAD_ID);
  u.register_range(kBase, g_pages * P);
  UniqueFd ufd(::fcntl(u.fd(), F_DUPFD_CLOEXEC, 0));
  u.reset();

  cpu_set_t old;
  sched_getaffinity(0, sizeof(old), &old);
  pin(c.server_cpu);  // the prefetch thread, made by run(), inherits it
  PageServerOptions opt;
  opt.window = c.window;
  opt.prefetch = c.prefetch;
  opt.prefetch_thread = c.prefetch_thread;
  if (g_chunk != 0) opt.prefetch_chunk = g_chunk;
  Result r;
  {
    PageServer server(opt);
    std::shared_ptr<const image::PageStoreReader> store(image::PageStoreReader::open(store_path));
    server.add_process(pid, std::move(ufd), UniqueFd(::fcntl(pidfd.get(), F_DUPFD_CLOEXEC, 0)),
                       store, {{kBase, kBase + g_pages * P}});
    char g = 'g';
    (void)!::write(cmd_w.get(), &g, 1);
    const double cpu0 = cpu_ms();
    r.stats = server.run();
    r.server_cpu_ms = cpu_ms() - cpu0;
  }
  sched_setaffinity(0, sizeof(old), &old);
  if (c.pattern == Pattern::kIdle || c.pattern == Pattern::kSparse) {
    char v = 'v';
    (void)!::write(cmd_w.get(), &v, 1);
  }
  if (c.pattern != Pattern::kIdle) {
    r.touch_ns.resize(kLatencyTouches);
    read_all(rep_r.get(), r.touch_ns.data(), r.touch_ns.size() * sizeof(uint32_t));
  }
  int ok = 0;
  read_all(rep_r.get(), &r.child_total_ns, sizeof(r.child_total_ns));
  read_all(rep_r.get(), &ok, sizeof(ok));
  r.verified = ok == 1;
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) r.verified = false;
  return r;
}

void print_latency_row(const Config& c, const Result& r, const std::string& cpus) {
  const auto& s = r.stats;
  // Touches that faulted are the slow ones: the top `faults` of the distribution.
  std::vector<uint32_t> t = r.touch_ns;
  std::sort(t.begin(), t.end());
  std::vector<uint32_t> faulting(
      t.end() - static_cast<long>(std::min<uint64_t>(s.faults, t.size())), t.end());
  std::printf("| %s | %llu KiB | %s | %s | %llu | %.1f / %.1f / %.1f | %.1f / %.1f | %.0f | %s |\n",
              c.name, static_cast<unsigned long long>(c.window / 1024),
              c.window < 65536 ? "-" : (c.straddle ? "two" : "one"), cpus.c_str(),
              static_cast<unsigned long long>(s.faults), s.latency_ns(0.5) / 1e3,
              s.latency_ns(0.9) / 1e3, s.latency_ns(0.99) / 1e3, pct(faulting, 0.5) / 1e3,
              pct(faulting, 0.99) / 1e3, static_cast<double>(r.child_total_ns) / kLatencyTouches,
              r.verified ? "yes" : "NO");
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    uint64_t mib = 512;
    std::string parts = "latency,drain,prefetch";
    int runs = 1;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--part" && i + 1 < argc) {
        parts = argv[++i];
      } else if (a == "--chunk" && i + 1 < argc) {
        g_chunk = std::strtoull(argv[++i], nullptr, 0);
      } else if (a == "--runs" && i + 1 < argc) {
        runs = std::max(1, std::atoi(argv[++i]));
      } else if (!a.empty() && a[0] != '-') {
        mib = std::strtoull(a.c_str(), nullptr, 10);
      } else {
        fail(
            "usage: page_server_bench [MiB] [--part latency,drain,prefetch] [--chunk BYTES] "
            "[--runs N]");
      }
    }
    auto part = [&](const char* name) { return parts.find(name) != std::string::npos; };
    g_pages = mib * 256;
    const char* env = std::getenv("LAZYCR_BENCH_DIR");
    const std::string dir = env ? env : "/dev/shm";
    const std::string store = dir + "/page_server_bench.lzp";
    const std::string shifted = dir + "/page_server_bench_shifted.lzp";
    const int64_t t = now_ns();
    write_store(store, false);
    write_store(shifted, true);
    auto reader = image::PageStoreReader::open(store);
    std::printf(
        "store: %llu MiB semi-compressible, %llu frames of 64 KiB, file %.1f MiB (%.2fx), "
        "written in %.2f s (with the shifted store); prefetch chunk %llu KiB\n\n",
        static_cast<unsigned long long>(mib),
        static_cast<unsigned long long>(g_pages * P / image::kDefaultFrameSize),
        static_cast<double>(reader->file_size()) / (1 << 20),
        static_cast<double>(mib << 20) / static_cast<double>(reader->file_size()),
        static_cast<double>(now_ns() - t) / 1e9,
        static_cast<unsigned long long>((g_chunk ? g_chunk : PageServerOptions{}.prefetch_chunk) /
                                        1024));
    reader.reset();
    auto path_of = [&](const Config& c) { return c.straddle ? shifted : store; };
    auto cpus = [](const Config& c) {
      return c.server_cpu < 0              ? std::string("unpinned")
             : c.server_cpu == c.child_cpu ? std::string("same CPU")
                                           : std::string("different CPUs");
    };

    if (part("latency")) {
      const Config latency[] = {
          {"random", Pattern::kRandom, 4096, false, false, 0, 0},
          {"random", Pattern::kRandom, 65536, false, false, 0, 0},
          {"random", Pattern::kRandom, 65536, false, false, 0, 0, true},
          {"random", Pattern::kRandom, 4096, false, false, 0, 1},
          {"random", Pattern::kRandom, 65536, false, false, 0, 1},
          {"random", Pattern::kRandom, 65536, false, false, 0, 1, true},
          {"random", Pattern::kRandom, 65536, false, false, -1, -1},
          {"random", Pattern::kRandom, 65536, false, false, -1, -1, true},
          {"sequential", Pattern::kSequential, 4096, false, false, 0, 0},
          {"sequential", Pattern::kSequential, 65536, false, false, 0, 0},
          {"sequential", Pattern::kSequential, 65536, false, false, 0, 0, true},
          {"sequential", Pattern::kSequential, 4096, false, false, 0, 1},
          {"sequential", Pattern::kSequential, 65536, false, false, 0, 1},
      };
      std::printf("Fault latency, prefetch off, %d touches of the first word of a page:\n",
                  kLatencyTouches);
      std::printf(
          "| touches | window | frames per window | server / process | faults | service "
          "p50 / p90 / p99 µs | touch p50 / p99 µs (faulting touches) | ns per touch | "
          "verified |\n");
      std::printf("|---|---:|---|---|---:|---:|---:|---:|---|\n");
      for (const Config& c : latency)
        for (int i = 0; i < runs; ++i) print_latency_row(c, run_one(c, path_of(c)), cpus(c));
    }

    if (part("drain")) {
      const Config drain[] = {
          {"idle", Pattern::kIdle, 65536, true, true, -1, -1},
          {"idle", Pattern::kIdle, 65536, true, false, -1, -1},
          {"idle", Pattern::kIdle, 65536, true, true, 0, 0},
          {"idle", Pattern::kIdle, 65536, true, false, 0, 0},
          {"idle", Pattern::kIdle, 65536, true, true, 0, 1},
          {"idle", Pattern::kIdle, 65536, true, false, 0, 1},
      };
      std::printf(
          "\nBackground drain, prefetch on, the process idle until nothing is owed, then "
          "it checks every page:\n");
      std::printf(
          "| decompress thread | server / process | time to nothing owed ms | GB/s | server CPU "
          "ms | GB per server CPU s | pages prefetched | MiB decompressed | verified |\n");
      std::printf("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
      for (const Config& c : drain) {
        for (int i = 0; i < runs; ++i) {
          Result r = run_one(c, path_of(c));
          const auto& s = r.stats;
          const double secs = static_cast<double>(s.all_served_ns) / 1e9;
          const double bytes = static_cast<double>(g_pages * P);
          std::printf("| %s | %s | %.1f | %.2f | %.1f | %.2f | %llu | %.0f | %s |\n",
                      c.prefetch_thread ? "on" : "off", cpus(c).c_str(), secs * 1e3,
                      bytes / secs / 1e9, r.server_cpu_ms, bytes / (r.server_cpu_ms / 1e3) / 1e9,
                      static_cast<unsigned long long>(s.prefetch_pages),
                      static_cast<double>(s.bytes_decompressed) / (1 << 20),
                      r.verified ? "yes" : "NO");
          std::fflush(stdout);
        }
      }
    }

    if (part("prefetch")) {
      // Faults while prefetch runs: each one may wait for the prefetch copy in progress.
      const Config mixed[] = {
          {"sparse", Pattern::kSparse, 65536, true, false, -1, -1, true},
          {"sparse", Pattern::kSparse, 65536, true, true, -1, -1, true},
          {"sparse", Pattern::kSparse, 65536, true, false, 0, 1, true},
      };
      std::printf(
          "\nFaults during prefetch: %d random touches, %lld µs of sleep between them (64 KiB "
          "window, straddling frames), while prefetch drains the rest:\n",
          kLatencyTouches, static_cast<long long>(kSparseGapNs / 1000));
      std::printf(
          "| decompress thread | server / process | faults / answered by prefetch | service p50 "
          "/ p90 / p99 µs | touch p50 / p90 / p99 µs (faulting touches) | pages by fault / "
          "prefetch | time to nothing owed ms | verified |\n");
      std::printf("|---|---|---:|---:|---:|---:|---:|---|\n");
      for (const Config& c : mixed) {
        for (int i = 0; i < runs; ++i) {
          Result r = run_one(c, path_of(c));
          const auto& s = r.stats;
          std::vector<uint32_t> t = r.touch_ns;
          std::sort(t.begin(), t.end());
          const uint64_t slow = s.faults + prefetch_waits(s);
          std::vector<uint32_t> faulting(
              t.end() - static_cast<long>(std::min<uint64_t>(slow, t.size())), t.end());
          std::printf(
              "| %s | %s | %llu / %llu | %.1f / %.1f / %.1f | %.1f / %.1f / %.1f | %llu / %llu | "
              "%.1f | %s |\n",
              c.prefetch_thread ? "on" : "off", cpus(c).c_str(),
              static_cast<unsigned long long>(s.faults),
              static_cast<unsigned long long>(prefetch_waits(s)), s.latency_ns(0.5) / 1e3,
              s.latency_ns(0.9) / 1e3, s.latency_ns(0.99) / 1e3, pct(faulting, 0.5) / 1e3,
              pct(faulting, 0.9) / 1e3, pct(faulting, 0.99) / 1e3,
              static_cast<unsigned long long>(s.fault_pages),
              static_cast<unsigned long long>(s.prefetch_pages),
              static_cast<double>(s.all_served_ns) / 1e6, r.verified ? "yes" : "NO");
          std::fflush(stdout);
        }
      }
    }
    std::filesystem::remove(store);
    std::filesystem::remove(shifted);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "page_server_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
