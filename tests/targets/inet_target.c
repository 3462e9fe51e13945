// IPv4/IPv6 sockets a restore must give back (objects/inet_socket.h), verified from inside.
//   inet_target tcp: three TCP listeners, each with options set (SO_REUSEPORT on the IPv6-only
//     one only): IPv4 on 127.0.0.1, IPv6-only on [::1], dual-stack on [::]; prints "ready pid=P
//     port4=A port6=B portds=C". On SIGUSR1 it checks every option, address, backlog-independent
//     state and descriptor flag against what it recorded, prints "verified ok" (or "verify FAILED:
//     why" and exits 1), then accepts one connection on each listener, echoes the line it reads,
//     and exits 0.
//   inet_target udp: UDP sockets with datagrams queued from two senders: IPv4 on 127.0.0.1,
//     IPv6-only on [::1], dual-stack on [::] (an IPv4 and an IPv6 sender), and an IPv4 socket
//     connected to one sender; prints "ready pid=P". On SIGUSR1 it reads every queue and checks
//     bytes, source addresses and order, then addresses, peer and flags; "verified ok" and 0.
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
#include <time.h>
#include <unistd.h>

#include "sock_util.h"

static int port_of(const struct sockaddr_storage* ss) {
  return ss->ss_family == AF_INET ? ntohs(((const struct sockaddr_in*)ss)->sin_port)
                                  : ntohs(((const struct sockaddr_in6*)ss)->sin6_port);
}

// Options and state of one socket as getsockopt/getsockname/fcntl show them.
#define NOPTS 13
struct state {
  int v[NOPTS];
  struct sockaddr_storage name, peer;
  socklen_t name_len, peer_len;
};
static const char* const opt_names[NOPTS] = {
    "SO_REUSEADDR",  "SO_REUSEPORT", "SO_KEEPALIVE", "SO_RCVBUF",     "SO_SNDBUF",
    "SO_ACCEPTCONN", "TCP_NODELAY",  "TCP_KEEPIDLE", "TCP_KEEPINTVL", "IPV6_V6ONLY",
    "O_NONBLOCK",    "FD_CLOEXEC",   "SO_TYPE"};

