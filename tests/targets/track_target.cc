// Write tracking (`lazycr dump --track`): a target whose memory changes between dumps, by
// writes and by what a write tracker must survive. `track_target MIB PERMILLE [MODE [ARG]]`
// maps MIB MiB of distinct patterned pages (rewrite_pages.h), prints
//   ready pid=P pages=N
// and waits for signals:
//   SIGUSR2: one round: rewrites about PERMILLE per thousand of the pages with new content,
//            does what MODE does in that round, prints "round R rewrote K";
//   SIGUSR1: checks every byte of every page against what the rounds did (and has its child
//            check its own, if it has one), prints "verified ok" or "verify FAILED: why",
//            exits 0 or 1.
// Modes:
//   churn: each round also MADV_DONTNEEDs 16 pages (they read as zeros), swaps two 8-page
//          chunks with mremap (contents move, no write), and replaces 4 pages by a fresh
//          mapping (munmap + mmap MAP_FIXED) of which 2 are written;
//   fork:  round 1 forks a child, which rewrites its own copy (rounds 1000+R) at once and at
//          each later round (told through a pipe), and verifies itself when the parent does;
//   exit:  a child forked before "ready" (a copy of the memory, dumped and tracked with the
//          parent) exits in round 1 and stays a zombie until round 2 reaps it;
//   exec:  round 1 executes the program again ("exec-done R"), which maps the memory anew
//          and writes every page with round R's content (a new address space);
//   uffd:  holds a userfaultfd of its own (MISSING mode, a handler thread fills each page on
//          its first touch) on the first of 8 16-page parts of an area mapped before "ready";
//          round R registers part R (memory that existed at the dump: a tracker's registration
//          there would make it fail with EBUSY) and touches every page of it;
//   file PATH: the memory is a private mapping of the file PATH (made, zero-filled): half of
//          its pages are written before "ready" (the rest read as the file's zeros).
// The uffd mode's descriptor is unrestorable: dumps take --skip-unsupported-fds, and after a
// restore /dev/null stands in for it (the handler thread then ends; the pages it filled stay).
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "rewrite_pages.h"

namespace {

using rewrite_pages::fill;
using rewrite_pages::kZero;

constexpr uint64_t kPartPages = 16, kParts = 8;
constexpr uint32_t kFilledRound = 7777;  // the content the uffd handler fills pages with

int g_uffd = -1;
char* g_uffd_area = nullptr;
uint64_t g_uffd_first_id = 0;

// Serves the target's own userfaultfd: each missing page gets its pattern. Ends when the
// descriptor stops being a userfaultfd (/dev/null after a restore reads as end of file).
void* uffd_handler(void*) {
  std::vector<uint64_t> page(512);
  for (;;) {
    pollfd p{g_uffd, POLLIN, 0};
    if (poll(&p, 1, -1) < 0) {
      if (errno == EINTR) continue;
      return nullptr;
    }
    uffd_msg msg;
    ssize_t n = read(g_uffd, &msg, sizeof msg);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n != sizeof msg) return nullptr;
    if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
    const uint64_t addr = msg.arg.pagefault.address & ~4095ull;
    fill(page.data(), g_uffd_first_id + (addr - reinterpret_cast<uint64_t>(g_uffd_area)) / 4096,
         kFilledRound);
    uffdio_copy copy{};
    copy.dst = addr;
    copy.src = reinterpret_cast<uint64_t>(page.data());
    copy.len = 4096;
    if (ioctl(g_uffd, UFFDIO_COPY, &copy) != 0 && errno != EEXIST) return nullptr;
  }
}

bool register_part(uint64_t part) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(g_uffd_area + part * kPartPages * 4096);
  reg.range.len = kPartPages * 4096;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(g_uffd, UFFDIO_REGISTER, &reg) != 0) {
    std::printf("verify FAILED: own UFFDIO_REGISTER of part %llu: %s\n",
                static_cast<unsigned long long>(part), std::strerror(errno));
    std::fflush(stdout);
    return false;
  }
  return true;
}

// Touches every page of `part` (each filled by the handler) and checks it.
bool touch_part(uint64_t part, uint64_t* buf) {
  for (uint64_t i = 0; i < kPartPages; i++) {
    const uint64_t at = part * kPartPages + i;
    fill(buf, g_uffd_first_id + at, kFilledRound);
    if (std::memcmp(buf, g_uffd_area + at * 4096, 4096) != 0) {
      std::printf("verify FAILED: own uffd page %llu differs\n",
                  static_cast<unsigned long long>(at));
      std::fflush(stdout);
      return false;
    }
  }
  return true;
}

