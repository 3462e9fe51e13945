// Write tracking (`lazycr dump --track`): a target whose memory changes between dumps, by
// writes and, with "churn", by the calls a write tracker must not miss. `track_target MIB
// PERMILLE [churn]` maps MIB MiB of distinct patterned pages, prints
//   ready pid=P pages=N
// and waits for signals:
//   SIGUSR2: one round: rewrites about PERMILLE per thousand of the pages with new content;
//            with churn also MADV_DONTNEEDs 16 pages (they read as zeros), swaps two 8-page
//            chunks with mremap (contents move, no write), and replaces 4 pages by a fresh
//            mapping (munmap + mmap MAP_FIXED) of which 2 are written; prints
//            "round R rewrote K";
//   SIGUSR1: checks every byte of every page against what the rounds did, prints
//            "verified ok" or "verify FAILED: why", exits 0 or 1.
// Each position's content is a function of the page identity there and the last round that
// wrote it (or zero), which the target keeps in its own (dumped) memory.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
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

constexpr uint32_t kZero = 0xffffffffu;  // the position reads as zeros

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void fill(uint64_t* w, uint64_t id, uint32_t round) {
  if (round == kZero) {
    std::memset(w, 0, 4096);
    return;
  }
  const uint64_t seed = (id << 20) ^ round;
  for (int i = 0; i < 256; i++) w[i] = splitmix(seed * 512 + static_cast<uint64_t>(i));
  std::memset(w + 256, 0, 2048);
  w[510] = id;
  w[511] = round;
}

bool chosen(uint64_t page, uint32_t round, uint64_t permille) {
  return splitmix(page ^ (static_cast<uint64_t>(round) << 40)) % 1000 < permille;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr, "usage: track_target MIB PERMILLE [churn]\n");
    return 2;
  }
  const uint64_t pages = std::strtoull(argv[1], nullptr, 10) * 256;
  const uint64_t permille = std::strtoull(argv[2], nullptr, 10);
  const bool churn = argc == 4 && std::strcmp(argv[3], "churn") == 0;
  if (pages < 1024) return 2;
  char* base = static_cast<char*>(
      mmap(nullptr, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return 3;
  // Where a chunk waits while two are swapped.
  char* spare =
      static_cast<char*>(mmap(nullptr, 8 * 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (spare == MAP_FAILED) return 3;
  auto page = [&](uint64_t p) { return reinterpret_cast<uint64_t*>(base + p * 4096); };
  std::vector<uint64_t> id(pages);
  std::vector<uint32_t> last(pages, 0);  // the round that last wrote each position, or kZero
  for (uint64_t p = 0; p < pages; p++) {
    id[p] = p;
    fill(page(p), p, 0);
  }
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
        fill(page(p), id[p], round);
        last[p] = round;
        n++;
      }
      if (churn) {
        const uint64_t third = pages / 3;
        // MADV_DONTNEED: the pages read as zeros, with no write the tracker could see.
        const uint64_t d = (round * 1543) % (third - 16);
        if (madvise(page(d), 16 * 4096, MADV_DONTNEED) != 0) return 4;
        for (uint64_t p = d; p < d + 16; p++) last[p] = kZero;
        // Two chunks swapped by mremap: contents move to other addresses without a write.
        const uint64_t x = third + (round * 769) % (third - 8);
        const uint64_t z = 2 * third + (round * 331) % (third - 8);
        if (mremap(page(x), 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, spare) ==
                MAP_FAILED ||
            mremap(page(z), 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, page(x)) ==
                MAP_FAILED ||
            mremap(spare, 8 * 4096, 8 * 4096, MREMAP_MAYMOVE | MREMAP_FIXED, page(z)) == MAP_FAILED)
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
        if (munmap(page(f), 4 * 4096) != 0 ||
            mmap(page(f), 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                 -1, 0) == MAP_FAILED)
          return 6;
        for (uint64_t p = f; p < f + 4; p++) last[p] = kZero;
        for (uint64_t p = f; p < f + 2; p++) {
          fill(page(p), id[p], round);
          last[p] = round;
        }
      }
      std::printf("round %u rewrote %llu\n", round, static_cast<unsigned long long>(n));
      std::fflush(stdout);
    }
    if (g_verify) {
      for (uint64_t p = 0; p < pages; p++) {
        fill(buf.data(), id[p], last[p]);
        if (std::memcmp(buf.data(), page(p), 4096) != 0) {
          std::printf("verify FAILED: page %llu (id %llu, round %d) differs\n",
                      static_cast<unsigned long long>(p), static_cast<unsigned long long>(id[p]),
                      static_cast<int>(last[p]));
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
