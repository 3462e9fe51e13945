// Incremental dumps (`lazycr dump --parent`): a target whose memory changes by a known fraction
// between dumps. `incr_target MIB PERMILLE` maps MIB MiB of distinct patterned pages, prints
//   ready pid=P pages=N
// and waits for signals:
//   SIGUSR2: rewrites round r's pages (about PERMILLE per thousand of them, chosen by a hash of
//            page number and round) with new content, prints "round R rewrote K", waits again;
//   SIGUSR1: checks every byte of every page against the rounds done so far, prints
//            "verified ok" or "verify FAILED: why", exits 0 or 1.
// A page's content is a function of its number and the last round that rewrote it, which the
// target keeps in its own (dumped) memory (rewrite_pages.h). With INCR_TARGET_THP=1 in its
// environment the memory is madvise(MADV_HUGEPAGE)d first (bench/live_dump_bench.py --thp: on a
// machine whose THP mode is "madvise", the pages then come as 2 MiB folios).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "rewrite_pages.h"

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
  if (const char* thp = std::getenv("INCR_TARGET_THP"); thp != nullptr && thp[0] == '1')
    if (madvise(mem, pages * 4096, MADV_HUGEPAGE) != 0) return 4;
  auto page_at = [&](uint64_t p) { return mem + p * 512; };
  auto id_of = [](uint64_t p) { return p; };
  std::vector<uint32_t> last(pages, 0);  // the round that last wrote each page
  for (uint64_t p = 0; p < pages; p++) rewrite_pages::fill(page_at(p), p, 0);
  rewrite_pages::install_requests();
  std::printf("ready pid=%d pages=%llu\n", getpid(), static_cast<unsigned long long>(pages));
  std::fflush(stdout);
  uint32_t round = 0;
  std::vector<uint64_t> buf(512);
  for (;;) {
    if (rewrite_pages::wait_request() == rewrite_pages::Request::kVerify)
      return rewrite_pages::verify_all(pages, page_at, id_of, last.data(), buf.data(), "") ? 0 : 1;
    round++;
    uint64_t n = rewrite_pages::rewrite_round(pages, round, permille, page_at, id_of, last.data());
    std::printf("round %u rewrote %llu\n", round, static_cast<unsigned long long>(n));
    std::fflush(stdout);
  }
}
