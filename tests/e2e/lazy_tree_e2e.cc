// Lazy restores of trees keep copy-on-write sharing (restore/tree_sharing.h): a tree whose
// children inherited a large buffer from the parent, dumped, restored with --lazy and drained;
// then every byte checked from inside each process, the sharing checked in the kernel's own
// page tables (/proc/PID/pagemap: the same physical page in parent and child) and in its
// proportional set sizes (smaps_rollup), and a child writing a shared page gets its own copy.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "common/fd.h"
#include "tests/e2e/lazy_helpers.h"

namespace lazycr::test {
namespace {

// The tree: the root fills a private buffer (page i of "seed" s has a pattern of its own) and
// forks c1 and c2; c1 writes pages 64-127 and then forks gc (which inherits them), gc writes
// pages 192-255, c2 pages 128-191, and the root rewrites pages 0-63 after its forks. Every
// other page is the root's, shared by all four. Each process then waits for commands in
// WORK/cmd ("N word"): "verify" checks every byte it must have, "cow" makes c2 write page
// kCowPage; each answers in WORK/res-N-ROLE ("ok" or what is wrong).
constexpr const char* kTreeScript = R"PY(
import ctypes, mmap, os, sys, time
work, pages = sys.argv[1], int(sys.argv[2])
P = 4096
COW = 5000
def page(seed, i):
    return (((i + 1) * 0x9E3779B97F4A7C15 + seed * 0x100000001B3) & (2**64 - 1)).to_bytes(8, 'little') * 512
buf = mmap.mmap(-1, pages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
buf[:] = b''.join(page(0, i) for i in range(pages))
own = {'root': (0, 64, 1), 'c1': (64, 128, 2), 'gc': (192, 256, 4), 'c2': (128, 192, 3)}
def write_own(role):
    s, e, seed = own[role]
    for i in range(s, e):
        buf[i * P:(i + 1) * P] = page(seed, i)
def expected(role, i, cowed):
    for r in {'root': ['root'], 'c1': ['c1'], 'gc': ['c1', 'gc'], 'c2': ['c2']}[role]:
        s, e, seed = own[r]
        if s <= i < e:
            return page(seed, i)
    if role == 'c2' and cowed and i == COW:
        return page(9, i)
    return page(0, i)
def serve(role):
    with open(f'{work}/ready-{role}.tmp', 'w') as f:
        f.write(str(os.getpid()))
    os.rename(f'{work}/ready-{role}.tmp', f'{work}/ready-{role}')
    done, cowed, start = 0, False, time.time()
    while time.time() - start < 600:
        try:
            with open(f'{work}/cmd') as f:
                n, word = f.read().split()
            n = int(n)
        except (OSError, ValueError):
            n = done
        if n == done:
            time.sleep(0.005)
            continue
        done = n
        if word == 'exit':
            break
        res = 'ok'
        if word == 'cow' and role == 'c2':
            buf[COW * P:(COW + 1) * P] = page(9, COW)
            cowed = True
        if word == 'verify':
            for i in range(pages):
                if buf[i * P:(i + 1) * P] != expected(role, i, cowed):
                    res = f'FAILED: page {i} is wrong'
                    break
        with open(f'{work}/res-{n}-{role}.tmp', 'w') as f:
            f.write(res)
        os.rename(f'{work}/res-{n}-{role}.tmp', f'{work}/res-{n}-{role}')
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    os._exit(0)
if os.fork() == 0:
    write_own('c1')
    if os.fork() == 0:
        write_own('gc')
        serve('gc')
    serve('c1')
if os.fork() == 0:
    write_own('c2')
    serve('c2')
write_own('root')
for r in ['c1', 'c2', 'gc']:
    while not os.path.exists(f'{work}/ready-{r}'):
        time.sleep(0.005)
pids = {r: open(f'{work}/ready-{r}').read() for r in ['c1', 'c2', 'gc']}
print(f"ready pid={os.getpid()} c1={pids['c1']} c2={pids['c2']} gc={pids['gc']} addr={addr} pages={pages}", flush=True)
serve('root')
)PY";

char state_of(pid_t pid) {
  auto text = proc::try_read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!text) return '\0';
  return proc::parse_stat(*text).state;
}

constexpr uint64_t kPages = 16384;  // 64 MiB
constexpr uint64_t kCowPage = 5000;
const char* const kRoles[] = {"root", "c1", "c2", "gc"};

struct LazyTree {
  TempDir work;
  Child child{{"/usr/bin/python3", "-c", kTreeScript, work.path(), std::to_string(kPages)}};
  TargetInfo info = TargetInfo::parse(child.wait_for("ready", 120));
  std::map<std::string, pid_t> pid{{"root", static_cast<pid_t>(info.first("pid"))},
                                   {"c1", static_cast<pid_t>(info.first("c1"))},
                                   {"c2", static_cast<pid_t>(info.first("c2"))},
                                   {"gc", static_cast<pid_t>(info.first("gc"))}};
  uint64_t addr = info.first("addr");
  int step = 0;

