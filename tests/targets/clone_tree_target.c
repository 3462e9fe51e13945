/* A process tree for clones of a template (issue 13):
 *
 *   clone_tree_target DIR MIB
 * The root R fills MIB MiB with a pattern, makes a pipe R->A and a pipe A->R, and forks A
 * (which never writes the pattern: its pages stay shared with R's) and B (which rewrites the
 * second half of its copy with a pattern of its own and starts a worker thread). It prints
 * "ready pid=R a=A b=B btid=T", every process puts /dev/null on fds 0-2, then polls for
 * DIR/cmd-N-ROLE (N: the inode of its PID namespace, which tells the clones apart; ROLE: r, a,
 * b) and answers in DIR/res-N-ROLE:
 *   verify   R, A, B: getpid() and (A, B) getppid() are those recorded before the dump, every byte
 * of its memory is what it wrote or inherited (B: its thread's gettid() too); R writes N on the
 * pipe to A and waits (10 s) for "N!" back on the other; A reads N on its pipe and must find its
 * own N (a pipe shared with another clone would carry another's), then answers "N!". R and A report
 * their pipe's inode. Each answer is "ok pid=P ppid=Q pipe=I" or "FAIL why".
 * R also maps 1 MiB of shared anonymous memory (a pattern after a 64-byte header) before the
 * forks: every process checks the pattern; R finds the header empty or holding its own N (else
 * another clone wrote it: the clones share the object) and writes N there before the pipe;
 * A, once it has N from the pipe, finds N in the header (R's write, seen through the object
 * the clone's processes share).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint8_t* mem;
static size_t len;
static uint8_t* shm;
static const size_t shm_len = 1 << 20, shm_header = 64;
static pid_t my_pid, my_ppid;
static volatile pid_t worker_tid;
static volatile int worker_req, worker_ok;

static uint8_t root_byte(size_t i) {
  return (uint8_t)(i * 131 + (i >> 12) * 7 + 1);
}
static uint8_t b_byte(size_t i) {
  return (uint8_t)(i * 31 + (i >> 12) * 3 + 5);
}
static uint8_t shm_byte(size_t i) {
  return (uint8_t)(i * 17 + (i >> 12) * 5 + 3);
}

static void* worker(void* arg) {
  (void)arg;
  worker_tid = (pid_t)syscall(SYS_gettid);
  for (;;) {
    if (worker_req) {
      worker_ok = (pid_t)syscall(SYS_gettid) == worker_tid;
      worker_req = 0;
    }
    usleep(1000);
  }
  return NULL;
}

static int check_memory(char role, char* out, size_t n) {
  for (size_t i = shm_header; i < shm_len; i++)
    if (shm[i] != shm_byte(i)) {
      snprintf(out, n, "FAIL shared byte %zu is %u, not %u", i, shm[i], shm_byte(i));
      return 0;
    }
  for (size_t i = 0; i < len; i++) {
    uint8_t want = (role == 'b' && i >= len / 2) ? b_byte(i) : root_byte(i);
    if (mem[i] != want) {
      snprintf(out, n, "FAIL byte %zu is %u, not %u", i, mem[i], want);
      return 0;
    }
  }
  return 1;
}

static int read_line(int fd, char* buf, size_t n) {
  struct pollfd pf = {fd, POLLIN, 0};
  if (poll(&pf, 1, 10000) != 1) return -1;
  ssize_t got = read(fd, buf, n - 1);
  if (got <= 0) return -1;
  buf[got] = 0;
  return (int)got;
}

static unsigned long long ino_of(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 ? (unsigned long long)st.st_ino : 0;
}

static void verify(char role, const char* id, int rd, int wr, char* out, size_t n) {
  if (getpid() != my_pid || (my_ppid != 0 && getppid() != my_ppid)) {
    snprintf(out, n, "FAIL pid %d ppid %d, not %d %d", getpid(), getppid(), my_pid, my_ppid);
    return;
  }
  if (!check_memory(role, out, n)) return;
  unsigned long long ino = 0;
  char buf[128], want[128];
  if (role == 'r') {
    if (shm[0] != 0 && strncmp((const char*)shm, id, shm_header) != 0) {
      snprintf(out, n, "FAIL the shared memory holds \"%.63s\": another clone's", (char*)shm);
      return;
    }
    snprintf((char*)shm, shm_header, "%s", id);
    ino = ino_of(wr);
    if (write(wr, id, strlen(id)) != (ssize_t)strlen(id)) {
      snprintf(out, n, "FAIL write to A: %s", strerror(errno));
      return;
    }
    snprintf(want, sizeof want, "%s!", id);
    if (read_line(rd, buf, sizeof buf) < 0 || strcmp(buf, want) != 0) {
      snprintf(out, n, "FAIL no \"%s\" back from A", want);
      return;
    }
  } else if (role == 'a') {
    ino = ino_of(rd);
    if (read_line(rd, buf, sizeof buf) < 0) {
      snprintf(out, n, "FAIL nothing from R on the pipe");
      return;
    }
    if (strcmp(buf, id) != 0) {
      snprintf(out, n, "FAIL the pipe carried \"%s\", not this clone's \"%s\"", buf, id);
      return;
    }
    if (strncmp((const char*)shm, id, shm_header) != 0) {
      snprintf(out, n, "FAIL the shared memory holds \"%.63s\", not R's \"%s\"", (char*)shm, id);
      return;
    }
    snprintf(want, sizeof want, "%s!", id);
    if (write(wr, want, strlen(want)) != (ssize_t)strlen(want)) {
      snprintf(out, n, "FAIL write to R: %s", strerror(errno));
      return;
    }
  } else {
    worker_req = 1;
    for (int i = 0; i < 10000 && worker_req; i++) usleep(1000);
    if (worker_req || !worker_ok) {
      snprintf(out, n, "FAIL the worker thread's tid is not %d", worker_tid);
      return;
    }
  }
  snprintf(out, n, "ok pid=%d ppid=%d pipe=%llu", getpid(), getppid(), ino);
}

static void quiet(void) {
  int null = open("/dev/null", O_RDWR);
  dup2(null, 0);
  dup2(null, 1);
  dup2(null, 2);
  close(null);
}

static void serve(const char* dir, char role, int rd, int wr) {
  for (;;) {
    char ns[64] = {0}, id[64], path[4096], cmd[256] = {0};
    if (readlink("/proc/self/ns/pid", ns, sizeof ns - 1) < 0) exit(6);
    char* lb = strchr(ns, '[');
    snprintf(id, sizeof id, "%s", lb ? lb + 1 : ns);
    char* rb = strchr(id, ']');
    if (rb) *rb = 0;
    snprintf(path, sizeof path, "%s/cmd-%s-%c", dir, id, role);
    FILE* f = fopen(path, "r");
    if (!f) {
      usleep(5000);
      continue;
    }
    size_t got = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    if (got == 0) {
      usleep(5000);
      continue;
    }
    unlink(path);
    char out[512];
    if (strncmp(cmd, "verify", 6) == 0)
      verify(role, id, rd, wr, out, sizeof out);
    else
      snprintf(out, sizeof out, "FAIL unknown command %s", cmd);
    char tmp[4096], res[4096];
    snprintf(tmp, sizeof tmp, "%s/res-%s-%c.tmp", dir, id, role);
    snprintf(res, sizeof res, "%s/res-%s-%c", dir, id, role);
    FILE* o = fopen(tmp, "w");
    if (!o) exit(7);
    fprintf(o, "%s\n", out);
    fclose(o);
    rename(tmp, res);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: clone_tree_target DIR MIB\n");
    return 2;
  }
  const char* dir = argv[1];
  len = (size_t)atoi(argv[2]) << 20;
  mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 3;
  for (size_t i = 0; i < len; i++) mem[i] = root_byte(i);
  shm = mmap(NULL, shm_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shm == MAP_FAILED) return 3;
  for (size_t i = shm_header; i < shm_len; i++) shm[i] = shm_byte(i);
  int to_a[2], to_r[2];
  if (pipe(to_a) != 0 || pipe(to_r) != 0) return 4;
  const pid_t root = getpid();
  /* Each child says on `ready` once /dev/null is on its fds 0-2 (A its pid, B its thread's
   * tid); the root prints "ready" once nobody holds the caller's pipe: a dump right after it
   * must not find it. */
  int ready[2];
  if (pipe(ready) != 0) return 4;
  pid_t a = fork();
  if (a == 0) {
    my_pid = getpid();
    my_ppid = root;
    close(to_a[1]);
    close(to_r[0]);
    close(ready[0]);
    quiet();
    if (write(ready[1], &my_pid, sizeof my_pid) != sizeof my_pid) return 5;
    close(ready[1]);
    serve(dir, 'a', to_a[0], to_r[1]);
  }
  pid_t b = fork();
  if (b == 0) {
    my_pid = getpid();
    my_ppid = root;
    close(to_a[0]);
    close(to_a[1]);
    close(to_r[0]);
    close(to_r[1]);
    close(ready[0]);
    quiet();
    for (size_t i = len / 2; i < len; i++) mem[i] = b_byte(i);
    pthread_t th;
    if (pthread_create(&th, NULL, worker, NULL) != 0) return 5;
    while (!worker_tid) usleep(1000);
    pid_t t = worker_tid;
    if (write(ready[1], &t, sizeof t) != sizeof t) return 5;
    close(ready[1]);
    serve(dir, 'b', -1, -1);
  }
  close(ready[1]);
  pid_t btid = 0;
  for (int i = 0; i < 2; i++) {
    pid_t got = 0;
    if (read(ready[0], &got, sizeof got) != sizeof got) return 5;
    if (got != a) btid = got;
  }
  close(ready[0]);
  close(to_a[0]);
  close(to_r[1]);
  my_pid = root;
  my_ppid = 0; /* its parent is outside the tree (a clone's, outside its PID namespace) */
  int out = dup(1);
  quiet();
  dprintf(out, "ready pid=%d a=%d b=%d btid=%d\n", root, a, b, btid);
  close(out);
  serve(dir, 'r', to_r[0], to_a[1]);
  return 0;
}
