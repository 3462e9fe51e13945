// AF_UNIX sockets a restore must give back (objects/unix_socket.h), verified from inside.
//   unix_target listen DIR: a stream listener bound to DIR/unixsk-listen.sock (backlog 7,
//     SO_PASSCRED, a set SO_RCVBUF, non-blocking) and a seqpacket listener bound to the abstract
//     name "unixsk-<pid>" (backlog 5, close-on-exec off), each with connections not accepted
//     yet whose client ends it holds (two and one); a datagram socket bound to
//     DIR/unixsk-dgram.sock with three datagrams queued from an unnamed sender that then closed;
//     prints "ready pid=P". On SIGUSR1 it checks names, options, descriptor flags, the socket
//     file's mode, and that every pending connection is accepted in order and carries data both
//     ways, then reads the datagrams (bytes, order, unnamed sender); prints "verified ok" (or
//     "verify FAILED: why" and exits 1), then accepts one more connection on the path
//     listener, echoes the line it reads, and exits 0.
//   unix_target ext PATH: a datagram socket connected to PATH (a bound socket outside the tree);
//     prints "ready pid=P"; on SIGUSR1 it sends "ext-after" through it, prints "verified ok" if
//     the send works and the peer name is PATH, and exits 0.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "sock_util.h"

static socklen_t make_addr(struct sockaddr_un* a, const char* name, int abstract) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  size_t n = strlen(name);
  if (abstract) {
    memcpy(a->sun_path + 1, name, n);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
  }
  memcpy(a->sun_path, name, n);
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

static int client_of(int type, const struct sockaddr_un* a, socklen_t len) {
  int c = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
  if (c < 0) die("socket (client)");
  if (connect(c, (const struct sockaddr*)a, len) != 0) die("connect (client)");
  return c;
}

// The name a socket is bound to, compared with what it was given.
static void check_name(int fd, const struct sockaddr_un* want, socklen_t want_len,
                       const char* what) {
  struct sockaddr_un got;
  socklen_t len = sizeof got;
  if (getsockname(fd, (struct sockaddr*)&got, &len) != 0) {
    BAD("%s: getsockname: %s", what, strerror(errno));
    return;
  }
  // A path comes back with its NUL; compare the bytes up to the shorter length.
  socklen_t n = len < want_len ? len : want_len;
  if (n <= offsetof(struct sockaddr_un, sun_path) || memcmp(&got, want, n) != 0)
    BAD("%s: bound to another name (length %u vs %u)", what, (unsigned)len, (unsigned)want_len);
}

// Accepts the next pending connection on `l` and checks it reaches client `c` both ways.
static void check_pending(int l, int c, const char* what, int index) {
  int fl = fcntl(l, F_GETFL);
  fcntl(l, F_SETFL, fl | O_NONBLOCK);
  int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
  fcntl(l, F_SETFL, fl);
  if (s < 0) {
    BAD("%s: pending connection %d: accept: %s", what, index, strerror(errno));
    return;
  }
  char msg[32], buf[32];
  int n = snprintf(msg, sizeof msg, "%s-%d", what, index);
  if (write(c, msg, (size_t)n) != n || read(s, buf, sizeof buf) != n || memcmp(buf, msg, (size_t)n))
    BAD("%s: pending connection %d: client -> server lost (accept order?)", what, index);
  else if (write(s, "pong", 4) != 4 || read(c, buf, sizeof buf) != 4 || memcmp(buf, "pong", 4))
    BAD("%s: pending connection %d: server -> client lost", what, index);
  close(s);
}

