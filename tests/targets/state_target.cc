// A target that builds state a checkpoint must carry: patterned memory, threads (one blocked
// in a long nanosleep), files at positions, signal handlers, pending signals. It prints
//   ready pid=P tids=A,B,C buf=ADDR:BYTES zero=ADDR:BYTES file=FD:POS append=FD null=FD
//         usr1=HANDLER rt=SIGNO
// and then waits. When the file named by --verify-file appears it checks every byte of its
// memory, its threads, files and signal state, prints "verified ok" or "verify FAILED: why",
// and exits 0 or 1.
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::atomic<int> g_usr1_count{0};
std::atomic<int> g_rt_count{0};
std::atomic<int> g_usr2_count{0};
std::atomic<bool> g_sleeper_woken{false};
std::atomic<int> g_ticks{0};

void on_usr1(int) {
  g_usr1_count++;
}
void on_usr2(int) {
  g_usr2_count++;
}
void on_rt(int, siginfo_t*, void*) {
  g_rt_count++;
}

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

enum class Pattern { kSemi, kRandom, kText, kRecords };

// kRecords: 4096 "words" of 3-8 lowercase letters, the same in every run.
const std::vector<std::string>& record_words() {
  static const std::vector<std::string> words = [] {
    std::vector<std::string> w;
    uint64_t s = 42;
    for (int i = 0; i < 4096; i++) {
      s = splitmix(s);
      std::string word;
      for (uint64_t k = 0, len = 3 + s % 6; k < len; k++)
        word += static_cast<char>('a' + (splitmix(s + k + 1) % 26));
      w.push_back(word);
    }
    return w;
  }();
  return words;
}

// Content of page `n` is a pure function of n and the pattern, so verification recomputes it.
void fill_page(unsigned char* page, uint64_t n, Pattern pattern) {
  uint64_t* w = reinterpret_cast<uint64_t*>(page);
  switch (pattern) {
    case Pattern::kRandom:
      for (int i = 0; i < 512; i++) w[i] = splitmix(n * 512 + i);
      break;
    case Pattern::kSemi:
      for (int i = 0; i < 128; i++) w[i] = splitmix(n * 512 + i);
      std::memset(page + 1024, 0, 3072);
      w[511] = n;  // no two pages alike, so nothing dedups by accident
      break;
    case Pattern::kText: {
      static const char* words[] = {"lazy ",   "restore ", "page ", "fault ",
                                    "kernel ", "frame ",   "zstd ", "ptrace "};
      int pos = 0;
      uint64_t s = n;
      while (pos < 4096) {
        s = splitmix(s);
        const char* word = words[s % 8];
        for (const char* c = word; *c && pos < 4096; c++)
          page[pos++] = static_cast<unsigned char>(*c);
      }
      w[0] = n;
      break;
    }
    case Pattern::kRecords: {
      // A key-value store's heap (redis, memcached): records of a pointer-like word and a few
      // words of text. LZ4 keeps ~0.8 of it, zstd with its literals compressed ~0.7.
      const auto& words = record_words();
      size_t pos = 0;
      uint64_t s = splitmix(n + 77);
      while (pos < 4096) {
        s = splitmix(s);
        const uint64_t ptr = 0x00007f0000000000ull | ((s & 0xffffffffull) << 3);
        for (int b = 0; b < 8 && pos < 4096; b++)
          page[pos++] = static_cast<unsigned char>(ptr >> (8 * b));
        for (uint64_t k = 0, count = 2 + (s >> 40) % 5; k < count; k++) {
          const std::string& word = words[splitmix(s + k) % words.size()];
          for (char c : word)
            if (pos < 4096) page[pos++] = static_cast<unsigned char>(c);
          if (pos < 4096) page[pos++] = k + 1 == count ? '\0' : ' ';
        }
      }
      w[0] = n;
      break;
    }
  }
}

void* sleeper(void*) {
  struct timespec ts = {100000, 0};
  // Blocked here at dump time; a signal from main ends it.
  int rc = nanosleep(&ts, nullptr);
  if (rc != 0 && errno == EINTR) g_sleeper_woken = true;
  return nullptr;
}

void* ticker(void*) {
  for (;;) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
    g_ticks++;
  }
  return nullptr;
}

pid_t gettid_raw() {
  return static_cast<pid_t>(syscall(SYS_gettid));
}

std::atomic<pid_t> g_sleeper_tid{0}, g_ticker_tid{0};

