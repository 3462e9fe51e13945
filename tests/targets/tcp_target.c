// Established TCP connections a restore must give back (objects/tcp_connection.h), verified
// from inside.
//   tcp_target pair 4|6|ds: a listener on loopback (port 0; "ds": [::] dual-stack, the client
//     IPv4, so that the accepted end is IPv6 with v4-mapped addresses) kept open, a client
//     connected to it and the accepted end. The client (small SO_SNDBUF, TCP_NODELAY) writes a
//     pattern until the kernel takes no more: bytes unread at the accepted end, unsent at the
//     client; the accepted end (keepalive set) writes 1000 bytes the client leaves unread.
//     Prints "ready pid=P port=L sent=W". On SIGUSR1 it checks the options, reads both ways
//     and checks every byte, exchanges "ping"/"pong", prints "verified ok" (or "verify FAILED:
//     why" and exits 1) and exits 0.
//   tcp_target pair 4-rd | 4-wr: the same, the accepted end then shut down for reading, or the
//     client for writing (FIN_WAIT2 / CLOSE_WAIT), for refusals only.
//   tcp_target pair 4-oob | 4-uto: the same, the accepted end then sends an urgent byte
//     (MSG_OOB) the client leaves unread, or the client sets TCP_USER_TIMEOUT: refusals only.
//   tcp_target peer PORT: connects to 127.0.0.1:PORT (a peer outside the tree) and writes a
//     pattern until the kernel takes no more (the peer does not read yet); prints "ready pid=P
//     sent=W". On SIGUSR1 it reads the line the peer sent meanwhile ("question\n"), answers
//     "answer\n", then echoes each line it reads prefixed with "echo " until EOF; exits 0.
//   tcp_target pending 4|6 [send]: a listener on loopback (port 0, non-blocking) and two clients
//     connected to it, not accepted (objects/tcp_pending.h); "send": the first client has
//     written 5 bytes (for refusals). Prints "ready pid=P port=L". On SIGUSR1 it accepts two
//     connections (waiting at most 10 s for each), checks that their peers are the two clients'
//     addresses, exchanges a line each way on each, checks that nothing else is queued, prints
//     "verified ok" and exits 0.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sock_util.h"

static void verify_failed(const char* what, long a, long b) {
  printf("verify FAILED: %s (%ld, %ld)\n", what, a, b);
  fflush(stdout);
  exit(1);
}

static char pattern(long i) {
  return (char)('a' + (i * 7 + i / 251) % 26);
}

static void set_blocking(int fd, int blocking) {
  int fl = fcntl(fd, F_GETFL);
  if (fcntl(fd, F_SETFL, blocking ? fl & ~O_NONBLOCK : fl | O_NONBLOCK) != 0) die("F_SETFL");
}

// Writes the pattern without blocking until the kernel takes no more; returns the count.
static long fill(int fd) {
  char buf[1024];
  long sent = 0;
  int tries = 0;
  set_blocking(fd, 0);
  for (;;) {
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = pattern(sent + (long)i);
    ssize_t n = write(fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      // Loopback delivers at once; until the receiver's window closes, room comes back.
      if (++tries == 5) break;
      usleep(20000);
      continue;
    }
    if (n < 0) die("write");
    sent += n;
  }
  set_blocking(fd, 1);
  return sent;
}

static void read_pattern(int fd, long count) {
  char buf[4096];
  long got = 0;
  while (got < count) {
    size_t want = (size_t)(count - got) < sizeof buf ? (size_t)(count - got) : sizeof buf;
    ssize_t n = read(fd, buf, want);
    if (n <= 0) verify_failed("the pattern ended early (bytes read, expected)", got, count);
    for (ssize_t i = 0; i < n; i++)
      if (buf[i] != pattern(got + i)) verify_failed("pattern byte differs at", got + i, buf[i]);
    got += n;
  }
}

