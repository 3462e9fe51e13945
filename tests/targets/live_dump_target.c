// Live dumps (`lazycr dump --leave-running`): a process that writes all the time, and acts on
// its memory on request while its pages are being read in the background.
//   live_dump_target MIB MODE
// maps an area R (4 MiB of patterned pages, MAP_SHARED in mode "shared", MADV_DONTFORK in
// "dontfork", MADV_WIPEONFORK in "wipeonfork", MADV_NOHUGEPAGE in "late*"), then a buffer B
// of MIB MiB below it, prints
//   ready pid=P
// and writes generation after generation into B: the first word of page 0, 1, ... N-1 gets the
// generation number g, so that at any instant the pages hold g up to a point and g-1 after it.
// Before starting a generation it checks that every page holds the last one (a restored
// process checks the instant its image holds at the end of its first generation): on a
// mismatch it prints "verify FAILED: why" and exits 1. On signals, at the end of a generation:
//   SIGUSR2: acts on R per MODE (munmap, dontneed, mremap, fork: fork a child that exits while
//            the parent rewrites R, then reaps it; shared, dontfork, wipeonfork: rewrite R;
//            latewipe, latedontfork, latedontdump, latelock: MADV_WIPEONFORK, MADV_DONTFORK,
//            MADV_DONTDUMP, mlock on R, its contents kept), prints "acted";
//   SIGHUP:  prints "children R E": waitpid(-1, WNOHANG|__WALL)'s result and errno;
//   SIGUSR1: checks R holds its first pattern (an image of the time before SIGUSR2) and, in
//            the late* modes, that smaps shows R's flag (wf, dc, dd, lo), prints "verified ok" or
//            "verify FAILED: why", exits 0 or 1.
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define R_PAGES 1024

static volatile sig_atomic_t g_act, g_verify, g_children;

static void on_usr2(int s) {
  (void)s;
  g_act = 1;
}
static void on_usr1(int s) {
  (void)s;
  g_verify = 1;
}
static void on_hup(int s) {
  (void)s;
  g_children = 1;
}

static void fill_r(char* r, uint64_t tag) {
  for (uint64_t p = 0; p < R_PAGES; p++) {
    uint64_t* w = (uint64_t*)(r + p * PAGE);
    for (int i = 0; i < 512; i += 64) w[i] = tag | (p << 16) | (uint64_t)i;
  }
}

static int check_r(const char* r, uint64_t tag, char* why, size_t len) {
  for (uint64_t p = 0; p < R_PAGES; p++) {
    const uint64_t* w = (const uint64_t*)(r + p * PAGE);
    for (int i = 0; i < 512; i += 64)
      if (w[i] != (tag | (p << 16) | (uint64_t)i)) {
        snprintf(why, len, "R page %llu word %d is %llx", (unsigned long long)p, i,
                 (unsigned long long)w[i]);
        return 0;
      }
  }
  return 1;
}

// The late* mode's madvise advice (-1: mlock) and the smaps VmFlags mnemonic it sets.
static int late_action(const char* mode, const char** flag) {
  static const struct {
    const char* mode;
    int advice;
    const char* flag;
  } kLate[] = {{"latewipe", MADV_WIPEONFORK, "wf"},
               {"latedontfork", MADV_DONTFORK, "dc"},
               {"latedontdump", MADV_DONTDUMP, "dd"},
               {"latelock", -1, "lo"}};
  for (size_t i = 0; i < sizeof kLate / sizeof kLate[0]; i++)
    if (strcmp(mode, kLate[i].mode) == 0) {
      *flag = kLate[i].flag;
      return kLate[i].advice;
    }
  *flag = NULL;
  return 0;
}

