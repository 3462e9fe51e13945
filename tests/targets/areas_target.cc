// A target with many memory areas of every kind a restore maps differently (and two
// neighbouring private areas the kernel keeps apart, which a restore must not merge):
// --areas N private anonymous areas (alternating protections so the kernel keeps them apart,
// a few written pages each), a shared anonymous area, a memfd area mapped twice (the two
// mappings must stay one object), a written private mapping of a file (copy-on-write pages
// over file pages), a shared mapping of a file, and --mib M of patterned anonymous memory.
// It prints
//   ready pid=P areas=N
// then waits for --verify-file, checks every byte and the sharing, prints "verified ok" or
// "verify FAILED: why", and exits 0 or 1.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void fill(unsigned char* p, size_t bytes, uint64_t seed) {
  auto* w = reinterpret_cast<uint64_t*>(p);
  for (size_t i = 0; i < bytes / 8; i++) w[i] = mix(seed * 1000003 + i);
}

bool check(const unsigned char* p, size_t bytes, uint64_t seed) {
  auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < bytes / 8; i++)
    if (w[i] != mix(seed * 1000003 + i)) return false;
  return true;
}

void* map(size_t len, int prot, int flags, int fd = -1, off_t off = 0) {
  void* p = mmap(nullptr, len, prot, flags, fd, off);
  if (p == MAP_FAILED) {
    std::perror("mmap");
    std::exit(3);
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  size_t areas = 100, mib = 0;
  std::string verify_file, workdir = "/tmp";
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) std::exit(2);
      return argv[++i];
    };
    if (a == "--areas")
      areas = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--mib")
      mib = std::strtoull(next().c_str(), nullptr, 10);
    else if (a == "--verify-file")
      verify_file = next();
    else if (a == "--workdir")
      workdir = next();
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }

  // Many small private areas: 3 pages each, the first two written, protections alternating
  // (rw-, r--) so that neighbours never merge into one area.
  std::vector<unsigned char*> small(areas);
  for (size_t i = 0; i < areas; i++) {
    small[i] = static_cast<unsigned char*>(
        map(3 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
    fill(small[i], 2 * kPage, 100 + i);
    if (i % 2) mprotect(small[i], 3 * kPage, PROT_READ);
  }

  // Two neighbouring areas the kernel keeps apart although they look alike: each got its
  // pages (and its anon_vma) before B was moved next to A. A third one, never touched, follows.
  auto* pair = static_cast<unsigned char*>(
      map(8 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  auto* b = static_cast<unsigned char*>(
      map(4 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  fill(pair, 4 * kPage, 11);
  fill(b, 4 * kPage, 12);
  munmap(pair + 4 * kPage, 4 * kPage);  // A = pair[0..4 pages), a hole after it
  if (mremap(b, 4 * kPage, 4 * kPage, MREMAP_MAYMOVE | MREMAP_FIXED, pair + 4 * kPage) ==
      MAP_FAILED) {
    std::perror("mremap");
    return 3;
  }

  // Shared anonymous memory.
  size_t shared_len = 64 * kPage;
  auto* shared = static_cast<unsigned char*>(
      map(shared_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS));
  fill(shared, shared_len, 7);

  // A memfd mapped twice: writes through one mapping show through the other.
  int mfd = static_cast<int>(syscall(SYS_memfd_create, "areas_target", 0));
  if (mfd < 0 || ftruncate(mfd, 16 * kPage) != 0) return 3;
  auto* m1 = static_cast<unsigned char*>(map(16 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, mfd));
  auto* m2 = static_cast<unsigned char*>(map(16 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, mfd));
  fill(m1, 16 * kPage, 8);
  close(mfd);

  // A file mapped privately (some pages written: copy-on-write) and shared.
  std::string path = workdir + "/areas_target.data";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  std::vector<unsigned char> content(32 * kPage);
  fill(content.data(), content.size(), 9);
  if (fd < 0 || write(fd, content.data(), content.size()) != static_cast<ssize_t>(content.size()))
    return 3;
  auto* priv =
      static_cast<unsigned char*>(map(32 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd));
  fill(priv + 4 * kPage, 4 * kPage, 10);  // pages 4-7 now differ from the file
  auto* shf = static_cast<unsigned char*>(map(32 * kPage, PROT_READ, MAP_SHARED, fd));
  close(fd);

  // Bulk memory for the benchmark.
  size_t bulk_len = mib << 20;
  unsigned char* bulk = nullptr;
  if (bulk_len) {
    bulk = static_cast<unsigned char*>(
        map(bulk_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
    for (size_t off = 0; off < bulk_len; off += kPage)
      fill(bulk + off, 1024, 1000000 + off / kPage);
  }

  std::printf("ready pid=%d areas=%zu\n", getpid(), areas);
  std::fflush(stdout);
  struct stat st;
  while (stat(verify_file.c_str(), &st) != 0) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, nullptr);
  }

  std::string why;
  for (size_t i = 0; i < areas && why.empty(); i++) {
    if (!check(small[i], 2 * kPage, 100 + i)) why = "small area " + std::to_string(i);
    for (size_t b = 2 * kPage; b < 3 * kPage && why.empty(); b++)
      if (small[i][b] != 0) why = "untouched page of small area " + std::to_string(i);
  }
  if (why.empty() && (!check(pair, 4 * kPage, 11) || !check(pair + 4 * kPage, 4 * kPage, 12)))
    why = "the pair of neighbouring areas";
  if (why.empty() && !check(shared, shared_len, 7)) why = "shared anonymous area";
  if (why.empty() && !check(m2, 16 * kPage, 8)) why = "second memfd mapping";
  if (why.empty()) {
    m1[5] ^= 0xff;  // still one object?
    if (m2[5] != m1[5]) why = "the two memfd mappings no longer share";
    m1[5] ^= 0xff;
  }
  if (why.empty() && (!check(priv + 4 * kPage, 4 * kPage, 10) ||
                      std::memcmp(priv, content.data(), 4 * kPage) != 0 ||
                      std::memcmp(priv + 8 * kPage, content.data() + 8 * kPage, 24 * kPage) != 0))
    why = "private file mapping";
  if (why.empty() && std::memcmp(shf, content.data(), content.size()) != 0)
    why = "shared file mapping";
  for (size_t off = 0; off < bulk_len && why.empty(); off += kPage)
    if (!check(bulk + off, 1024, 1000000 + off / kPage))
      why = "bulk page " + std::to_string(off / kPage);

  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