static void read_exact(int fd, const char* want) {
  size_t len = strlen(want);
  char buf[256] = "";
  size_t got = 0;
  while (got < len) {
    ssize_t n = read(fd, buf + got, len - got);
    if (n <= 0) verify_failed("short read of a message (bytes, errno)", (long)got, errno);
    got += (size_t)n;
  }
  if (memcmp(buf, want, len) != 0)
    verify_failed("a message differs (length, first byte)", (long)len, buf[0]);
}

static void write_all(int fd, const char* data, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, data, len);
    if (n <= 0) die("write");
    data += n;
    len -= (size_t)n;
  }
}

static int pair(const char* mode) {
  int v6 = mode[0] != '4';
  int ds = strncmp(mode, "ds", 2) == 0;
  const char* shut = strchr(mode, '-');  // "-rd": accepted end SHUT_RD; "-wr": client SHUT_WR
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t len;
  int lfd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0) die("socket");
  if (v6) {
    struct sockaddr_in6* a = (struct sockaddr_in6*)&ss;
    a->sin6_family = AF_INET6;
    if (!ds) a->sin6_addr = in6addr_loopback;
    setopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, ds ? 0 : 1);
    len = sizeof *a;
  } else {
    struct sockaddr_in* a = (struct sockaddr_in*)&ss;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof *a;
  }
  setopt(lfd, SOL_SOCKET, SO_RCVBUF, 8192);  // inherited by the accepted end
  if (bind(lfd, (struct sockaddr*)&ss, len) != 0) die("bind");
  if (listen(lfd, 8) != 0) die("listen");
  if (getsockname(lfd, (struct sockaddr*)&ss, &len) != 0) die("getsockname");
  int port =
      ntohs(v6 ? ((struct sockaddr_in6*)&ss)->sin6_port : ((struct sockaddr_in*)&ss)->sin_port);
  int cfd = socket(v6 && !ds ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (cfd < 0) die("socket");
  setopt(cfd, SOL_SOCKET, SO_SNDBUF, 16384);
  setopt(cfd, IPPROTO_TCP, TCP_NODELAY, 1);
  setopt(cfd, SOL_SOCKET, SO_REUSEADDR, 1);
  struct sockaddr_storage to;
  memset(&to, 0, sizeof to);
  socklen_t tolen;
  if (v6 && !ds) {
    struct sockaddr_in6* a = (struct sockaddr_in6*)&to;
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_loopback;
    a->sin6_port = htons((uint16_t)port);
    tolen = sizeof *a;
  } else {
    struct sockaddr_in* a = (struct sockaddr_in*)&to;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = htons((uint16_t)port);
    tolen = sizeof *a;
  }
  if (connect(cfd, (struct sockaddr*)&to, tolen) != 0) die("connect");
  int sfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  if (sfd < 0) die("accept");
  setopt(sfd, SOL_SOCKET, SO_KEEPALIVE, 1);
  setopt(sfd, IPPROTO_TCP, TCP_KEEPIDLE, 77);
  setopt(sfd, IPPROTO_TCP, TCP_KEEPINTVL, 11);
  setopt(sfd, IPPROTO_TCP, TCP_KEEPCNT, 5);
  long sent = fill(cfd);
  char reply[1000];
  for (long i = 0; i < (long)sizeof reply; i++) reply[i] = pattern(i);
  write_all(sfd, reply, sizeof reply);
  if (shut && strcmp(shut, "-rd") == 0 && shutdown(sfd, SHUT_RD) != 0) die("shutdown");
  if (shut && strcmp(shut, "-wr") == 0 && shutdown(cfd, SHUT_WR) != 0) die("shutdown");
  if (shut && strcmp(shut, "-oob") == 0 && send(sfd, "!", 1, MSG_OOB) != 1) die("send MSG_OOB");
  if (shut && strcmp(shut, "-uto") == 0) setopt(cfd, IPPROTO_TCP, TCP_USER_TIMEOUT, 12345);
  printf("ready pid=%d port=%d sent=%ld\n", getpid(), port, sent);
  fflush(stdout);

  wait_for_usr1();
  if (opt(cfd, IPPROTO_TCP, TCP_NODELAY) != 1) verify_failed("TCP_NODELAY lost", 0, 0);
  if (opt(sfd, SOL_SOCKET, SO_KEEPALIVE) != 1) verify_failed("SO_KEEPALIVE lost", 0, 0);
  if (opt(cfd, SOL_SOCKET, SO_REUSEADDR) != 1 || opt(sfd, SOL_SOCKET, SO_REUSEADDR) != 0)
    verify_failed("SO_REUSEADDR of the client, accepted end", opt(cfd, SOL_SOCKET, SO_REUSEADDR),
                  opt(sfd, SOL_SOCKET, SO_REUSEADDR));
  if (opt(sfd, IPPROTO_TCP, TCP_KEEPIDLE) != 77 || opt(sfd, IPPROTO_TCP, TCP_KEEPINTVL) != 11 ||
      opt(sfd, IPPROTO_TCP, TCP_KEEPCNT) != 5)
    verify_failed("keepalive settings lost (idle, intvl)", opt(sfd, IPPROTO_TCP, TCP_KEEPIDLE),
                  opt(sfd, IPPROTO_TCP, TCP_KEEPINTVL));
  struct sockaddr_storage peer;
  socklen_t plen = sizeof peer;
  if (getpeername(sfd, (struct sockaddr*)&peer, &plen) != 0)
    verify_failed("getpeername of the accepted end (errno)", errno, 0);
  if (peer.ss_family != (v6 ? AF_INET6 : AF_INET))
    verify_failed("the accepted end's family", peer.ss_family, 0);
  read_pattern(sfd, sent);
  read_pattern(cfd, (long)sizeof reply);
  write_all(cfd, "ping", 4);
  read_exact(sfd, "ping");
  write_all(sfd, "pong", 4);
  read_exact(cfd, "pong");
  // The listener still accepts.
  int c2 = socket(v6 && !ds ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(c2, (struct sockaddr*)&to, tolen) != 0)
    verify_failed("connect again (errno)", errno, 0);
  int s2 = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  if (s2 < 0) verify_failed("accept again (errno)", errno, 0);
  printf("verified ok\n");
  fflush(stdout);
  return 0;
}