// Whether smaps lists `flag` in the VmFlags of the area starting at `r`.
static int area_has_flag(const char* r, const char* flag, char* why, size_t len) {
  FILE* f = fopen("/proc/self/smaps", "r");
  if (f == NULL) {
    snprintf(why, len, "cannot open /proc/self/smaps");
    return 0;
  }
  char line[512];
  int in_r = 0, found = 0;
  while (fgets(line, sizeof line, f) != NULL) {
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx ", &start, &end) == 2) {
      in_r = start == (unsigned long)r;
    } else if (in_r && strncmp(line, "VmFlags:", 8) == 0) {
      snprintf(why, len, "R lacks flag %s: %.100s", flag, line);
      char* tok = strtok(line + 8, " \n");
      for (; tok != NULL && !found; tok = strtok(NULL, " \n")) found = strcmp(tok, flag) == 0;
      break;
    }
  }
  fclose(f);
  if (!found && !in_r) snprintf(why, len, "R has no area of its own in smaps");
  return found;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: live_dump_target MIB MODE\n");
    return 2;
  }
  const uint64_t pages = strtoull(argv[1], NULL, 10) * 256;
  const char* mode = argv[2];
  const uint64_t first = 0xA5A5000000000000ull, second = 0x5A5A000000000000ull;
  int shared = strcmp(mode, "shared") == 0;
  char* r = mmap(NULL, R_PAGES * PAGE, PROT_READ | PROT_WRITE,
                 (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
  if (r == MAP_FAILED) return 3;
  if (strcmp(mode, "dontfork") == 0 && madvise(r, R_PAGES * PAGE, MADV_DONTFORK) != 0) return 3;
  if (strcmp(mode, "wipeonfork") == 0 && madvise(r, R_PAGES * PAGE, MADV_WIPEONFORK) != 0) return 3;
  // An area of its own, which MADV_WIPEONFORK / MADV_DONTFORK later change without splitting it.
  const char* late_flag;
  const int late_advice = late_action(mode, &late_flag);
  const int late = late_flag != NULL;
  if (late && madvise(r, R_PAGES * PAGE, MADV_NOHUGEPAGE) != 0) return 3;
  fill_r(r, first);
  volatile uint64_t* b =
      mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (b == MAP_FAILED) return 3;
  for (uint64_t p = 0; p < pages; p++) b[p * 512] = 0;

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr2;
  sigaction(SIGUSR2, &sa, NULL);
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, NULL);
  sa.sa_handler = on_hup;
  sigaction(SIGHUP, &sa, NULL);
  printf("ready pid=%d\n", getpid());
  fflush(stdout);

  char why[160];
  int acted = 0;
  for (uint64_t gen = 1;; gen++) {
    for (uint64_t p = 0; p < pages; p++)
      if (b[p * 512] != gen - 1) {
        printf("verify FAILED: generation %llu: page %llu holds %llu\n",
               (unsigned long long)gen - 1, (unsigned long long)p, (unsigned long long)b[p * 512]);
        fflush(stdout);
        return 1;
      }
    if (g_verify) {
      if (acted) {
        printf("verify FAILED: the image is of a time after the action\n");
      } else if (!check_r(r, first, why, sizeof why) ||
                 (late && !area_has_flag(r, late_flag, why, sizeof why))) {
        printf("verify FAILED: %s\n", why);
      } else {
        printf("verified ok\n");
        fflush(stdout);
        return 0;
      }
      fflush(stdout);
      return 1;
    }
    if (g_children) {
      g_children = 0;
      errno = 0;
      int st;
      pid_t w = waitpid(-1, &st, WNOHANG | __WALL);
      printf("children %d %d\n", (int)w, errno);
      fflush(stdout);
    }
    if (g_act) {
      g_act = 0;
      acted = 1;
      if (strcmp(mode, "munmap") == 0) {
        munmap(r, R_PAGES * PAGE);
      } else if (strcmp(mode, "dontneed") == 0) {
        madvise(r, R_PAGES * PAGE, MADV_DONTNEED);
      } else if (strcmp(mode, "mremap") == 0) {
        void* to = mremap(r, R_PAGES * PAGE, R_PAGES * PAGE * 2, MREMAP_MAYMOVE);
        if (to == MAP_FAILED) return 4;
        fill_r(to, second);
      } else if (strcmp(mode, "fork") == 0) {
        pid_t c = fork();
        if (c == 0) {
          usleep(1000);
          _exit(0);
        }
        fill_r(r, second);
        waitpid(c, NULL, 0);
      } else if (late) {
        // R's contents stay: an image taken after this still holds them (not "acted").
        acted = 0;
        if (late_advice >= 0 ? madvise(r, R_PAGES * PAGE, late_advice) != 0
                             : mlock(r, R_PAGES * PAGE) != 0)
          return 4;
      } else {
        fill_r(r, second);
      }
      printf("acted\n");
      fflush(stdout);
    }
    for (uint64_t p = 0; p < pages; p++) {
      b[p * 512] = gen;
      if ((p & 1023) == 1023) usleep(50);  // spread the writes over time, spare the CPU
    }
  }
}
