// A target for lazy restores: after the restore, while its pages are still owed by the page
// server (restore with --prefetch off), it changes its own layout on request and checks the
// content semantics of each change. It prints
//   ready pid=P remap=ADDR dontneed=ADDR unmap=ADDR fork=ADDR threads=ADDR plain=ADDR
//         big=ADDR:BYTES
// and then waits for commands: the file named by --cmd-file appears holding one word; the
// target removes it, runs the command and prints "<word> ok" or "<word> FAILED: why":
//   remap     mremap a never-touched area to a new address (MREMAP_FIXED) and check that it
//             holds the image's content there (a server that does not move owed pages on
//             REMAP serves zeros at the new address)
//   dontneed  MADV_DONTNEED an owed range and a served one of an area: both read zero, the
//             rest the image's content (a server that ignores REMOVE serves old content)
//   unmap     munmap the owed upper half of an area and grow the area back over it with
//             mremap (the new pages belong to the registered area and fault): they read zero,
//             not the old content (a server that ignores UNMAP serves it); and munmap + mmap
//             MAP_FIXED of a range in the middle reads zero
//   fork      fork: the child drops a range (MADV_DONTNEED), tells the parent, and checks
//             every page (dropped ones zero); the parent then checks every page (the child's
//             drop must not reach it), and the child's verdict
//   threads   N threads fault the same owed pages in the same order at once
//   forkwait  fork a child that touches nothing, print "forkwait ok child=PID"; the child
//             waits for the file <cmd-file>.child, removes it, checks every page of the fork
//             area and the --mib area (all owed by its own uffd) and prints "child ok" or
//             "child FAILED: why" (a child whose uffd was lost reads zeros)
//   all       check every page of every area not changed by a command (and the --mib area)
//   exit      exit 0
// Content: word k of the page at image address A is mix(A + 8k), except every 8th page of an
// area which is all zero (stored as a ZERO run). Commands run in any order, each at most once.
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

constexpr uint64_t P = 4096;
constexpr uint64_t kAreaPages = 256;  // 1 MiB per area
constexpr int kThreads = 4;

enum AreaId { kRemap, kDontneed, kUnmap, kFork, kThreadsArea, kPlain, kAreas };
const char* const kNames[kAreas] = {"remap", "dontneed", "unmap", "fork", "threads", "plain"};

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool zero_page(uint64_t index) {
  return index % 8 == 5;
}

// Fills the page at `at` with the content of the image page at address `image_addr`.
void fill(char* at, uint64_t image_addr, uint64_t index) {
  auto* w = reinterpret_cast<uint64_t*>(at);
  for (uint64_t k = 0; k < P / 8; k++) w[k] = zero_page(index) ? 0 : mix(image_addr + 8 * k);
}

// Does the page at `at` hold the image's page `index` of an area at `image_base`?
bool holds(const char* at, uint64_t image_base, uint64_t index) {
  const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(at);
  const uint64_t a = image_base + index * P;
  for (uint64_t k = 0; k < P / 8; k++)
    if (w[k] != (zero_page(index) ? 0 : mix(a + 8 * k))) return false;
  return true;
}

bool is_zero(const char* at) {
  const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(at);
  for (uint64_t k = 0; k < P / 8; k++)
    if (w[k] != 0) return false;
  return true;
}

char* g_area[kAreas];      // where each area is now
uint64_t g_image[kAreas];  // its address in the image (the content's key)
bool g_changed[kAreas];    // a command changed it: "all" skips it
char* g_big = nullptr;     // --mib area
uint64_t g_big_pages = 0;

// "" if pages [from, to) of area `id` (at `at`) hold their content, else the first bad page.
std::string check(const char* at, uint64_t image_base, uint64_t from, uint64_t to,
                  const char* what) {
  for (uint64_t i = from; i < to; i++)
    if (!holds(at + i * P, image_base, i))
      return std::string(what) + " page " + std::to_string(i) +
             (is_zero(at + i * P) ? " reads zero" : " holds wrong content");
  return "";
}

// "" if pages [from, to) at `at` read zero, else the first that does not (and whether it holds
// the image's old content, as a server that missed an event would serve).
std::string check_zero(const char* at, uint64_t image_base, uint64_t from, uint64_t to,
                       const char* what) {
  for (uint64_t i = from; i < to; i++)
    if (!is_zero(at + i * P))
      return std::string(what) + " page " + std::to_string(i) +
             (holds(at + i * P, image_base, i) ? " holds the image's old content" : " is not zero");
  return "";
}

// A free address range of `len` bytes (reserved PROT_NONE; MREMAP_FIXED replaces it).
char* reserve(uint64_t len) {
  void* p = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
}

std::string cmd_remap() {
  const uint64_t len = kAreaPages * P;
  char* old = g_area[kRemap];
  // A few pages served before the move, the rest still owed.
  std::string why = check(old, g_image[kRemap], 0, 4, "before the move:");
  if (!why.empty()) return why;
  char* dest = reserve(len + (1 << 20));
  if (dest == nullptr) return "no room for the move";
  dest += 1 << 20;  // not adjacent to anything of ours
  void* r = mremap(old, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, dest);
  if (r != dest) return std::string("mremap: ") + std::strerror(errno);
  g_area[kRemap] = dest;
  g_changed[kRemap] = true;
  return check(dest, g_image[kRemap], 0, kAreaPages, "after the move:");
}