static int peer(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  setopt(fd, SOL_SOCKET, SO_SNDBUF, 16384);
  setopt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons((uint16_t)port);
  if (connect(fd, (struct sockaddr*)&a, sizeof a) != 0) die("connect");
  long sent = fill(fd);
  printf("ready pid=%d sent=%ld\n", getpid(), sent);
  fflush(stdout);
  wait_for_usr1();
  if (opt(fd, SOL_SOCKET, SO_REUSEADDR) != 1)
    verify_failed("SO_REUSEADDR lost", opt(fd, SOL_SOCKET, SO_REUSEADDR), 0);
  read_exact(fd, "question\n");
  write_all(fd, "answer\n", 7);
  char line[256];
  size_t used = 0;
  for (;;) {
    ssize_t n = read(fd, line + used, sizeof line - used - 1);
    if (n == 0) break;
    if (n < 0) verify_failed("read (errno)", errno, 0);
    used += (size_t)n;
    char* nl;
    while ((nl = memchr(line, '\n', used)) != NULL) {
      size_t l = (size_t)(nl - line) + 1;
      write_all(fd, "echo ", 5);
      write_all(fd, line, l);
      memmove(line, line + l, used - l);
      used -= l;
    }
  }
  return 0;
}

static socklen_t loopback_addr(int v6, int port, struct sockaddr_storage* ss) {
  return v6 ? make_inet_addr(ss, AF_INET6, "::1", port)
            : make_inet_addr(ss, AF_INET, "127.0.0.1", port);
}

