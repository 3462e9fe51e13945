/* A target for clones of a template (issue 13): a large memory pattern, worker threads, a
 * regular file and a pipe, each checked from inside by every clone on its own.
 *
 *   clone_target DIR MIB [eventfd]
 * fills MIB MiB with a pattern, starts 3 workers, opens DIR/shared.txt (position 5 after
 * "head\n") and a pipe holding "pipedata", prints "ready pid=P tids=A,B,C,D", puts /dev/null on
 * fds 0-2, then polls for DIR/cmd-N (N: the inode of its PID namespace, which tells the clones
 * apart) and answers each command in DIR/res-N:
 *   verify    every byte of the pattern, getpid() and every thread's gettid() against what
 *             each recorded before the dump
 *   write S   rewrite the whole pattern with seed S, then verify it
 *   file      write one line at the file's position: it must be 5 before and 5+len after
 *             (a description shared with another clone would have moved)
 *   pipe      the pipe must hold exactly "pipedata" (a pipe shared with another clone that
 *             read it first would be empty)
 *   touch     write one word per 2 MiB (its own value), then verify
 *   exit N    exit with status N
 * Each answer is "ok ..." or "FAIL why".
 *
 *   clone_target DIR MIB kinds PORT
 * also holds an eventfd (count 5), an epoll set watching it, an armed timerfd, a signalfd, a
 * socketpair with "sockdata" buffered, a TCP listener on 127.0.0.1:PORT and a MADV_WIPEONFORK
 * page filled with 0xab, and answers
 *   kinds     each of those is this clone's own: the epoll set reports the eventfd readable
 *             and the eventfd's count is 5 (a shared one would have been drained by another
 *             clone), the socket holds exactly "sockdata", the timerfd is armed, the listener
 *             accepts a connection from this clone's own network namespace, and the
 *             MADV_WIPEONFORK page reads zero (a clone is a fork).
 *   clone_target DIR MIB deleted
 * also holds DIR/deleted.txt, deleted, holding "gone", and answers
 *   deleted   the file is this clone's own: it holds exactly "gone" and is deleted, then
 *             the clone appends its id and reads it back (a file shared with another clone
 *             would hold that clone's id too). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define WORKERS 3

static uint64_t* mem;
static size_t words;
static uint64_t seed = 1;
static pid_t tids[WORKERS + 1];
static atomic_int gen, answered[WORKERS];
static atomic_int tid_ok[WORKERS];
static int file_fd, pipe_rd, pipe_wr;
static int efd = -1, epfd, tfd, sfd, sock_rd, lfd, port;
static unsigned char* wipe;

static void make_kinds(void) {
  efd = eventfd(5, EFD_NONBLOCK);
  epfd = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 77};
  if (efd < 0 || epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev) != 0) exit(10);
  tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
  struct itimerspec its = {.it_interval = {1000, 0}, .it_value = {1000, 0}};
  if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL) != 0) exit(11);
  sigset_t ss;
  sigemptyset(&ss);
  sigaddset(&ss, SIGUSR2);
  sfd = signalfd(-1, &ss, SFD_NONBLOCK);
  int sv[2];
  if (sfd < 0 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0 || write(sv[0], "sockdata", 8) != 8)
    exit(12);
  sock_rd = sv[1];
  lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (lfd < 0 || bind(lfd, (struct sockaddr*)&a, sizeof a) != 0 || listen(lfd, 8) != 0) exit(13);
  wipe = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (wipe == MAP_FAILED || madvise(wipe, 4096, MADV_WIPEONFORK) != 0) exit(14);
  memset(wipe, 0xab, 4096);
}

static void check_kinds(char* out, size_t n) {
  struct epoll_event ev;
  int k = epoll_wait(epfd, &ev, 1, 0);
  if (k != 1 || ev.data.u64 != 77) {
    snprintf(out, n, "FAIL epoll_wait gave %d (data %llu)", k, (unsigned long long)ev.data.u64);
    return;
  }
  uint64_t count = 0;
  if (read(efd, &count, 8) != 8 || count != 5) {
    snprintf(out, n, "FAIL eventfd count %llu (%s)", (unsigned long long)count, strerror(errno));
    return;
  }
  char buf[64];
  ssize_t got = recv(sock_rd, buf, sizeof buf, MSG_DONTWAIT);
  if (got != 8 || memcmp(buf, "sockdata", 8) != 0) {
    snprintf(out, n, "FAIL socketpair read %zd", got);
    return;
  }
  struct itimerspec its;
  if (timerfd_gettime(tfd, &its) != 0 || its.it_value.tv_sec == 0 ||
      its.it_interval.tv_sec != 1000) {
    snprintf(out, n, "FAIL timerfd not armed");
    return;
  }
  struct signalfd_siginfo si;
  if (read(sfd, &si, sizeof si) != -1 || errno != EAGAIN) {
    snprintf(out, n, "FAIL signalfd not an empty signalfd (%s)", strerror(errno));
    return;
  }
  int c = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (c < 0 || connect(c, (struct sockaddr*)&a, sizeof a) != 0) {
    snprintf(out, n, "FAIL connect to 127.0.0.1:%d: %s", port, strerror(errno));
    return;
  }
  int s = accept(lfd, NULL, NULL);
  if (s < 0 || write(c, "x", 1) != 1 || read(s, buf, 1) != 1) {
    snprintf(out, n, "FAIL accept on the listener: %s", strerror(errno));
    return;
  }
  close(s);
  close(c);
  for (int i = 0; i < 4096; i++)
    if (wipe[i] != 0) {
      snprintf(out, n, "FAIL MADV_WIPEONFORK byte %d is 0x%x, not 0", i, wipe[i]);
      return;
    }
  snprintf(out, n, "ok kinds");
}

static pid_t gettid_raw(void) {
  return (pid_t)syscall(SYS_gettid);
}

static uint64_t pattern(uint64_t i, uint64_t s) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (s * 0xD6E8FEB86659FD93ull);
  return x ^ (x >> 29);
}

static void fill(uint64_t s) {
  for (size_t i = 0; i < words; i++) mem[i] = pattern(i, s);
  seed = s;
}

static void* worker(void* arg) {
  int i = (int)(intptr_t)arg;
  tids[i + 1] = gettid_raw();
  int seen = 0;
  for (;;) {
    int g = atomic_load(&gen);
    if (g != seen) {
      atomic_store(&tid_ok[i], gettid_raw() == tids[i + 1]);
      seen = g;
      atomic_store(&answered[i], g);
    }
    usleep(1000);
  }
  return NULL;
}

static void answer(const char* dir, const char* id, const char* text) {
  char tmp[4096], path[4096];
  snprintf(tmp, sizeof tmp, "%s/res-%s.tmp", dir, id);
  snprintf(path, sizeof path, "%s/res-%s", dir, id);
  FILE* f = fopen(tmp, "w");
  if (!f) return;
  fprintf(f, "%s\n", text);
  fclose(f);
  rename(tmp, path);
}

static void verify(char* out, size_t n) {
  if (gettid_raw() != tids[0] || getpid() != tids[0]) {
    snprintf(out, n, "FAIL pid %d (gettid %d), recorded %d", getpid(), gettid_raw(), tids[0]);
    return;
  }
  for (size_t i = 0; i < words; i++)
    if (mem[i] != pattern(i, seed)) {
      snprintf(out, n, "FAIL word %zu of %zu differs (seed %llu)", i, words,
               (unsigned long long)seed);
      return;
    }
  int g = atomic_fetch_add(&gen, 1) + 1;
  for (int i = 0; i < WORKERS; i++) {
    while (atomic_load(&answered[i]) != g) usleep(1000);
    if (!atomic_load(&tid_ok[i])) {
      snprintf(out, n, "FAIL thread %d: gettid is not %d", i + 1, tids[i + 1]);
      return;
    }
  }
  snprintf(out, n, "ok verified %zu MiB, tids %d,%d,%d,%d", words * 8 >> 20, tids[0], tids[1],
           tids[2], tids[3]);
}

static int del_fd = -1;

static void check_deleted(const char* id, char* out, size_t n) {
  char buf[128] = {0};
  struct stat st;
  if (fstat(del_fd, &st) != 0 || st.st_nlink != 0 || !S_ISREG(st.st_mode)) {
    snprintf(out, n, "FAIL deleted file: not a deleted regular file");
    return;
  }
  ssize_t got = pread(del_fd, buf, sizeof buf - 1, 0);
  if (got != 4 || memcmp(buf, "gone", 4) != 0) {
    snprintf(out, n, "FAIL deleted file holds %zd bytes \"%s\" before this clone wrote", got,
             got > 0 ? buf : "");
    return;
  }
  size_t len = strlen(id);
  char back[128] = {0};
  if (pwrite(del_fd, id, len, 4) != (ssize_t)len ||
      pread(del_fd, back, sizeof back - 1, 0) != (ssize_t)(4 + len) ||
      memcmp(back + 4, id, len) != 0) {
    snprintf(out, n, "FAIL deleted file: wrote %s, read back \"%s\"", id, back);
    return;
  }
  snprintf(out, n, "ok deleted file");
}

int main(int argc, char** argv) {
  if (argc < 3 || argc > 5) return 2;
  const char* dir = argv[1];
  if (argc == 5 && strcmp(argv[3], "kinds") == 0) {
    port = atoi(argv[4]);
    make_kinds();
  } else if (argc == 4 && strcmp(argv[3], "deleted") == 0) {
    char del[4096];
    snprintf(del, sizeof del, "%s/deleted.txt", dir);
    del_fd = open(del, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (del_fd < 0 || write(del_fd, "gone", 4) != 4 || unlink(del) != 0) return 2;
  } else if (argc != 3) {
    return 2;
  }
  size_t mib = (size_t)atol(argv[2]);
  words = mib << 17;
  mem = mmap(NULL, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 3;
  fill(1);
  tids[0] = gettid_raw();
  for (int i = 0; i < WORKERS; i++) {
    pthread_t t;
    pthread_create(&t, NULL, worker, (void*)(intptr_t)i);
  }
  while (!tids[1] || !tids[2] || !tids[3]) usleep(1000);
  char path[4096];
  snprintf(path, sizeof path, "%s/shared.txt", dir);
  file_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (file_fd < 0 || write(file_fd, "head\n", 5) != 5) return 4;
  int p[2];
  if (pipe2(p, O_NONBLOCK) != 0 || write(p[1], "pipedata", 8) != 8) return 5;
  pipe_rd = p[0];
  pipe_wr = p[1];
  /* /dev/null on 0-2 before "ready": a dump right after it must not find the caller's pipe. */
  int out = dup(1);
  int null = open("/dev/null", O_RDWR);
  dup2(null, 0);
  dup2(null, 1);
  dup2(null, 2);
  close(null);
  dprintf(out, "ready pid=%d tids=%d,%d,%d,%d\n", tids[0], tids[0], tids[1], tids[2], tids[3]);
  close(out);
  for (;;) {
    char ns[64] = {0}, id[64], cmd_path[4096], cmd[256] = {0};
    if (readlink("/proc/self/ns/pid", ns, sizeof ns - 1) < 0) return 6;
    /* "pid:[4026531836]" -> "4026531836" */
    char* lb = strchr(ns, '[');
    snprintf(id, sizeof id, "%s", lb ? lb + 1 : ns);
    char* rb = strchr(id, ']');
    if (rb) *rb = 0;
    snprintf(cmd_path, sizeof cmd_path, "%s/cmd-%s", dir, id);
    FILE* f = fopen(cmd_path, "r");
    if (!f) {
      usleep(2000);
      continue;
    }
    size_t got = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    if (got == 0) {
      usleep(2000);
      continue;
    }
    unlink(cmd_path);
    char out[512];
    unsigned long long arg = 0;
    if (strncmp(cmd, "verify", 6) == 0) {
      verify(out, sizeof out);
    } else if (sscanf(cmd, "write %llu", &arg) == 1) {
      fill(arg);
      verify(out, sizeof out);
    } else if (strncmp(cmd, "file", 4) == 0) {
      off_t before = lseek(file_fd, 0, SEEK_CUR);
      char line[80];
      int len = snprintf(line, sizeof line, "clone %s\n", id);
      ssize_t w = write(file_fd, line, (size_t)len);
      off_t after = lseek(file_fd, 0, SEEK_CUR);
      if (before == 5 && w == len && after == 5 + len)
        snprintf(out, sizeof out, "ok file position 5 -> %lld", (long long)after);
      else
        snprintf(out, sizeof out, "FAIL file position %lld -> %lld (wrote %zd)", (long long)before,
                 (long long)after, w);
    } else if (strncmp(cmd, "pipe", 4) == 0) {
      char buf[64];
      ssize_t n = read(pipe_rd, buf, sizeof buf);
      if (n == 8 && memcmp(buf, "pipedata", 8) == 0)
        snprintf(out, sizeof out, "ok pipe");
      else
        snprintf(out, sizeof out, "FAIL pipe read %zd (%s)", n, n < 0 ? strerror(errno) : "");
    } else if (strncmp(cmd, "touch", 5) == 0) {
      /* One write per 2 MiB (the same value): the copy-on-write fault a huge page takes. */
      for (size_t i = 0; i < words; i += (2u << 20) / 8) ((volatile uint64_t*)mem)[i] = mem[i];
      verify(out, sizeof out);
    } else if (strncmp(cmd, "kinds", 5) == 0 && efd >= 0) {
      check_kinds(out, sizeof out);
    } else if (strncmp(cmd, "deleted", 7) == 0 && del_fd >= 0) {
      check_deleted(id, out, sizeof out);
    } else if (sscanf(cmd, "exit %llu", &arg) == 1) {
      answer(dir, id, "ok exiting");
      _exit((int)arg);
    } else {
      snprintf(out, sizeof out, "FAIL unknown command %s", cmd);
    }
    answer(dir, id, out);
  }
}