static void read_state(int fd, struct state* s) {
  memset(s, 0, sizeof *s);
  s->v[0] = opt(fd, SOL_SOCKET, SO_REUSEADDR);
  s->v[1] = opt(fd, SOL_SOCKET, SO_REUSEPORT);
  s->v[2] = opt(fd, SOL_SOCKET, SO_KEEPALIVE);
  s->v[3] = opt(fd, SOL_SOCKET, SO_RCVBUF);
  s->v[4] = opt(fd, SOL_SOCKET, SO_SNDBUF);
  s->v[5] = opt(fd, SOL_SOCKET, SO_ACCEPTCONN);
  s->v[6] = opt(fd, IPPROTO_TCP, TCP_NODELAY);
  s->v[7] = opt(fd, IPPROTO_TCP, TCP_KEEPIDLE);
  s->v[8] = opt(fd, IPPROTO_TCP, TCP_KEEPINTVL);
  s->v[9] = opt(fd, IPPROTO_IPV6, IPV6_V6ONLY);
  s->v[10] = (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0;
  s->v[11] = (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
  s->v[12] = opt(fd, SOL_SOCKET, SO_TYPE);
  s->name_len = sizeof s->name;
  getsockname(fd, (struct sockaddr*)&s->name, &s->name_len);
  s->peer_len = sizeof s->peer;
  if (getpeername(fd, (struct sockaddr*)&s->peer, &s->peer_len) != 0) s->peer_len = 0;
}

static void compare(int fd, const struct state* before) {
  struct state now;
  read_state(fd, &now);
  for (int i = 0; i < NOPTS; i++)
    if (now.v[i] != before->v[i]) BAD("fd %d: %d differs (%s)", fd, now.v[i], opt_names[i]);
  if (now.name_len != before->name_len || memcmp(&now.name, &before->name, now.name_len) != 0)
    BAD("fd %d: getsockname differs (port %d%s)", fd, port_of(&now.name), "");
  if (now.peer_len != before->peer_len || memcmp(&now.peer, &before->peer, now.peer_len) != 0)
    BAD("fd %d: getpeername differs (len %d%s)", fd, (int)now.peer_len, "");
}

static int tcp_listener(int family, const char* ip, int v6only, int nonblock, struct state* st) {
  int fd = socket(family, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0) die("socket");
  setopt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
  // Not on every one: a listener without it makes a restore beside the original clash.
  if (family == AF_INET6 && v6only) setopt(fd, SOL_SOCKET, SO_REUSEPORT, 1);
  setopt(fd, SOL_SOCKET, SO_KEEPALIVE, 1);
  setopt(fd, SOL_SOCKET, SO_RCVBUF, 65536);
  setopt(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  setopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, 77);
  if (family == AF_INET6) setopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, v6only);
  struct sockaddr_storage ss;
  socklen_t len = make_inet_addr(&ss, family, ip, 0);
  if (bind(fd, (struct sockaddr*)&ss, len) != 0) die("bind");
  if (listen(fd, 17) != 0) die("listen");
  read_state(fd, st);
  return fd;
}

static int serve_one(int lfd) {
  struct pollfd p = {lfd, POLLIN, 0};
  if (poll(&p, 1, 60000) != 1) return -1;
  int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  if (c < 0) return -1;
  int fl = fcntl(c, F_GETFL);
  fcntl(c, F_SETFL, fl & ~O_NONBLOCK);
  char buf[256];
  ssize_t n = read(c, buf, sizeof buf);
  if (n <= 0 || write(c, buf, (size_t)n) != n) return -1;
  close(c);
  return 0;
}

static int tcp_main(void) {
  struct state s4, s6, sds;
  int l4 = tcp_listener(AF_INET, "127.0.0.1", 0, 1, &s4);
  int l6 = tcp_listener(AF_INET6, "::1", 1, 0, &s6);
  int lds = tcp_listener(AF_INET6, "::", 0, 1, &sds);
  printf("ready pid=%d port4=%d port6=%d portds=%d\n", getpid(), port_of(&s4.name),
         port_of(&s6.name), port_of(&sds.name));
  fflush(stdout);
  wait_for_usr1();
  compare(l4, &s4);
  compare(l6, &s6);
  compare(lds, &sds);
  if (report_verified()) return 1;
  if (serve_one(l4) || serve_one(l6) || serve_one(lds)) {
    printf("serve FAILED: %s\n", strerror(errno));
    return 1;
  }
  printf("served 3\n");
  fflush(stdout);
  return 0;
}

// A UDP socket bound to ip, and what it must read back.
struct expected {
  char data[64];
  size_t len;
  struct sockaddr_storage from;
  socklen_t from_len;
};
#define NEXP 4
struct usock {
  int fd;
  struct state st;
  struct expected exp[NEXP];
  int n;
};

static int udp_bound(int family, const char* ip, int v6only, int nonblock) {
  int fd = socket(family, SOCK_DGRAM | (nonblock ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0) die("socket");
  if (family == AF_INET6) setopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, v6only);
  struct sockaddr_storage ss;
  socklen_t len = make_inet_addr(&ss, family, ip, 0);
  if (bind(fd, (struct sockaddr*)&ss, len) != 0) die("bind");
  return fd;
}

// `from` sends `text` to u (to address ip of its port); u records what it must read and from
// whom (as u sees it: an IPv4 sender of a dual-stack socket is ::ffff:a.b.c.d).
static void send_to(int from, struct usock* u, int family, const char* ip, const char* text) {
  struct sockaddr_storage me, to;
  socklen_t len = sizeof me;
  getsockname(u->fd, (struct sockaddr*)&me, &len);
  socklen_t tlen = make_inet_addr(&to, family, ip, port_of(&me));
  if (sendto(from, text, strlen(text), 0, (struct sockaddr*)&to, tlen) < 0) die("sendto");
  struct expected* e = &u->exp[u->n++];
  snprintf(e->data, sizeof e->data, "%s", text);
  e->len = strlen(text);
  struct sockaddr_storage src;
  socklen_t slen = sizeof src;
  getsockname(from, (struct sockaddr*)&src, &slen);
  int u_family = me.ss_family;
  if (u_family == AF_INET6 && src.ss_family == AF_INET) {
    struct sockaddr_in6 m;
    memset(&m, 0, sizeof m);
    m.sin6_family = AF_INET6;
    m.sin6_port = ((struct sockaddr_in*)&src)->sin_port;
    m.sin6_addr.s6_addr[10] = 0xff;
    m.sin6_addr.s6_addr[11] = 0xff;
    memcpy(&m.sin6_addr.s6_addr[12], &((struct sockaddr_in*)&src)->sin_addr, 4);
    memcpy(&e->from, &m, sizeof m);
    e->from_len = sizeof m;
  } else {
    e->from = src;
    e->from_len = slen;
  }
}

static void check_queue(struct usock* u) {
  for (int i = 0; i <= u->n; i++) {
    char buf[128];
    struct sockaddr_storage from;
    socklen_t flen = sizeof from;
    ssize_t n = recvfrom(u->fd, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr*)&from, &flen);
    if (i == u->n) {
      if (n >= 0) BAD("fd %d: an extra datagram of %d bytes%s", u->fd, (int)n, "");
      return;
    }
    if (n < 0) {
      BAD("fd %d: datagram %d missing (%s)", u->fd, i, strerror(errno));
      return;
    }
    const struct expected* e = &u->exp[i];
    if ((size_t)n != e->len || memcmp(buf, e->data, e->len) != 0)
      BAD("fd %d: datagram %d is not '%s'", u->fd, i, e->data);
    if (flen != e->from_len || memcmp(&from, &e->from, flen) != 0)
      BAD("fd %d: datagram %d comes from another source%s", u->fd, i, "");
  }
}

