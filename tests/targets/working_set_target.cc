// A target for working-set prefetch (tests/e2e/working_set_e2e.cc): a --mib area of patterned
// pages (word k of the page at address A is mix(A + 8k)). It prints
//   ready pid=P base=ADDR pages=N
// and waits for commands: the file named by --cmd-file appears holding one word; the target
// removes it, runs the command and prints "<word> ok" or "<word> FAILED: why":
//   touch  reads (and checks) a fixed scattered eighth of the pages, in a fixed order that
//          is not the address order (page (k * 7919) mod N for k < N/8), one page per 64 KiB
//          window at most, so that a lazy restore serves each with a fault of its own
//   all    checks every page
//   exit   exit 0
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace {

constexpr uint64_t P = 4096;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

char* g_base = nullptr;
uint64_t g_pages = 0;

bool holds(uint64_t index) {
  const volatile uint64_t* w = reinterpret_cast<const volatile uint64_t*>(g_base + index * P);
  const uint64_t a = reinterpret_cast<uint64_t>(g_base) + index * P;
  for (uint64_t k = 0; k < P / 8; k++)
    if (w[k] != mix(a + 8 * k)) return false;
  return true;
}

std::string cmd_touch() {
  // Pages 16j (j = (k * 7919) mod (N/16)): one per 64 KiB, in a scattered order.
  const uint64_t windows = g_pages / 16;
  for (uint64_t k = 0; k < windows; k++) {
    const uint64_t i = (k * 7919 % windows) * 16;
    if (!holds(i)) return "page " + std::to_string(i) + " differs";
  }
  return "";
}

std::string cmd_all() {
  for (uint64_t i = 0; i < g_pages; i++)
    if (!holds(i)) return "page " + std::to_string(i) + " differs";
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  std::string cmd_file;
  uint64_t mib = 64;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--cmd-file" && i + 1 < argc) {
      cmd_file = argv[++i];
    } else if (a == "--mib" && i + 1 < argc) {
      mib = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: working_set_target --cmd-file FILE [--mib N]\n");
      return 2;
    }
  }
  if (cmd_file.empty() || mib == 0) return 2;
  g_pages = mib * 256;
  void* p = mmap(nullptr, g_pages * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return 3;
  g_base = static_cast<char*>(p);
  madvise(g_base, g_pages * P, MADV_NOHUGEPAGE);
  for (uint64_t i = 0; i < g_pages; i++) {
    auto* w = reinterpret_cast<uint64_t*>(g_base + i * P);
    const uint64_t a = reinterpret_cast<uint64_t>(g_base) + i * P;
    for (uint64_t k = 0; k < P / 8; k++) w[k] = mix(a + 8 * k);
  }
  std::printf("ready pid=%d base=%p pages=%llu\n", getpid(), p,
              static_cast<unsigned long long>(g_pages));
  std::fflush(stdout);
  for (;;) {
    struct stat st;
    if (stat(cmd_file.c_str(), &st) != 0) {
      usleep(2000);
      continue;
    }
    std::string word;
    {
      std::ifstream in(cmd_file);
      in >> word;
    }
    unlink(cmd_file.c_str());
    std::string why;
    if (word == "touch") {
      why = cmd_touch();
    } else if (word == "all") {
      why = cmd_all();
    } else if (word == "exit") {
      return 0;
    } else {
      why = "unknown command";
    }
    std::printf("%s %s\n", word.c_str(), why.empty() ? "ok" : ("FAILED: " + why).c_str());
    std::fflush(stdout);
  }
}