static int same_addr(const struct sockaddr_storage* a, const struct sockaddr_storage* b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET)
    return memcmp(&((struct sockaddr_in*)a)->sin_addr, &((struct sockaddr_in*)b)->sin_addr, 4) ==
               0 &&
           ((struct sockaddr_in*)a)->sin_port == ((struct sockaddr_in*)b)->sin_port;
  return memcmp(&((struct sockaddr_in6*)a)->sin6_addr, &((struct sockaddr_in6*)b)->sin6_addr, 16) ==
             0 &&
         ((struct sockaddr_in6*)a)->sin6_port == ((struct sockaddr_in6*)b)->sin6_port;
}

static int pending(const char* mode, int send_first) {
  int v6 = mode[0] == '6';
  struct sockaddr_storage ss;
  socklen_t len;
  len = loopback_addr(v6, 0, &ss);
  int lfd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (lfd < 0) die("socket");
  if (bind(lfd, (struct sockaddr*)&ss, len) != 0) die("bind");
  if (listen(lfd, 4) != 0) die("listen");
  if (getsockname(lfd, (struct sockaddr*)&ss, &len) != 0) die("getsockname");
  int port =
      ntohs(v6 ? ((struct sockaddr_in6*)&ss)->sin6_port : ((struct sockaddr_in*)&ss)->sin_port);
  int cfd[2];
  struct sockaddr_storage caddr[2];
  for (int i = 0; i < 2; i++) {
    cfd[i] = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (cfd[i] < 0) die("socket");
    len = loopback_addr(v6, port, &ss);
    if (connect(cfd[i], (struct sockaddr*)&ss, len) != 0) die("connect");
    socklen_t clen = sizeof caddr[i];
    if (getsockname(cfd[i], (struct sockaddr*)&caddr[i], &clen) != 0) die("getsockname");
  }
  if (send_first) write_all(cfd[0], "early", 5);
  printf("ready pid=%d port=%d\n", getpid(), port);
  fflush(stdout);

  wait_for_usr1();
  int seen[2] = {0, 0};
  for (int k = 0; k < 2; k++) {
    struct pollfd p = {lfd, POLLIN, 0};
    if (poll(&p, 1, 10000) != 1) verify_failed("no queued connection to accept (accepted)", k, 0);
    struct sockaddr_storage from;
    socklen_t flen = sizeof from;
    int s = accept4(lfd, (struct sockaddr*)&from, &flen, SOCK_CLOEXEC);
    if (s < 0) verify_failed("accept (errno, accepted)", errno, k);
    int i = same_addr(&from, &caddr[0]) ? 0 : same_addr(&from, &caddr[1]) ? 1 : -1;
    if (i < 0 || seen[i])
      verify_failed("an accepted connection from an unknown client (k, i)", k, i);
    seen[i] = 1;
    char line[32];
    int n = snprintf(line, sizeof line, "hello %d\n", i);
    write_all(cfd[i], line, (size_t)n);
    read_exact(s, line);
    n = snprintf(line, sizeof line, "welcome %d\n", i);
    write_all(s, line, (size_t)n);
    read_exact(cfd[i], line);
  }
  if (accept4(lfd, NULL, NULL, SOCK_CLOEXEC) >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
    verify_failed("a third connection was queued (errno)", errno, 0);
  printf("verified ok\n");
  fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGUSR1, on_usr1);
  if (argc == 3 && strcmp(argv[1], "pair") == 0) return pair(argv[2]);
  if (argc == 3 && strcmp(argv[1], "peer") == 0) return peer(atoi(argv[2]));
  if (argc >= 3 && strcmp(argv[1], "pending") == 0)
    return pending(argv[2], argc == 4 && strcmp(argv[3], "send") == 0);
  fprintf(stderr, "usage: tcp_target pair 4|6|ds | peer PORT\n");
  return 2;
}
