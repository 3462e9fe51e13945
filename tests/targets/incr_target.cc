// Incremental dumps (`lazycr dump --parent`): a target whose memory changes by a known fraction
// between dumps. `incr_target MIB PERMILLE` maps MIB MiB of distinct patterned pages, prints
//   ready pid=P pages=N
// and waits for signals:
//   SIGUSR2: rewrites round r's pages (about PERMILLE per thousand of them, chosen by a hash of
//            page number and round) with new content, prints "round R rewrote K", waits again;
//   SIGUSR1: checks every byte of every page against the rounds done so far, prints
//            "verified ok" or "verify FAILED: why", exits 0 or 1.
// A page's content is a function of its number and the last round that rewrote it, which the
// target keeps in its own (dumped) memory.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

volatile sig_atomic_t g_rewrite = 0;
volatile sig_atomic_t g_verify = 0;

void on_usr2(int) {
  g_rewrite = 1;
}
void on_usr1(int) {
  g_verify = 1;
}

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Half random words, half zero (compressible like a real heap), and no two pages alike.
void fill(uint64_t* w, uint64_t page, uint32_t round) {
  const uint64_t seed = (page << 20) ^ round;
  for (int i = 0; i < 256; i++) w[i] = splitmix(seed * 512 + static_cast<uint64_t>(i));
  std::memset(w + 256, 0, 2048);
  w[510] = page;
  w[511] = round;
}

bool chosen(uint64_t page, uint32_t round, uint64_t permille) {
  return splitmix(page ^ (static_cast<uint64_t>(round) << 40)) % 1000 < permille;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: incr_target MIB PERMILLE\n");
    return 2;
  }
  const uint64_t pages = std::strtoull(argv[1], nullptr, 10) * 256;
  const uint64_t permille = std::strtoull(argv[2], nullptr, 10);
  auto* mem = static_cast<uint64_t*>(
      mmap(nullptr, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (mem == MAP_FAILED) return 3;
  std::vector<uint32_t> last(pages, 0);  // the round that last wrote each page
  for (uint64_t p = 0; p < pages; p++) fill(mem + p * 512, p, 0);
  struct sigaction sa {};
  sa.sa_handler = on_usr2;
  sigaction(SIGUSR2, &sa, nullptr);
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, nullptr);
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  sigaddset(&block, SIGUSR2);
  sigprocmask(SIG_BLOCK, &block, &old);
  std::printf("ready pid=%d pages=%llu\n", getpid(), static_cast<unsigned long long>(pages));
  std::fflush(stdout);
  uint32_t round = 0;
  std::vector<uint64_t> buf(512);
  for (;;) {
    while (!g_rewrite && !g_verify) sigsuspend(&old);
    if (g_rewrite) {
      g_rewrite = 0;
      round++;
      uint64_t n = 0;
      for (uint64_t p = 0; p < pages; p++) {
        if (!chosen(p, round, permille)) continue;
        fill(mem + p * 512, p, round);
        last[p] = round;
        n++;
      }
      std::printf("round %u rewrote %llu\n", round, static_cast<unsigned long long>(n));
      std::fflush(stdout);
    }
    if (g_verify) {
      for (uint64_t p = 0; p < pages; p++) {
        fill(buf.data(), p, last[p]);
        if (std::memcmp(buf.data(), mem + p * 512, 4096) != 0) {
          std::printf("verify FAILED: page %llu (round %u) differs\n",
                      static_cast<unsigned long long>(p), last[p]);
          std::fflush(stdout);
          return 1;
        }
      }
      std::printf("verified ok\n");
      std::fflush(stdout);
      return 0;
    }
  }
}
