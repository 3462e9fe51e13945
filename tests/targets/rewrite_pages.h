// Pages whose content is a function of an identity and the round that last wrote them, for
// the targets of incremental dumps (incr_target, track_target): a round rewrites a known
// fraction of them, and a verification checks every byte from inside after a restore.
// Header only, no allocation in the loops; the targets wait for their signals with
// wait_round_signal():
//   SIGUSR2: one round of rewrites; SIGUSR1: verify and exit.
#pragma once

#include <signal.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

namespace rewrite_pages {

constexpr uint32_t kZero = 0xffffffffu;  // a position that reads as zeros

inline uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Half random words, half zero (compressible like a real heap), and no two pages alike.
inline void fill(uint64_t* w, uint64_t id, uint32_t round) {
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

// Whether round `round` rewrites position `page` (about `permille` per thousand of them).
inline bool chosen(uint64_t page, uint32_t round, uint64_t permille) {
  return splitmix(page ^ (static_cast<uint64_t>(round) << 40)) % 1000 < permille;
}

// One round: rewrites the chosen positions of [0, pages) with content of `round`, recording it
// in last[]; returns how many. page_at(p) is the page at position p, id_of(p) its identity.
template <typename PageAt, typename IdOf>
uint64_t rewrite_round(uint64_t pages, uint32_t round, uint64_t permille, PageAt page_at,
                       IdOf id_of, uint32_t* last) {
  uint64_t n = 0;
  for (uint64_t p = 0; p < pages; p++) {
    if (!chosen(p, round, permille)) continue;
    fill(page_at(p), id_of(p), round);
    last[p] = round;
    n++;
  }
  return n;
}

// Checks every byte of [0, pages); prints "verified ok" (unless !print_ok) or "verify FAILED:
// why", where `what` ("" or e.g. "child's ") names the memory checked. `buf` is one page of
// scratch.
template <typename PageAt, typename IdOf>
bool verify_all(uint64_t pages, PageAt page_at, IdOf id_of, const uint32_t* last, uint64_t* buf,
                const char* what, bool print_ok = true) {
  for (uint64_t p = 0; p < pages; p++) {
    fill(buf, id_of(p), last[p]);
    if (std::memcmp(buf, page_at(p), 4096) != 0) {
      std::printf("verify FAILED: %spage %llu (id %llu, round %d) differs\n", what,
                  static_cast<unsigned long long>(p), static_cast<unsigned long long>(id_of(p)),
                  static_cast<int>(last[p]));
      std::fflush(stdout);
      return false;
    }
  }
  if (print_ok) {
    std::printf("verified ok\n");
    std::fflush(stdout);
  }
  return true;
}

enum class Request { kRewrite, kVerify };

namespace detail {
inline volatile sig_atomic_t g_rewrite = 0;
inline volatile sig_atomic_t g_verify = 0;
inline void on_usr2(int) {
  g_rewrite = 1;
}
inline void on_usr1(int) {
  g_verify = 1;
}
inline sigset_t g_unblocked;
}  // namespace detail

// Installs the handlers and blocks SIGUSR1/SIGUSR2 outside wait_request(). Call once, before
// printing "ready".
inline void install_requests() {
  struct sigaction sa {};
  sa.sa_handler = detail::on_usr2;
  sigaction(SIGUSR2, &sa, nullptr);
  sa.sa_handler = detail::on_usr1;
  sigaction(SIGUSR1, &sa, nullptr);
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR1);
  sigaddset(&block, SIGUSR2);
  sigprocmask(SIG_BLOCK, &block, &detail::g_unblocked);
  // Blocked already in a program that executed itself with them blocked.
  sigdelset(&detail::g_unblocked, SIGUSR1);
  sigdelset(&detail::g_unblocked, SIGUSR2);
}

// The next request (a verification first when both are pending).
inline Request wait_request() {
  while (!detail::g_rewrite && !detail::g_verify) sigsuspend(&detail::g_unblocked);
  if (detail::g_verify) return Request::kVerify;
  detail::g_rewrite = 0;
  return Request::kRewrite;
}

}  // namespace rewrite_pages