void* sleeper_entry(void* a) {
  g_sleeper_tid = gettid_raw();
  return sleeper(a);
}
void* ticker_entry(void* a) {
  g_ticker_tid = gettid_raw();
  return ticker(a);
}

}  // namespace

int main(int argc, char** argv) {
  size_t mib = 8;
  Pattern pattern = Pattern::kSemi;
  std::string verify_file, workdir = "/tmp";
  bool with_pipe = false;
  bool with_shared = false;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value for %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--mib")
      mib = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--pattern") {
      std::string p = next();
      pattern = p == "random"    ? Pattern::kRandom
                : p == "text"    ? Pattern::kText
                : p == "records" ? Pattern::kRecords
                                 : Pattern::kSemi;
    } else if (a == "--verify-file")
      verify_file = next();
    else if (a == "--workdir")
      workdir = next();
    else if (a == "--pipe")
      with_pipe = true;
    else if (a == "--shared")
      with_shared = true;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }

  // Signal state: a counting handler, an ignored signal, an SA_SIGINFO real-time handler.
  struct sigaction sa = {};
  sa.sa_handler = on_usr1;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGHUP);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR1, &sa, nullptr);
  sa.sa_handler = on_usr2;
  sa.sa_flags = 0;
  sigaction(SIGUSR2, &sa, nullptr);
  signal(SIGTERM, SIG_IGN);
  struct sigaction rt = {};
  rt.sa_sigaction = on_rt;
  rt.sa_flags = SA_SIGINFO;
  sigemptyset(&rt.sa_mask);
  sigaction(SIGRTMIN + 1, &rt, nullptr);

  // Block SIGUSR2 and SIGRTMIN+1 in every thread (threads inherit the mask) so that they stay
  // pending: SIGUSR2 for the process, SIGRTMIN+1 for the main thread.
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGUSR2);
  sigaddset(&block, SIGRTMIN + 1);
  pthread_sigmask(SIG_BLOCK, &block, nullptr);

  // Memory: the patterned buffer, an area of touched zero pages, a heap block.
  size_t bytes = mib << 20;
  auto* buf = static_cast<unsigned char*>(
      mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) return 3;
  for (size_t p = 0; p < bytes / 4096; p++) fill_page(buf + p * 4096, p, pattern);
  size_t zbytes = 1 << 20;
  auto* zero = static_cast<unsigned char*>(
      mmap(nullptr, zbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (zero == MAP_FAILED) return 3;
  for (size_t p = 0; p < zbytes / 4096; p += 2) zero[p * 4096] = 0;  // written zero pages
  volatile unsigned char sink = 0;
  for (size_t p = 1; p < zbytes / 4096; p += 2) sink = sink + zero[p * 4096];  // zero-page reads
  std::vector<uint64_t> heap(100000);
  for (size_t i = 0; i < heap.size(); i++) heap[i] = splitmix(i ^ 0xabcdef);

  // Files: one at a position, one in append mode, /dev/null.
  std::string path = workdir + "/state_target.data";
  int file = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  std::string content(1000, 'x');
  for (size_t i = 0; i < content.size(); i++) content[i] = static_cast<char>('a' + i % 26);
  if (file < 0 || write(file, content.data(), content.size()) != 1000) return 3;
  lseek(file, 123, SEEK_SET);
  int append = open((workdir + "/state_target.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  int null = open("/dev/null", O_RDWR);
  if (append < 0 || null < 0) return 3;
  int pipefd[2] = {-1, -1};
  if (with_pipe && pipe(pipefd) != 0) return 3;

  // --shared: a shared anonymous area (every page written) and a memfd mapping with only
  // its even pages written (the odd ones are holes the dump must not store).
  constexpr size_t kSharedPages = 64, kMemfdPages = 64;
  unsigned char* shared = nullptr;
  unsigned char* memfd_map = nullptr;
  if (with_shared) {
    shared = static_cast<unsigned char*>(mmap(nullptr, kSharedPages * 4096, PROT_READ | PROT_WRITE,
                                              MAP_SHARED | MAP_ANONYMOUS, -1, 0));
    int mfd = memfd_create("lazycr-target", MFD_CLOEXEC);
    if (shared == MAP_FAILED || mfd < 0 || ftruncate(mfd, kMemfdPages * 4096) != 0) return 3;
    memfd_map = static_cast<unsigned char*>(
        mmap(nullptr, kMemfdPages * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0));
    if (memfd_map == MAP_FAILED) return 3;
    close(mfd);  // the mapping keeps the object alive; no descriptor to restore
    for (size_t p = 0; p < kSharedPages; p++) fill_page(shared + p * 4096, p + 1000000, pattern);
    for (size_t p = 0; p < kMemfdPages; p += 2)
      fill_page(memfd_map + p * 4096, p + 2000000, pattern);
  }

  pthread_t t1, t2;
  pthread_create(&t1, nullptr, sleeper_entry, nullptr);
  pthread_create(&t2, nullptr, ticker_entry, nullptr);
  while (g_sleeper_tid == 0 || g_ticker_tid == 0 || g_ticks < 2) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
  kill(getpid(), SIGUSR2);                                    // process-wide, stays pending
  syscall(SYS_tgkill, getpid(), gettid_raw(), SIGRTMIN + 1);  // main thread only, pending

  std::printf(
      "ready pid=%d tids=%d,%d,%d buf=%p:%zu zero=%p:%zu file=%d:123 append=%d null=%d "
      "usr1=%p rt=%d shared=%p:%zu memfd=%p:%zu\n",
      getpid(), getpid(), g_sleeper_tid.load(), g_ticker_tid.load(), static_cast<void*>(buf), bytes,
      static_cast<void*>(zero), zbytes, file, append, null, reinterpret_cast<void*>(&on_usr1),
      SIGRTMIN + 1, static_cast<void*>(shared), with_shared ? kSharedPages * 4096 : 0,
      static_cast<void*>(memfd_map), with_shared ? kMemfdPages * 4096 : 0);
  std::fflush(stdout);

  if (verify_file.empty()) {
    for (;;) pause();
  }
  struct stat st;
  while (stat(verify_file.c_str(), &st) != 0) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, nullptr);
  }

  std::string why;
  std::vector<unsigned char> expect(4096);
  for (size_t p = 0; p < bytes / 4096 && why.empty(); p++) {
    fill_page(expect.data(), p, pattern);
    if (std::memcmp(expect.data(), buf + p * 4096, 4096) != 0)
      why = "buffer page " + std::to_string(p);
  }
  for (size_t i = 0; i < zbytes && why.empty(); i++)
    if (zero[i] != 0) why = "zero area byte " + std::to_string(i);
  for (size_t p = 0; with_shared && p < kSharedPages && why.empty(); p++) {
    fill_page(expect.data(), p + 1000000, pattern);
    if (std::memcmp(expect.data(), shared + p * 4096, 4096) != 0)
      why = "shared page " + std::to_string(p);
  }
  for (size_t p = 0; with_shared && p < kMemfdPages && why.empty(); p++) {
    if (p % 2 == 0) {
      fill_page(expect.data(), p + 2000000, pattern);
    } else {
      std::memset(expect.data(), 0, 4096);
    }
    if (std::memcmp(expect.data(), memfd_map + p * 4096, 4096) != 0)
      why = "memfd page " + std::to_string(p);
  }
  for (size_t i = 0; i < heap.size() && why.empty(); i++)
    if (heap[i] != splitmix(i ^ 0xabcdef)) why = "heap word " + std::to_string(i);
  // Files: the position is where it was; the next read continues there.
  char c = 0;
  if (why.empty() && (read(file, &c, 1) != 1 || c != content[123])) why = "file position";
  if (why.empty() && write(append, "y", 1) != 1) why = "append fd";
  if (why.empty() && write(null, "z", 1) != 1) why = "/dev/null fd";
  // Signals: the pending ones arrive when unblocked, the handler still counts.
  pthread_sigmask(SIG_UNBLOCK, &block, nullptr);
  if (why.empty() && g_usr2_count != 1)
    why = "pending SIGUSR2 count " + std::to_string(g_usr2_count);
  if (why.empty() && g_rt_count != 1)
    why = "pending SIGRTMIN+1 count " + std::to_string(g_rt_count);
  raise(SIGUSR1);
  if (why.empty() && g_usr1_count != 1) why = "SIGUSR1 handler";
  // Threads: the ticker still ticks, the sleeper wakes on a signal.
  int ticks = g_ticks;
  for (int i = 0; i < 5000 && g_ticks < ticks + 3; i++) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
  if (why.empty() && g_ticks < ticks + 3) why = "ticker thread stopped";
  pthread_kill(t1, SIGUSR1);
  pthread_join(t1, nullptr);
  if (why.empty() && !g_sleeper_woken) why = "sleeper thread";
  if (why.empty() && sink != 0) why = "zero-page reads";

  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
