// A process writing its memory at a steady rate, for live dump benchmarks
// (bench/live_dump_bench.py --writer): `paced_writer MIB MB_PER_S LOG` maps MIB MiB of distinct
// pages, then every millisecond writes whole pages (the next ones in turn, round and round) at
// MB_PER_S, and logs each tick into LOG, a file it maps shared: a header
//   { magic, ticks logged, pages, period_ns }
// then one record per tick (the slot `tick % kSlots`):
//   { CLOCK_MONOTONIC ns at the tick's start, pages written so far, ns spent writing so far }.
// A tick missed (the process frozen, or slowed) is not made up: the log shows the gap, and a
// tick that takes longer than before (copy-on-write faults) shows in the time spent writing.
// No descriptor is left open and stdio is not used after the start: any dumper can take it.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { kSlots = 1 << 20 };
static const uint64_t kMagic = 0x70616365645f7772ull;  // "paced_wr"
static const uint64_t kPeriodNs = 1000000;

struct record {
  uint64_t t_ns, pages, busy_ns;
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void write_page(uint64_t* w, uint64_t page, uint64_t gen) {
  for (int i = 0; i < 512; i++) w[i] = (gen << 40) ^ (page << 9) ^ (uint64_t)i;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: paced_writer MIB MB_PER_S LOG\n");
    return 2;
  }
  const uint64_t pages = strtoull(argv[1], NULL, 10) * 256;
  const double pages_per_tick = strtod(argv[2], NULL) * 1e6 / 4096.0 * kPeriodNs / 1e9;
  int fd = open(argv[3], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  const size_t log_bytes = sizeof(struct record) * (kSlots + 1);
  if (fd < 0 || ftruncate(fd, (off_t)log_bytes) != 0) return 3;
  struct record* log = mmap(NULL, log_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  uint64_t* mem =
      mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (log == MAP_FAILED || mem == MAP_FAILED) return 3;
  for (uint64_t p = 0; p < pages; p++) write_page(mem + p * 512, p, 0);
  uint64_t* header = (uint64_t*)log;
  header[2] = pages;
  header[3] = kPeriodNs;
  header[0] = kMagic;  // ready
  uint64_t written = 0, busy = 0, gen = 1, next_page = 0, tick = 0;
  double owed = 0;
  uint64_t next = now_ns();
  for (;;) {
    const uint64_t t0 = now_ns();
    owed += pages_per_tick;
    for (; owed >= 1; owed -= 1) {
      write_page(mem + next_page * 512, next_page, gen);
      written++;
      if (++next_page == pages) {
        next_page = 0;
        gen++;
      }
    }
    const uint64_t t1 = now_ns();
    busy += t1 - t0;
    struct record* r = &log[1 + tick % kSlots];
    r->t_ns = t0;
    r->pages = written;
    r->busy_ns = busy;
    __atomic_store_n(&header[1], ++tick, __ATOMIC_RELEASE);
    next += kPeriodNs;
    if (next < t1) next = t1;  // missed ticks are not made up
    struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
  }
}