static int udp_main(void) {
  int a4 = udp_bound(AF_INET, "127.0.0.1", 0, 0);
  int b4 = udp_bound(AF_INET, "127.0.0.1", 0, 0);
  int a6 = udp_bound(AF_INET6, "::1", 1, 0);
  int b6 = udp_bound(AF_INET6, "::1", 1, 0);
  struct usock u[4];
  memset(u, 0, sizeof u);
  u[0].fd = udp_bound(AF_INET, "127.0.0.1", 0, 1);
  u[1].fd = udp_bound(AF_INET6, "::1", 1, 0);
  u[2].fd = udp_bound(AF_INET6, "::", 0, 1);
  u[3].fd = udp_bound(AF_INET, "127.0.0.1", 0, 0);
  send_to(a4, &u[0], AF_INET, "127.0.0.1", "first from a");
  send_to(b4, &u[0], AF_INET, "127.0.0.1", "second, from b");
  send_to(a4, &u[0], AF_INET, "127.0.0.1", "third (a again)");
  send_to(a6, &u[1], AF_INET6, "::1", "v6 from a6");
  send_to(b6, &u[1], AF_INET6, "::1", "v6 from b6");
  send_to(a4, &u[2], AF_INET, "127.0.0.1", "v4 to dual-stack");
  send_to(b6, &u[2], AF_INET6, "::1", "v6 to dual-stack");
  // Connected to a4: the queue holds a4's datagram; b4's arrived before the connect.
  send_to(b4, &u[3], AF_INET, "127.0.0.1", "b4 before connect");
  send_to(a4, &u[3], AF_INET, "127.0.0.1", "a4 before connect");
  struct sockaddr_storage peer;
  socklen_t plen = sizeof peer;
  getsockname(a4, (struct sockaddr*)&peer, &plen);
  if (connect(u[3].fd, (struct sockaddr*)&peer, plen) != 0) die("connect");
  close(a4);
  close(b4);
  close(a6);
  close(b6);
  for (int i = 0; i < 4; i++) read_state(u[i].fd, &u[i].st);
  printf("ready pid=%d\n", getpid());
  fflush(stdout);
  wait_for_usr1();
  for (int i = 0; i < 4; i++) {
    compare(u[i].fd, &u[i].st);
    check_queue(&u[i]);
  }
  return report_verified();
}

int main(int argc, char** argv) {
  signal(SIGUSR1, on_usr1);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc == 2 && strcmp(argv[1], "tcp") == 0) return tcp_main();
  if (argc == 2 && strcmp(argv[1], "udp") == 0) return udp_main();
  fprintf(stderr, "usage: inet_target tcp|udp\n");
  return 2;
}