std::string cmd_dontneed() {
  char* a = g_area[kDontneed];
  std::string why = check(a, g_image[kDontneed], 0, 2, "before:");
  if (!why.empty()) return why;
  // [0, 2) served, [40, 80) owed: both dropped by the program.
  if (madvise(a, 2 * P, MADV_DONTNEED) != 0 || madvise(a + 40 * P, 40 * P, MADV_DONTNEED) != 0)
    return std::string("madvise: ") + std::strerror(errno);
  g_changed[kDontneed] = true;
  why = check_zero(a, g_image[kDontneed], 0, 2, "dropped served");
  if (why.empty()) why = check_zero(a, g_image[kDontneed], 40, 80, "dropped owed");
  if (why.empty()) why = check(a, g_image[kDontneed], 2, 40, "kept");
  if (why.empty()) why = check(a, g_image[kDontneed], 80, kAreaPages, "kept");
  return why;
}

std::string cmd_unmap() {
  char* a = g_area[kUnmap];
  const uint64_t half = kAreaPages / 2;
  std::string why = check(a, g_image[kUnmap], 0, 1, "before:");
  if (!why.empty()) return why;
  g_changed[kUnmap] = true;
  // The owed upper half goes; the area grows back over it in place.
  if (munmap(a + half * P, half * P) != 0) return std::string("munmap: ") + std::strerror(errno);
  void* r = mremap(a, half * P, kAreaPages * P, 0);
  if (r != a) return std::string("mremap growing in place: ") + std::strerror(errno);
  why = check_zero(a, g_image[kUnmap], half, kAreaPages, "regrown");
  if (!why.empty()) return why;
  // A range in the middle unmapped and mapped anew.
  if (munmap(a + 16 * P, 16 * P) != 0) return std::string("munmap: ") + std::strerror(errno);
  void* m = mmap(a + 16 * P, 16 * P, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  if (m != a + 16 * P) return std::string("mmap MAP_FIXED: ") + std::strerror(errno);
  why = check_zero(a, g_image[kUnmap], 16, 32, "mapped anew");
  if (why.empty()) why = check(a, g_image[kUnmap], 0, 16, "kept");
  if (why.empty()) why = check(a, g_image[kUnmap], 32, half, "kept");
  return why;
}

std::string cmd_fork() {
  char* a = g_area[kFork];
  const uint64_t base = g_image[kFork];
  std::string why = check(a, base, 0, 4, "parent before the fork:");
  if (!why.empty()) return why;
  int dropped[2], verdict[2];
  if (pipe(dropped) != 0 || pipe(verdict) != 0) return "pipe failed";
  std::fflush(stdout);
  pid_t child = fork();
  if (child < 0) return std::string("fork: ") + std::strerror(errno);
  if (child == 0) {
    close(dropped[0]);
    close(verdict[0]);
    std::string cwhy;
    if (madvise(a + 64 * P, 16 * P, MADV_DONTNEED) != 0) cwhy = "child madvise failed";
    (void)!write(dropped[1], "d", 1);
    if (cwhy.empty()) cwhy = check_zero(a, base, 64, 80, "child: dropped");
    if (cwhy.empty()) cwhy = check(a, base, 0, 64, "child:");
    if (cwhy.empty()) cwhy = check(a, base, 80, kAreaPages, "child:");
    if (cwhy.empty()) cwhy = "ok";
    (void)!write(verdict[1], cwhy.data(), cwhy.size());
    _exit(cwhy == "ok" ? 0 : 1);
  }
  close(dropped[1]);
  close(verdict[1]);
  char c = 0;
  if (read(dropped[0], &c, 1) != 1) why = "the child died before dropping its range";
  // Every page, the child's dropped range included: the parent still owes it.
  if (why.empty()) why = check(a, base, 0, kAreaPages, "parent:");
  std::string cv;
  char buf[256];
  ssize_t n;
  while ((n = read(verdict[0], buf, sizeof buf)) > 0) cv.append(buf, static_cast<size_t>(n));
  int status = 0;
  waitpid(child, &status, 0);
  close(dropped[0]);
  close(verdict[0]);
  if (why.empty() && cv != "ok") why = cv.empty() ? "the child gave no verdict" : cv;
  if (why.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    why = "the child exited with status " + std::to_string(status);
  return why;
}

std::string cmd_forkwait(const std::string& cmd_file, pid_t* child_out) {
  std::fflush(stdout);
  pid_t child = fork();
  if (child < 0) return std::string("fork: ") + std::strerror(errno);
  if (child == 0) {
    const std::string file = cmd_file + ".child";
    struct stat st;
    while (stat(file.c_str(), &st) != 0) {
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, nullptr);
    }
    unlink(file.c_str());
    std::string why = check(g_area[kFork], g_image[kFork], 0, kAreaPages, "child: fork area");
    if (why.empty() && g_big != nullptr)
      why = check(g_big, reinterpret_cast<uint64_t>(g_big), 0, g_big_pages, "child: big area");
    std::printf("child %s\n", why.empty() ? "ok" : ("FAILED: " + why).c_str());
    std::fflush(stdout);
    _exit(0);
  }
  *child_out = child;
  return "";
}

std::atomic<int> g_arrived{0};
std::atomic<bool> g_start{false};

void* thread_main(void* arg) {
  auto* why = static_cast<std::string*>(arg);
  g_arrived++;
  while (!g_start) {
  }
  *why = check(g_area[kThreadsArea], g_image[kThreadsArea], 0, kAreaPages, "thread:");
  return nullptr;
}

std::string cmd_threads() {
  pthread_t t[kThreads];
  std::string why[kThreads];
  for (int i = 0; i < kThreads; i++)
    if (pthread_create(&t[i], nullptr, thread_main, &why[i]) != 0) return "pthread_create failed";
  while (g_arrived < kThreads) {
  }
  g_start = true;
  for (int i = 0; i < kThreads; i++) pthread_join(t[i], nullptr);
  for (auto& w : why)
    if (!w.empty()) return w;
  return "";
}

std::string cmd_all() {
  for (int id = 0; id < kAreas; id++) {
    if (g_changed[id]) continue;
    std::string why = check(g_area[id], g_image[id], 0, kAreaPages, kNames[id]);
    if (!why.empty()) return why;
  }
  if (g_big != nullptr) {
    std::string why = check(g_big, reinterpret_cast<uint64_t>(g_big), 0, g_big_pages, "big area");
    if (!why.empty()) return why;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::string cmd_file;
  uint64_t mib = 0;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--cmd-file" && i + 1 < argc) {
      cmd_file = argv[++i];
    } else if (a == "--mib" && i + 1 < argc) {
      mib = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: lazy_events_target --cmd-file FILE [--mib N]\n");
      return 2;
    }
  }
  if (cmd_file.empty()) {
    std::fprintf(stderr, "lazy_events_target: --cmd-file is required\n");
    return 2;
  }
  // Areas one guard page apart (PROT_NONE between them: no two merge into one VMA).
  const uint64_t stride = (kAreaPages + 1) * P;
  char* base = reserve(stride * kAreas);
  if (base == nullptr) return 3;
  for (int id = 0; id < kAreas; id++) {
    char* a = base + id * stride;
    if (mmap(a, kAreaPages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) != a)
      return 3;
    madvise(a, kAreaPages * P, MADV_NOHUGEPAGE);
    for (uint64_t i = 0; i < kAreaPages; i++)
      fill(a + i * P, reinterpret_cast<uint64_t>(a) + i * P, i);
    g_area[id] = a;
    g_image[id] = reinterpret_cast<uint64_t>(a);
  }
  if (mib > 0) {
    g_big_pages = mib * 256;
    void* p =
        mmap(nullptr, g_big_pages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 3;
    g_big = static_cast<char*>(p);
    for (uint64_t i = 0; i < g_big_pages; i++)
      fill(g_big + i * P, reinterpret_cast<uint64_t>(g_big) + i * P, i);
  }
  std::printf("ready pid=%d", getpid());
  for (int id = 0; id < kAreas; id++) std::printf(" %s=%p", kNames[id], g_area[id]);
  std::printf(" big=%p:%llu\n", static_cast<void*>(g_big),
              static_cast<unsigned long long>(g_big_pages * P));
  std::fflush(stdout);

  bool done[16] = {};
  for (;;) {
    struct stat st;
    if (stat(cmd_file.c_str(), &st) != 0) {
      struct timespec ts = {0, 1000000};
      nanosleep(&ts, nullptr);
      continue;
    }
    std::string word;
    {
      std::ifstream in(cmd_file);
      in >> word;
    }
    unlink(cmd_file.c_str());
    static const char* const kCmds[] = {"remap",   "dontneed", "unmap", "fork",
                                        "threads", "all",      "exit",  "forkwait"};
    int which = -1;
    pid_t forked = 0;
    for (int i = 0; i < 8; i++)
      if (word == kCmds[i]) which = i;
    if (which < 0) {
      std::printf("%s FAILED: unknown command\n", word.c_str());
      std::fflush(stdout);
      continue;
    }
    if (which == 6) return 0;
    std::string why;
    if (done[which] && which != 5) {
      why = "already done";
    } else {
      done[which] = true;
      switch (which) {
        case 0:
          why = cmd_remap();
          break;
        case 1:
          why = cmd_dontneed();
          break;
        case 2:
          why = cmd_unmap();
          break;
        case 3:
          why = cmd_fork();
          break;
        case 4:
          why = cmd_threads();
          break;
        case 5:
          why = cmd_all();
          break;
        case 7:
          why = cmd_forkwait(cmd_file, &forked);
          break;
      }
    }
    if (why.empty() && forked > 0)
      std::printf("%s ok child=%d\n", word.c_str(), forked);
    else if (why.empty())
      std::printf("%s ok\n", word.c_str());
    else
      std::printf("%s FAILED: %s\n", word.c_str(), why.c_str());
    std::fflush(stdout);
  }
}
