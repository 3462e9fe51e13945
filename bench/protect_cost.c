// What write-protecting a process's memory costs the kernel, which bounds any live dump's frozen
// time (issue 15): a copy-on-write twin (fork), userfaultfd write-protection
// (UFFDIO_WRITEPROTECT, QEMU's background snapshot) and, for scale, mprotect(PROT_READ) all
// change every page table entry of the memory while the process is stopped.
// `protect_cost MIB [RUNS]` maps MIB MiB of anonymous memory, touches every page, and prints one
// markdown row per page size (4 KiB pages, then madvise(MADV_HUGEPAGE): 2 MiB folios where
// the machine's THP mode allows) with the median and min of RUNS (default 5) of each, in ms.
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { kMaxRuns = 64 };

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

static void die(const char* what) {
  perror(what);
  exit(1);
}

// The child exits at once: its teardown is not part of what the parent waited for.
static double fork_ms(void) {
  double t = now_ms();
  pid_t c = fork();
  if (c == 0) _exit(0);
  double d = now_ms() - t;
  if (c < 0 || waitpid(c, NULL, 0) != c) die("fork");
  return d;
}

static double writeprotect_ms(int uffd, char* p, size_t len) {
  struct uffdio_writeprotect wp = {.range = {(uintptr_t)p, len},
                                   .mode = UFFDIO_WRITEPROTECT_MODE_WP};
  double t = now_ms();
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) die("UFFDIO_WRITEPROTECT");
  double d = now_ms() - t;
  wp.mode = 0;
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) die("UFFDIO_WRITEPROTECT (off)");
  return d;
}

static double mprotect_ms(char* p, size_t len) {
  double t = now_ms();
  if (mprotect(p, len, PROT_READ) != 0) die("mprotect");
  double d = now_ms() - t;
  if (mprotect(p, len, PROT_READ | PROT_WRITE) != 0) die("mprotect (back)");
  return d;
}

static void row(size_t mib, int runs, int huge) {
  const size_t len = mib << 20;
  char* p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) die("mmap");
  if (huge && madvise(p, len, MADV_HUGEPAGE) != 0) die("madvise(MADV_HUGEPAGE)");
  for (size_t i = 0; i < len; i += 4096) p[i] = (char)(i >> 12);

  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) die("UFFDIO_API");
  struct uffdio_register reg = {.range = {(uintptr_t)p, len}, .mode = UFFDIO_REGISTER_MODE_WP};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER (write-protect)");

  double f[kMaxRuns], w[kMaxRuns], m[kMaxRuns];
  for (int r = 0; r < runs; r++) {
    f[r] = fork_ms();
    w[r] = writeprotect_ms(uffd, p, len);
    m[r] = mprotect_ms(p, len);
  }
  qsort(f, (size_t)runs, sizeof f[0], by_value);
  qsort(w, (size_t)runs, sizeof w[0], by_value);
  qsort(m, (size_t)runs, sizeof m[0], by_value);
  printf("| %zu | %s | %.2f / %.2f | %.2f / %.2f | %.2f / %.2f |\n", mib,
         huge ? "MADV_HUGEPAGE" : "4 KiB", f[runs / 2], f[0], w[runs / 2], w[0], m[runs / 2], m[0]);
  fflush(stdout);
  close(uffd);
  munmap(p, len);
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3 || strcmp(argv[1], "--help") == 0) {
    fprintf(stderr, "usage: protect_cost MIB [RUNS]\n");
    return argc == 2 ? 0 : 2;
  }
  const size_t mib = strtoull(argv[1], NULL, 10);
  const int runs = argc == 3 ? atoi(argv[2]) : 5;
  if (mib == 0 || runs < 1 || runs > kMaxRuns) {
    fprintf(stderr, "protect_cost: MIB must be > 0 and RUNS 1..%d\n", kMaxRuns);
    return 2;
  }
  printf(
      "| MiB | pages | fork ms median / min | UFFDIO_WRITEPROTECT ms | mprotect(PROT_READ) ms |\n");
  printf("|---|---|---|---|---|\n");
  row(mib, runs, 0);
  row(mib, runs, 1);
  return 0;
}