  ~LazyTree() {
    command("exit");
    for (int i = 0; i < 300 && running_any(); i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    for (const char* r : {"gc", "c1", "c2", "root"})
      if (proc::exists(pid[r])) send_signal(pid[r], SIGKILL);
  }
  // After the dump killed the tree: its children came to us (the harness is a subreaper) as
  // zombies; their pids must be free for the restore.
  void reap_killed() {
    for (const char* r : {"c1", "c2", "gc"})
      for (int i = 0; i < 1000; i++) {
        int status;
        pid_t got = ::waitpid(pid[r], &status, WNOHANG);
        if (got == pid[r] || (got < 0 && !proc::exists(pid[r]))) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
  }
  bool running_any() {
    for (const char* r : kRoles)
      if (proc::exists(pid[r]) && state_of(pid[r]) != 'Z') return true;
    return false;
  }
  void command(const std::string& word) {
    step++;
    std::string tmp = work / "cmd.tmp";
    std::ofstream(tmp) << step << " " << word << "\n";
    fs::rename(tmp, work / "cmd");
  }
  // Sends `word` and returns each process's answer.
  std::map<std::string, std::string> ask(const std::string& word) {
    command(word);
    std::map<std::string, std::string> out;
    for (const char* r : kRoles) {
      std::string f = work / ("res-" + std::to_string(step) + "-" + r);
      for (int i = 0; i < 60000 && !fs::exists(f); i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      out[r] = read_text(f);
    }
    return out;
  }
  // Frame number of each page of the buffer in `role` (0 when not present).
  std::vector<uint64_t> pfns(const std::string& role) {
    UniqueFd fd(::open(("/proc/" + std::to_string(pid[role]) + "/pagemap").c_str(), O_RDONLY));
    EXPECT_TRUE(fd.valid()) << role;
    std::vector<uint64_t> e(kPages);
    EXPECT_EQ(::pread(fd.get(), e.data(), kPages * 8, static_cast<off_t>(addr / 4096 * 8)),
              static_cast<ssize_t>(kPages * 8));
    for (auto& v : e) v = (v >> 63) ? v & ((1ull << 55) - 1) : 0;
    return e;
  }
  // The tree's proportional set size (kB), from the kernel's smaps_rollup.
  uint64_t pss_kb() {
    uint64_t sum = 0;
    for (const char* r : kRoles) {
      std::string t = read_text("/proc/" + std::to_string(pid[r]) + "/smaps_rollup");
      auto at = t.find("\nPss:");
      EXPECT_NE(at, std::string::npos) << t;
      if (at != std::string::npos) sum += std::strtoull(t.c_str() + at + 5, nullptr, 10);
    }
    return sum;
  }
};

// Pages [s, e) where `a` and `b` map the same physical pages: how many differ.
uint64_t differing(const std::vector<uint64_t>& a, const std::vector<uint64_t>& b, uint64_t s,
                   uint64_t e) {
  uint64_t n = 0;
  for (uint64_t i = s; i < e; i++) n += a[i] == 0 || a[i] != b[i];
  return n;
}

TEST(LazyTree, InheritedBufferIsSharedAgainAfterTheDrainAndEveryByteIsRight) {
  LazyTree t;
  // The original shares the buffer (else this test proves nothing).
  auto root0 = t.pfns("root"), c20 = t.pfns("c2");
  ASSERT_EQ(differing(root0, c20, 256, kPages), 0u);
  const uint64_t pss_before = t.pss_kb();

  TempDir images;
  std::string dir = images / "img";
  ASSERT_NO_FATAL_FAILURE(dump_killing(t.child, dir));
  t.reap_killed();
  LazyDetached ld;
  ld.start(dir, t.work);
  ASSERT_EQ(ld.rp.pid, t.pid["root"]);
  EXPECT_EQ(ld.wait_server(), 0);  // the drain: nothing owed any more
  std::string stats = read_text(ld.stats);

  // The kernel's page tables: every page the processes shared at dump time is one physical
  // page again; pages a process wrote are its own.
  auto root = t.pfns("root"), c1 = t.pfns("c1"), c2 = t.pfns("c2"), gc = t.pfns("gc");
  EXPECT_EQ(differing(root, c1, 256, kPages), 0u) << "root and c1";
  EXPECT_EQ(differing(root, c2, 256, kPages), 0u) << "root and c2";
  EXPECT_EQ(differing(root, gc, 256, kPages), 0u) << "root and gc (inherited twice)";
  EXPECT_EQ(differing(c1, gc, 64, 128), 0u) << "c1's own pages, inherited by gc";
  EXPECT_EQ(differing(c1, c2, 0, 64), 0u) << "pages the root rewrote after its forks";
  EXPECT_EQ(differing(c1, gc, 0, 64), 0u) << "pages the root rewrote after its forks";
  EXPECT_EQ(differing(root, c1, 0, 64), 64u);
  EXPECT_EQ(differing(c1, c2, 128, 192), 64u);
  const uint64_t pss_after = t.pss_kb();
  EXPECT_LE(pss_after * 10, pss_before * 11)
      << "Pss after the drain " << pss_after << " kB, before the dump " << pss_before << " kB";
  // The server decompressed the processes' own pages, not the buffer once per process.
  const int64_t decompressed = json_number(stats, "bytes_decompressed");
  EXPECT_GE(decompressed, 0) << stats;
  EXPECT_LT(decompressed, static_cast<int64_t>(kPages * 4096 / 2)) << stats;

  for (const auto& [role, res] : t.ask("verify")) EXPECT_EQ(res, "ok") << role;

  // A child writing a shared page gets its own copy; the others keep theirs.
  for (const auto& [role, res] : t.ask("cow")) EXPECT_EQ(res, "ok") << role;
  root = t.pfns("root"), c1 = t.pfns("c1"), c2 = t.pfns("c2");
  EXPECT_NE(c2[kCowPage], root[kCowPage]);
  EXPECT_EQ(c1[kCowPage], root[kCowPage]);
  for (const auto& [role, res] : t.ask("verify")) EXPECT_EQ(res, "ok") << role;
  t.command("exit");
  EXPECT_EQ(ld.rp.wait(), 0);
}

// --no-tree-sharing: every process forked at once, each owing (and getting) its own copy of the
// buffer: every byte right, no page shared any more.
TEST(LazyTree, NoTreeSharingGivesEachProcessItsOwnCopy) {
  LazyTree t;
  TempDir images;
  std::string dir = images / "img";
  ASSERT_NO_FATAL_FAILURE(dump_killing(t.child, dir));
  t.reap_killed();
  LazyDetached ld;
  ld.start(dir, t.work, {"--no-tree-sharing"});
  ASSERT_EQ(ld.rp.pid, t.pid["root"]);
  EXPECT_EQ(ld.wait_server(), 0);
  auto root = t.pfns("root"), c2 = t.pfns("c2");
  EXPECT_EQ(differing(root, c2, 256, kPages), kPages - 256) << "root and c2";
  for (const auto& [role, res] : t.ask("verify")) EXPECT_EQ(res, "ok") << role;
  t.command("exit");
  EXPECT_EQ(ld.rp.wait(), 0);
}

}  // namespace
}  // namespace lazycr::test
