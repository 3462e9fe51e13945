// An epoll set a restore must give back, with registrations of every kind on pipes and
// socket pairs, each with its own 64-bit data:
//   level EPOLLIN, EPOLLIN|EPOLLET (its edge already taken), EPOLLIN|EPOLLONESHOT armed,
//   EPOLLIN|EPOLLONESHOT fired (disarmed, its pipe empty again), EPOLLOUT|EPOLLONESHOT fired
//   on a writable socket, EPOLLIN|EPOLLEXCLUSIVE, and a nested epoll (itself watching a pipe).
// The set is also dup'ed (fd `dup`, without close-on-exec) and held by a forked child (one
// description in two processes).
// It prints "ready pid=P child=C" and, on SIGUSR1, checks from inside: nothing is ready; after
// a write to every target, epoll_wait reports exactly the expected data and events (edge vs
// level, oneshot fired once then silent, the disarmed ones silent until EPOLL_CTL_MOD); DEL
// and ADD again of every target succeed (the keys survived); the dup and the child's hold the
// same description. Prints "verified ok" or "verify FAILED: why" and exits 0 or 1.
// --stale closed|reused: also registers a dup of a pipe end and closes it (the kernel keeps
// the registration), then with "reused" opens /dev/null at that number: a dump must refuse.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t g_verify;
static void on_usr1(int sig) {
  (void)sig;
  g_verify = 1;
}

enum { LEVEL, EDGE, ONESHOT_ARMED, ONESHOT_FIRED, OUT_FIRED, EXCL, NESTED, NTARGETS };
static const uint64_t kData[NTARGETS] = {
    0xa1a1a1a1a1a1a1a1ull, 0xb2b2b2b2000000b2ull, 0xc3c3c3c3c3c3c3c3ull, 0xd4d4d4d4d4d4d4d4ull,
    0x00000000000000e5ull, 0xf6f6f6f6f6f6f6f6ull, 0x0e0e0e0e0e0e0e0eull};
static const uint64_t kInnerData = 0x1111222233334444ull;
static const uint64_t kStaleData = 0x5555;
static int stale_fd = -1;

static int ep, inner, epdup;
static int rd[NTARGETS], wr[NTARGETS];  // the watched end and where to write to make it ready
static uint32_t mask[NTARGETS];
static int inner_rd, inner_wr;
static char why[512];