bool start_own_uffd(uint64_t pages) {
  g_uffd_area = static_cast<char*>(mmap(nullptr, kParts * kPartPages * 4096, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (g_uffd_area == MAP_FAILED) return false;
  g_uffd_first_id = pages;
  g_uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (g_uffd < 0) return false;
  uffdio_api api{};
  api.api = UFFD_API;
  if (ioctl(g_uffd, UFFDIO_API, &api) != 0) return false;
  pthread_t t;
  return register_part(0) && pthread_create(&t, nullptr, uffd_handler, nullptr) == 0;
}

// The child of the fork mode: rewrites its own copy at once and on each command byte 'r'
// (each round acknowledged with 'a'), verifies on 'v' (prints only a failure), exits 0 or 1.
[[noreturn]] void run_child(int cmd, int ack, uint64_t pages, uint64_t permille, char* base,
                            std::vector<uint64_t>& id, std::vector<uint32_t>& last) {
  auto page_at = [&](uint64_t p) { return reinterpret_cast<uint64_t*>(base + p * 4096); };
  auto id_of = [&](uint64_t p) { return id[p]; };
  std::vector<uint64_t> buf(512);
  uint32_t round = 1000;
  for (;;) {
    rewrite_pages::rewrite_round(pages, ++round, permille, page_at, id_of, last.data());
    if (write(ack, "a", 1) != 1) _exit(3);
    char c = 0;
    if (read(cmd, &c, 1) != 1) _exit(3);
    if (c == 'v')
      _exit(rewrite_pages::verify_all(pages, page_at, id_of, last.data(), buf.data(), "child's ",
                                      false)
                ? 0
                : 1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 5) {
    std::fprintf(stderr,
                 "usage: track_target MIB PERMILLE [churn|fork|exit|exec|uffd|file PATH]\n");
    return 2;
  }
  const uint64_t pages = std::strtoull(argv[1], nullptr, 10) * 256;
  const uint64_t permille = std::strtoull(argv[2], nullptr, 10);
  const std::string mode = argc >= 4 ? argv[3] : "";
  if (pages < 1024) return 2;
  char* base = nullptr;
  if (mode == "file") {
    if (argc != 5) return 2;
    int fd = open(argv[4], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(pages * 4096)) != 0) return 3;
    base =
        static_cast<char*>(mmap(nullptr, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
    close(fd);
  } else {
    base = static_cast<char*>(
        mmap(nullptr, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  }
  if (base == MAP_FAILED) return 3;
  // Where a chunk waits while two are swapped.
  char* spare =
      static_cast<char*>(mmap(nullptr, 8 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (spare == MAP_FAILED) return 3;
  auto page_at = [&](uint64_t p) { return reinterpret_cast<uint64_t*>(base + p * 4096); };
  std::vector<uint64_t> id(pages);
  std::vector<uint32_t> last(pages, 0);  // the round that last wrote each position, or kZero
  auto id_of = [&](uint64_t p) { return id[p]; };
  uint32_t round = 0;
  if (mode == "exec-done") {
    // A new address space: every page written with the round of the exec.
    round = static_cast<uint32_t>(std::strtoul(argv[4], nullptr, 10));
    for (uint64_t p = 0; p < pages; p++) {
      id[p] = p;
      fill(page_at(p), p, round);
      last[p] = round;
    }
  } else {
    for (uint64_t p = 0; p < pages; p++) {
      id[p] = p;
      if (mode == "file" && p % 2 == 1) {
        last[p] = kZero;  // still the file's zeros
        continue;
      }
      fill(page_at(p), p, 0);
    }
  }
  std::vector<uint64_t> buf(512);
  if (mode == "uffd" && !(start_own_uffd(pages) && touch_part(0, buf.data()))) return 4;
  pid_t child = 0;
  int cmd[2] = {-1, -1}, ack[2] = {-1, -1};
  if (mode == "exit") {
    child = fork();
    if (child < 0) return 5;
    if (child == 0)
      for (;;) pause();
  }
  rewrite_pages::install_requests();
  if (mode == "exec-done") {
    std::printf("round %u rewrote %llu\n", round, static_cast<unsigned long long>(pages));
  } else {
    std::printf("ready pid=%d pages=%llu\n", getpid(), static_cast<unsigned long long>(pages));
  }
  std::fflush(stdout);
  for (;;) {
    if (rewrite_pages::wait_request() == rewrite_pages::Request::kVerify) {
      bool ok =
          rewrite_pages::verify_all(pages, page_at, id_of, last.data(), buf.data(), "", false);
      if (ok && mode == "uffd")
        for (uint64_t part = 0; ok && part < kParts && part <= round; part++)
          ok = touch_part(part, buf.data());
      if (ok && mode == "fork" && child > 0) {
        int status = 0;
        ok = write(cmd[1], "v", 1) == 1 && waitpid(child, &status, 0) == child &&
             WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok) std::printf("verify FAILED: the child's check (status %d)\n", status);
      }
      if (ok) std::printf("verified ok\n");
      std::fflush(stdout);
      return ok ? 0 : 1;
    }
    round++;
    uint64_t n = rewrite_pages::rewrite_round(pages, round, permille, page_at, id_of, last.data());
    if (mode == "churn") {
      const uint64_t third = pages / 3;
      // MADV_DONTNEED: the pages read as zeros, with no write the tracker could see.
      const uint64_t d = (round * 1543) % (third - 16);
      if (madvise(page_at(d), 16 * 4096, MADV_DONTNEED) != 0) return 4;
      for (uint64_t p = d; p < d + 16; p++) last[p] = kZero;
      // Two chunks swapped by mremap: contents move to other addresses without a write.
      const uint64_t x = third + (round * 769) % (third - 8);
      const uint64_t z = 2 * third + (round * 331) % (third - 8);
      if (mremap(page_at(x), 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, spare) ==
              MAP_FAILED ||
          mremap(page_at(z), 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, page_at(x)) ==
              MAP_FAILED ||
          mremap(spare, 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, page_at(z)) ==
              MAP_FAILED)
        return 5;
      if (mmap(spare, 8 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
          MAP_FAILED)
        return 5;
      for (uint64_t i = 0; i < 8; i++) {
        std::swap(id[x + i], id[z + i]);
        std::swap(last[x + i], last[z + i]);
      }
      // A fresh mapping in place of 4 pages: 2 written, 2 zero.
      const uint64_t f = (round * 2111) % (pages - 4);
      if (munmap(page_at(f), 4 * 4096) != 0 ||
          mmap(page_at(f), 4 * 4096, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
        return 6;
      for (uint64_t p = f; p < f + 4; p++) last[p] = kZero;
      for (uint64_t p = f; p < f + 2; p++) {
        fill(page_at(p), id[p], round);
        last[p] = round;
      }
    } else if (mode == "fork") {
      if (round == 1) {
        if (pipe(cmd) != 0 || pipe(ack) != 0) return 5;
        child = fork();
        if (child < 0) return 5;
        if (child == 0) run_child(cmd[0], ack[1], pages, permille, base, id, last);
      } else if (write(cmd[1], "r", 1) != 1) {
        return 5;
      }
      // The child's round done: a dump after "round" finds it between rounds.
      if (read(ack[0], buf.data(), 1) != 1) return 5;
    } else if (mode == "exit") {
      // Round 1 ends with the child a zombie (waited for, not reaped); round 2 reaps it.
      siginfo_t info;
      if (round == 1 &&
          (kill(child, SIGKILL) != 0 || waitid(P_PID, child, &info, WEXITED | WNOWAIT) != 0))
        return 5;
      if (round == 2 && waitpid(child, nullptr, 0) != child) return 5;
    } else if (mode == "exec" && round == 1) {
      std::fflush(stdout);
      // By its own path, not /proc/self/exe: the name (comm) comes from the path executed.
      char self[4096];
      const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
      if (len <= 0) return 5;
      self[len] = '\0';
      const std::string r = std::to_string(round);
      execl(self, argv[0], argv[1], argv[2], "exec-done", r.c_str(), nullptr);
      return 5;
    } else if (mode == "uffd" && round < kParts) {
      if (!register_part(round) || !touch_part(round, buf.data())) return 6;
    }
    std::printf("round %u rewrote %llu\n", round, static_cast<unsigned long long>(n));
    std::fflush(stdout);
  }
}
