// What the process-tree targets (prefork_target, tree_target) share: page and byte patterns
// that verification recomputes, reads with a deadline (a peer that never writes must give a
// verdict, not a hang), one-line verdicts written with a single write(2) (every task of a
// tree shares one stdout, and stdio buffers would be duplicated by fork), the wait for the
// verify request, and becoming a session leader.
#pragma once

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace tree {

inline uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr size_t kPage = 4096;

// Page n of pattern `seed`: 1 KiB of pseudo-random words, zeros (so the image compresses like
// real memory), and (seed, n) in the last 16 bytes: no two pages of any pattern are alike, so
// a page from the wrong task or the wrong place never passes for the right one.
inline void fill_page(unsigned char* page, uint64_t seed, uint64_t n) {
  auto* w = reinterpret_cast<uint64_t*>(page);
  uint64_t base = splitmix(seed * 0x100000001b3ull + 0x51ed) ^ (n * 512);
  for (int i = 0; i < 128; i++) w[i] = splitmix(base + i);
  std::memset(page + 1024, 0, kPage - 1024 - 16);
  w[510] = seed;
  w[511] = n;
}

// Offset of the first byte of `page` that differs from page n of `seed`, or -1.
inline long page_mismatch(const unsigned char* page, uint64_t seed, uint64_t n) {
  static unsigned char expect[kPage];
  fill_page(expect, seed, n);
  if (std::memcmp(expect, page, kPage) == 0) return -1;
  for (size_t i = 0; i < kPage; i++)
    if (expect[i] != page[i]) return static_cast<long>(i);
  return -1;
}

// Bytes [offset, offset + n) of the byte stream `seed` (what a task writes into a channel).
inline void fill_bytes(unsigned char* out, size_t n, uint64_t seed, uint64_t offset) {
  for (size_t i = 0; i < n; i++) {
    uint64_t k = offset + i;
    out[i] = static_cast<unsigned char>(splitmix(seed * 0x9e3779b1ull + k / 8) >> (8 * (k % 8)));
  }
}

inline uint64_t now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

inline void sleep_ms(long ms) {
  timespec ts = {ms / 1000, (ms % 1000) * 1000000};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

// The first thing that went wrong in a task; later failures are not recorded (they usually
// follow from the first).
struct Verdict {
  std::string why;
  void fail(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
    if (!why.empty()) return;
    char buf[400];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    why = buf;
  }
  bool ok() const { return why.empty(); }
};

// One line on stdout in one write(2): lines of different tasks never interleave (< PIPE_BUF).
inline void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > static_cast<int>(sizeof buf) - 2) n = sizeof buf - 2;
  buf[n++] = '\n';
  ssize_t w;
  do {
    w = write(1, buf, n);
  } while (w < 0 && errno == EINTR);
}

// "VERIFY <role> pid=P ok" or "VERIFY <role> pid=P FAILED: <why>".
inline void report(const std::string& role, const Verdict& v) {
  if (v.ok())
    say("VERIFY %s pid=%d ok", role.c_str(), getpid());
  else
    say("VERIFY %s pid=%d FAILED: %s", role.c_str(), getpid(), v.why.c_str());
}

// Waits until `path` exists (the verify request). Gives up after max_wait_s: a tree left
// behind by a failed test ends by itself (this machine's PID 1 does not reap, but a test's
// subreaper does). Returns false on timeout.
inline bool wait_for_file(const std::string& path, long max_wait_s) {
  uint64_t deadline = now_ms() + static_cast<uint64_t>(max_wait_s) * 1000;
  struct stat st;
  while (stat(path.c_str(), &st) != 0) {
    if (now_ms() > deadline) return false;
    sleep_ms(2);
  }
  return true;
}

// Waits until fd is readable (or hung up) for at most timeout_ms. False on timeout.
inline bool wait_readable(int fd, uint64_t deadline_ms) {
  for (;;) {
    uint64_t now = now_ms();
    if (now >= deadline_ms) return false;
    pollfd p{fd, POLLIN, 0};
    int r = poll(&p, 1, static_cast<int>(deadline_ms - now));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return true;  // let the read report the error
  }
}

// Reads exactly n bytes. Returns n, or what it got before EOF, or -1 (errno set; ETIMEDOUT
// when the deadline passed).
inline ssize_t read_exact(int fd, void* buf, size_t n, uint64_t deadline_ms) {
  size_t got = 0;
  while (got < n) {
    if (!wait_readable(fd, deadline_ms)) {
      errno = ETIMEDOUT;
      return -1;
    }
    ssize_t r = read(fd, static_cast<char*>(buf) + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(got);
}

// One datagram (or -1 with errno; ETIMEDOUT after the deadline).
inline ssize_t recv_one(int fd, void* buf, size_t n, uint64_t deadline_ms) {
  for (;;) {
    if (!wait_readable(fd, deadline_ms)) {
      errno = ETIMEDOUT;
      return -1;
    }
    ssize_t r = recv(fd, buf, n, MSG_DONTWAIT | MSG_TRUNC);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    return r;
  }
}

inline bool write_all(int fd, const void* buf, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, static_cast<const char*>(buf) + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    done += static_cast<size_t>(w);
  }
  return true;
}

// Makes this process a session leader. A process group leader (the test harness starts each
// target in its own group) cannot call setsid(): then it forks, the parent leaves at once and
// the child carries on as the session leader (the caller learns its pid from the ready line).
inline void become_session_leader() {
  if (setsid() >= 0) return;
  if (errno != EPERM) {
    std::perror("setsid");
    std::exit(3);
  }
  pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    std::exit(3);
  }
  if (child > 0) _exit(0);
  if (setsid() < 0) {
    std::perror("setsid");
    std::exit(3);
  }
}

// Children die with their parent before the verify request: a failed test leaves no orphan
// polling for its verify file. (Whether a restore keeps this setting does not matter.)
inline void die_with_parent(pid_t parent) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(3);
}

// Exit code or 128 + signal from a wait status.
inline int decode(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Options both tree targets take. parse() handles one of them at argv[i] (moving i past its
// value) and returns false for an option it does not know.
struct CommonOptions {
  std::string verify_file, workdir = "/tmp", flip;
  bool setsid = false, selftest = false;
  long max_wait_s = 900;

  bool parse(int argc, char** argv, int& i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--verify-file")
      verify_file = next();
    else if (a == "--workdir")
      workdir = next();
    else if (a == "--flip")
      flip = next();
    else if (a == "--max-wait")
      max_wait_s = std::atol(next().c_str());
    else if (a == "--setsid")
      setsid = true;
    else if (a == "--selftest")
      selftest = true;
    else
      return false;
    return true;
  }
};

}  // namespace tree