static int listen_main(const char* dir) {
  char path[108], dgpath[108], abs_name[64];
  snprintf(path, sizeof path, "%s/unixsk-listen.sock", dir);
  snprintf(dgpath, sizeof dgpath, "%s/unixsk-dgram.sock", dir);
  snprintf(abs_name, sizeof abs_name, "unixsk-%d", getpid());
  unlink(path);
  unlink(dgpath);

  // The path listener: stream, backlog 7, SO_PASSCRED, SO_RCVBUF, non-blocking; mode 0640.
  struct sockaddr_un pa;
  socklen_t plen = make_addr(&pa, path, 0);
  int lp = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (lp < 0 || bind(lp, (struct sockaddr*)&pa, plen) != 0) die("bind path");
  if (chmod(path, 0640) != 0) die("chmod");
  int one = 1, rcv = 40000;
  if (setsockopt(lp, SOL_SOCKET, SO_PASSCRED, &one, sizeof one) != 0) die("SO_PASSCRED");
  if (setsockopt(lp, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv) != 0) die("SO_RCVBUF");
  if (listen(lp, 7) != 0) die("listen path");
  int rcvbuf = opt(lp, SOL_SOCKET, SO_RCVBUF);
  int cp1 = client_of(SOCK_STREAM, &pa, plen);
  int cp2 = client_of(SOCK_STREAM, &pa, plen);

  // The abstract listener: seqpacket, backlog 5, no close-on-exec.
  struct sockaddr_un aa;
  socklen_t alen = make_addr(&aa, abs_name, 1);
  int la = socket(AF_UNIX, SOCK_SEQPACKET, 0);
  if (la < 0 || bind(la, (struct sockaddr*)&aa, alen) != 0) die("bind abstract");
  if (listen(la, 5) != 0) die("listen abstract");
  int ca1 = client_of(SOCK_SEQPACKET, &aa, alen);

  // The bound datagram socket with three datagrams from an unnamed sender, gone since.
  struct sockaddr_un da;
  socklen_t dlen = make_addr(&da, dgpath, 0);
  int dg = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (dg < 0 || bind(dg, (struct sockaddr*)&da, dlen) != 0) die("bind dgram");
  int snd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  const char* dgrams[] = {"first datagram", "second", "the third and last"};
  for (int i = 0; i < 3; i++)
    if (sendto(snd, dgrams[i], strlen(dgrams[i]), 0, (struct sockaddr*)&da, dlen) < 0)
      die("sendto dgram");
  close(snd);

  printf("ready pid=%d\n", getpid());
  fflush(stdout);
  wait_for_usr1();

  check_name(lp, &pa, plen, "path listener");
  check_name(la, &aa, alen, "abstract listener");
  check_name(dg, &da, dlen, "datagram socket");
  if (opt(lp, SOL_SOCKET, SO_ACCEPTCONN) != 1) BAD("path listener: not listening");
  if (opt(la, SOL_SOCKET, SO_ACCEPTCONN) != 1) BAD("abstract listener: not listening");
  if (opt(lp, SOL_SOCKET, SO_PASSCRED) != 1) BAD("path listener: SO_PASSCRED lost");
  if (opt(la, SOL_SOCKET, SO_PASSCRED) != 0) BAD("abstract listener: SO_PASSCRED appeared");
  if (opt(lp, SOL_SOCKET, SO_RCVBUF) != rcvbuf)
    BAD("path listener: SO_RCVBUF %d, was %d", opt(lp, SOL_SOCKET, SO_RCVBUF), rcvbuf);
  if (opt(la, SOL_SOCKET, SO_TYPE) != SOCK_SEQPACKET)
    BAD("abstract listener: type %d", opt(la, SOL_SOCKET, SO_TYPE));
  if (!(fcntl(lp, F_GETFL) & O_NONBLOCK)) BAD("path listener: O_NONBLOCK lost");
  if (!(fcntl(lp, F_GETFD) & FD_CLOEXEC)) BAD("path listener: FD_CLOEXEC lost");
  if (fcntl(la, F_GETFD) & FD_CLOEXEC) BAD("abstract listener: FD_CLOEXEC appeared");
  struct stat st;
  if (stat(path, &st) != 0 || !S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != 0640)
    BAD("%s: not a socket file of mode 0640 (%o)", path, (unsigned)st.st_mode);
  check_pending(lp, cp1, "path", 1);
  check_pending(lp, cp2, "path", 2);
  check_pending(la, ca1, "abstract", 1);
  for (int i = 0; i < 3; i++) {
    char buf[64];
    struct sockaddr_un from;
    socklen_t flen = sizeof from;
    ssize_t n = recvfrom(dg, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr*)&from, &flen);
    if (n != (ssize_t)strlen(dgrams[i]) || memcmp(buf, dgrams[i], (size_t)n) != 0) {
      BAD("datagram %d: lost or out of order (%zd bytes)", i, n);
      break;
    }
    if (flen > offsetof(struct sockaddr_un, sun_path))
      BAD("datagram %d: comes from a named sender now", i);
  }
  char extra[8];
  if (recv(dg, extra, sizeof extra, MSG_DONTWAIT) >= 0) BAD("datagram socket: a datagram too many");
  if (report_verified()) return 1;
  // One new connection from outside, on the path listener.
  int fl = fcntl(lp, F_GETFL);
  fcntl(lp, F_SETFL, fl & ~O_NONBLOCK);
  int s = accept4(lp, NULL, NULL, SOCK_CLOEXEC);
  if (s < 0) die("accept");
  char buf[256];
  ssize_t n = read(s, buf, sizeof buf);
  if (n <= 0 || write(s, buf, (size_t)n) != n) die("echo");
  close(s);
  printf("served 1\n");
  fflush(stdout);
  unlink(path);
  unlink(dgpath);
  return 0;
}

static int ext_main(const char* peer) {
  struct sockaddr_un a;
  socklen_t len = make_addr(&a, peer, 0);
  int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0 || connect(s, (struct sockaddr*)&a, len) != 0) die("connect ext");
  if (send(s, "ext-before", 10, 0) != 10) die("send ext-before");
  printf("ready pid=%d\n", getpid());
  fflush(stdout);
  wait_for_usr1();
  struct sockaddr_un got;
  socklen_t glen = sizeof got;
  if (getpeername(s, (struct sockaddr*)&got, &glen) != 0 || strcmp(got.sun_path, peer) != 0)
    BAD("ext: not connected to %s", peer);
  if (send(s, "ext-after", 9, 0) != 9) BAD("ext: send: %s", strerror(errno));
  return report_verified();
}

int main(int argc, char** argv) {
  signal(SIGUSR1, on_usr1);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 3 && strcmp(argv[1], "listen") == 0) return listen_main(argv[2]);
  if (argc == 3 && strcmp(argv[1], "ext") == 0) return ext_main(argv[2]);
  fprintf(stderr, "usage: unix_target listen DIR | ext PATH\n");
  return 2;
}