static int failed(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static int failed(const char* fmt, ...) {
  if (why[0]) return 1;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  return 1;
}

static void die(const char* what) {
  printf("setup failed: %s: %s\n", what, strerror(errno));
  exit(2);
}

static void add(int efd, int fd, uint32_t events, uint64_t data) {
  struct epoll_event ev = {.events = events, .data.u64 = data};
  if (epoll_ctl(efd, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl ADD");
}

static void put_byte(int fd) {
  if (write(fd, "x", 1) != 1) die("write");
}

static void take_byte(int fd) {
  char c;
  if (read(fd, &c, 1) != 1) die("read");
}

// The ready set of `efd` now, as a bitmask over kData (bit 31: something unknown).
static unsigned ready(int efd, uint32_t* events_of) {
  struct epoll_event out[16];
  int n = epoll_wait(efd, out, 16, 0);
  unsigned got = 0;
  for (int i = 0; i < n; i++) {
    int k;
    for (k = 0; k < NTARGETS && kData[k] != out[i].data.u64; k++) {
    }
    if (out[i].data.u64 == kStaleData) continue;  // --stale: not ours to check
    if (k == NTARGETS) {
      got |= 1u << 31;
      continue;
    }
    got |= 1u << k;
    if (events_of) events_of[k] = out[i].events;
  }
  return n < 0 ? ~0u : got;
}

static void setup(const char* stale) {
  int p[2], s[2];
  ep = epoll_create1(EPOLL_CLOEXEC);
  inner = epoll_create1(0);
  if (ep < 0 || inner < 0) die("epoll_create1");
  for (int k = 0; k < NTARGETS; k++) {
    if (k == NESTED) continue;
    if (k == OUT_FIRED || k == EXCL) {
      if (socketpair(AF_UNIX, SOCK_STREAM, 0, s) != 0) die("socketpair");
      rd[k] = s[0];
      wr[k] = s[1];
    } else {
      if (pipe(p) != 0) die("pipe");
      rd[k] = p[0];
      wr[k] = p[1];
    }
  }
  if (pipe(p) != 0) die("pipe");
  inner_rd = p[0];
  inner_wr = p[1];
  add(inner, inner_rd, EPOLLIN, kInnerData);
  rd[NESTED] = inner;
  wr[NESTED] = inner_wr;

  mask[LEVEL] = EPOLLIN;
  mask[EDGE] = EPOLLIN | EPOLLET;
  mask[ONESHOT_ARMED] = EPOLLIN | EPOLLONESHOT;
  mask[ONESHOT_FIRED] = EPOLLIN | EPOLLONESHOT;
  mask[OUT_FIRED] = EPOLLOUT | EPOLLONESHOT;
  mask[EXCL] = EPOLLIN | EPOLLEXCLUSIVE;
  mask[NESTED] = EPOLLIN;
  // The ones whose state comes from a fired event first, alone in the set.
  add(ep, rd[EDGE], mask[EDGE], kData[EDGE]);
  add(ep, rd[ONESHOT_FIRED], mask[ONESHOT_FIRED], kData[ONESHOT_FIRED]);
  add(ep, rd[OUT_FIRED], mask[OUT_FIRED], kData[OUT_FIRED]);
  put_byte(wr[EDGE]);
  put_byte(wr[ONESHOT_FIRED]);
  unsigned want = 1u << EDGE | 1u << ONESHOT_FIRED | 1u << OUT_FIRED;
  if (ready(ep, NULL) != want) die("firing the edge and oneshot registrations");
  take_byte(rd[EDGE]);
  take_byte(rd[ONESHOT_FIRED]);
  add(ep, rd[LEVEL], mask[LEVEL], kData[LEVEL]);
  add(ep, rd[ONESHOT_ARMED], mask[ONESHOT_ARMED], kData[ONESHOT_ARMED]);
  add(ep, rd[EXCL], mask[EXCL], kData[EXCL]);
  add(ep, inner, mask[NESTED], kData[NESTED]);
  epdup = dup(ep);
  if (epdup < 0) die("dup");

  if (stale) {
    stale_fd = dup(wr[LEVEL]);
    if (stale_fd < 0) die("dup");
    add(ep, stale_fd, EPOLLOUT, kStaleData);
    close(stale_fd);
    if (strcmp(stale, "reused") == 0 && open("/dev/null", O_RDONLY) != stale_fd) die("reuse");
  }
}

static int kcmp_file(pid_t a, pid_t b, int fa, int fb) {
  return (int)syscall(SYS_kcmp, a, b, KCMP_FILE, fa, fb);
}

static int verify(pid_t child) {
  uint32_t ev[NTARGETS] = {0};
  unsigned got = ready(ep, ev);
  if (got != 0) return failed("ready before any write: 0x%x", got);
  for (int k = 0; k < NTARGETS; k++)
    if (k != OUT_FIRED) put_byte(wr[k]);
  unsigned want = 1u << LEVEL | 1u << EDGE | 1u << ONESHOT_ARMED | 1u << EXCL | 1u << NESTED;
  got = ready(ep, ev);
  if (got != want) return failed("after a write to each: ready 0x%x, want 0x%x", got, want);
  for (int k = 0; k < NTARGETS; k++)
    if ((want & 1u << k) && ev[k] != EPOLLIN)
      return failed("target %d reported events 0x%x, want EPOLLIN", k, ev[k]);
  // Level ones stay ready; the edge was taken; the armed oneshot fired once.
  want = 1u << LEVEL | 1u << EXCL | 1u << NESTED;
  got = ready(ep, NULL);
  if (got != want) return failed("second wait: ready 0x%x, want 0x%x", got, want);
  put_byte(wr[EDGE]);
  want |= 1u << EDGE;
  got = ready(ep, NULL);
  if (got != want)
    return failed("after a second write to the edge one: 0x%x, want 0x%x", got, want);
  // The nested instance itself reports its own pipe with its data.
  struct epoll_event out[4];
  int n = epoll_wait(inner, out, 4, 0);
  if (n != 1 || out[0].data.u64 != kInnerData || out[0].events != EPOLLIN)
    return failed("nested epoll: %d events, data 0x%llx", n,
                  n > 0 ? (unsigned long long)out[0].data.u64 : 0ull);
  // The disarmed ones fire again once re-armed, and only then.
  for (int k = ONESHOT_FIRED; k <= OUT_FIRED; k++) {
    struct epoll_event e = {.events = mask[k], .data.u64 = kData[k]};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, rd[k], &e) != 0)
      return failed("EPOLL_CTL_MOD of target %d: %s", k, strerror(errno));
    want |= 1u << k;
  }
  want &= ~(1u << EDGE);
  got = ready(ep, ev);
  if (got != want) return failed("after re-arming: ready 0x%x, want 0x%x", got, want);
  if (ev[OUT_FIRED] != EPOLLOUT) return failed("re-armed EPOLLOUT reported 0x%x", ev[OUT_FIRED]);
  // Every key survived: DEL (through the dup: one instance) and ADD again.
  for (int k = 0; k < NTARGETS; k++) {
    if (epoll_ctl(epdup, EPOLL_CTL_DEL, rd[k], NULL) != 0)
      return failed("EPOLL_CTL_DEL of target %d (fd %d): %s", k, rd[k], strerror(errno));
    struct epoll_event e = {.events = mask[k], .data.u64 = kData[k]};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, rd[k], &e) != 0)
      return failed("EPOLL_CTL_ADD again of target %d: %s", k, strerror(errno));
  }
  if (epoll_ctl(ep, EPOLL_CTL_DEL, 1000, NULL) == 0) return failed("DEL of fd 1000 succeeded");
  if (fcntl(ep, F_GETFD) != FD_CLOEXEC || fcntl(epdup, F_GETFD) != 0)
    return failed("close-on-exec: ep %d, dup %d", fcntl(ep, F_GETFD), fcntl(epdup, F_GETFD));
  if (kcmp_file(getpid(), getpid(), ep, epdup) != 0) return failed("the dup is another epoll");
  if (kcmp_file(getpid(), child, ep, ep) != 0) return failed("the child holds another epoll");
  return 0;
}

int main(int argc, char** argv) {
  const char* stale = argc > 2 && strcmp(argv[1], "--stale") == 0 ? argv[2] : NULL;
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, NULL);
  setup(stale);
  pid_t child = fork();
  if (child < 0) die("fork");
  struct timespec tick = {0, 1000000};
  if (child == 0) {
    for (;;) nanosleep(&tick, NULL);  // killed by the parent; holds the epoll meanwhile
  }
  printf("ready pid=%d child=%d ep=%d stale=%d\n", (int)getpid(), (int)child, ep, stale_fd);
  while (!g_verify) nanosleep(&tick, NULL);
  int bad = verify(child);
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);
  if (bad)
    printf("verify FAILED: %s\n", why);
  else
    printf("verified ok\n");
  return bad;
}
