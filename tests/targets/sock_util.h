/* What the socket targets (tcp_target.c, unix_target.c, inet_target.c) share: the SIGUSR1 "go"
 * flag the tests send to ask for verification, setup failures, integer socket options and
 * IPv4/IPv6 addresses. */
#pragma once

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static volatile sig_atomic_t g_go;

static inline void on_usr1(int sig) {
  (void)sig;
  g_go = 1;
}

static inline void wait_for_usr1(void) {
  struct timespec ts = {0, 1000 * 1000};
  while (!g_go) nanosleep(&ts, NULL);
}

/* The first verification failure ("" while none). */
static char g_why[512];

/* Records a verification failure (the first one is reported). */
#define BAD(...)                                                   \
  do {                                                             \
    if (g_why[0] == 0) snprintf(g_why, sizeof g_why, __VA_ARGS__); \
  } while (0)

/* Prints "verified ok", or "verify FAILED: " and the first failure; returns 0 or 1. */
static inline int report_verified(void) {
  if (g_why[0]) {
    printf("verify FAILED: %s\n", g_why);
    fflush(stdout);
    return 1;
  }
  printf("verified ok\n");
  fflush(stdout);
  return 0;
}

/* Setup failed: says what and why, exits 2. */
static inline void die(const char* what) {
  printf("setup FAILED: %s: %s\n", what, strerror(errno));
  fflush(stdout);
  exit(2);
}

/* An integer socket option, or -999 when getsockopt fails. */
static inline int opt(int fd, int level, int name) {
  int v = -1;
  socklen_t len = sizeof v;
  if (getsockopt(fd, level, name, &v, &len) != 0) return -999;
  return v;
}

static inline void setopt(int fd, int level, int name, int v) {
  if (setsockopt(fd, level, name, &v, sizeof v) != 0) die("setsockopt");
}

/* ip:port of `family` (AF_INET or AF_INET6) in *ss; returns its length. */
static inline socklen_t make_inet_addr(struct sockaddr_storage* ss, int family, const char* ip,
                                       int port) {
  memset(ss, 0, sizeof *ss);
  if (family == AF_INET) {
    struct sockaddr_in* a = (struct sockaddr_in*)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, ip, &a->sin_addr);
    return sizeof *a;
  }
  struct sockaddr_in6* a = (struct sockaddr_in6*)ss;
  a->sin6_family = AF_INET6;
  a->sin6_port = htons((uint16_t)port);
  inet_pton(AF_INET6, ip, &a->sin6_addr);
  return sizeof *a;
}
