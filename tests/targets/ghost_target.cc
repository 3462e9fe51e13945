// Files no path leads to any more, which a restore must bring back from the image (ghosts), in
// --workdir DIR (run it from a copy of itself in DIR: it deletes its own executable):
//   DIR/held:  a deleted file held open (10000 patterned bytes, position 1234);
//   a memfd "ghost-memfd" held as fd, mapped shared and sealed (SHRINK|GROW), position 777;
//   a memfd "plain-memfd" held as fd only, made without sealing (F_SEAL_SEAL);
//   DIR/lib:   a deleted file mapped private (2 pages, the first written since: copy on write);
//   /dev/shm/lazycr-ghost-PID: deleted, mapped shared (a POSIX semaphore's kind of file);
//   /dev/shm/lazycr-kept-PID: not deleted, mapped shared (its contents live in the file; the
//              test removes it);
//   DIR/cwd:   its working directory, deleted;
//   its executable, deleted.
// It prints "ready pid=P" and, on SIGUSR1, checks everything from inside: contents byte for
// byte, positions, /proc/self/fd link names "(deleted)", seals, that writes through the memfd
// descriptor show in its mapping. Prints "verified ok" or "verify FAILED: why"; exits 0 or 1.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

constexpr size_t kPage = 4096;
std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

unsigned char pattern(size_t i, unsigned seed) {
  return static_cast<unsigned char>((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}
void fill(unsigned char* p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) p[i] = pattern(i, seed);
}
bool same(const unsigned char* p, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != pattern(i, seed)) return false;
  return true;
}

std::string link_of(const std::string& path) {
  char buf[4096];
  ssize_t n = readlink(path.c_str(), buf, sizeof buf - 1);
  return n < 0 ? std::string("error ") + std::strerror(errno) : std::string(buf, n);
}
std::string fd_link(int fd) {
  return link_of("/proc/self/fd/" + std::to_string(fd));
}

uint64_t hash_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) return 0;
  uint64_t h = 1469598103934665603ull;
  unsigned char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0)
    for (ssize_t i = 0; i < n; i++) h = (h ^ buf[i]) * 1099511628211ull;
  close(fd);
  return h;
}

bool die(const char* what) {
  std::printf("setup FAILED: %s: %s\n", what, std::strerror(errno));
  std::fflush(stdout);
  return false;
}

struct State {
  std::string dir, held_path, lib_path, shm_path, kept_path, cwd_path, exe_path;
  int held = -1, memfd = -1, plain = -1;
  unsigned char *memfd_map = nullptr, *lib_map = nullptr, *shm_map = nullptr, *kept_map = nullptr;
  uint64_t exe_hash = 0;
};

bool setup(State& s) {
  s.exe_path = link_of("/proc/self/exe");
  s.exe_hash = hash_file("/proc/self/exe");
  unsigned char buf[10000];

  s.held_path = s.dir + "/held";
  s.held = open(s.held_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0640);
  if (s.held < 0) return die("open held");
  fill(buf, sizeof buf, 1);
  if (write(s.held, buf, sizeof buf) != sizeof buf) return die("write held");
  if (lseek(s.held, 1234, SEEK_SET) != 1234) return die("lseek held");

  s.memfd = memfd_create("ghost-memfd", MFD_ALLOW_SEALING);
  if (s.memfd < 0) return die("memfd_create");
  if (ftruncate(s.memfd, 3 * kPage) != 0) return die("ftruncate memfd");
  s.memfd_map = static_cast<unsigned char*>(
      mmap(nullptr, 3 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, s.memfd, 0));
  if (s.memfd_map == MAP_FAILED) return die("mmap memfd");
  fill(s.memfd_map, 3 * kPage, 2);
  if (fcntl(s.memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) return die("seal memfd");
  if (lseek(s.memfd, 777, SEEK_SET) != 777) return die("lseek memfd");

  s.plain = memfd_create("plain-memfd", 0);
  if (s.plain < 0) return die("memfd_create plain");
  fill(buf, 5000, 3);
  if (write(s.plain, buf, 5000) != 5000) return die("write plain");

  s.lib_path = s.dir + "/lib";
  int lib = open(s.lib_path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0755);
  if (lib < 0) return die("open lib");
  unsigned char page[kPage];
  for (int i = 0; i < 2; i++) {
    fill(page, kPage, 10 + i);
    if (write(lib, page, kPage) != kPage) return die("write lib");
  }
  s.lib_map = static_cast<unsigned char*>(
      mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE, lib, 0));
  if (s.lib_map == MAP_FAILED) return die("mmap lib");
  close(lib);
  fill(s.lib_map, kPage, 20);  // the first page is the process's own now

  s.shm_path = "/dev/shm/lazycr-ghost-" + std::to_string(getpid());
  int shm = open(s.shm_path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (shm < 0) return die("open /dev/shm file");
  if (ftruncate(shm, kPage) != 0) return die("ftruncate shm");
  s.shm_map =
      static_cast<unsigned char*>(mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_SHARED, shm, 0));
  if (s.shm_map == MAP_FAILED) return die("mmap shm");
  close(shm);
  fill(s.shm_map, 32, 4);  // a semaphore's 32 bytes

  s.kept_path = "/dev/shm/lazycr-kept-" + std::to_string(getpid());
  int kept = open(s.kept_path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (kept < 0) return die("open kept /dev/shm file");
  if (ftruncate(kept, 2 * kPage) != 0) return die("ftruncate kept");
  s.kept_map = static_cast<unsigned char*>(
      mmap(nullptr, 2 * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, kept, 0));
  if (s.kept_map == MAP_FAILED) return die("mmap kept");
  close(kept);
  fill(s.kept_map, 2 * kPage, 5);

  s.cwd_path = s.dir + "/cwd";
  if (mkdir(s.cwd_path.c_str(), 0750) != 0 || chdir(s.cwd_path.c_str()) != 0)
    return die("mkdir/chdir cwd");

  if (unlink(s.held_path.c_str()) != 0 || unlink(s.lib_path.c_str()) != 0 ||
      unlink(s.shm_path.c_str()) != 0 || rmdir(s.cwd_path.c_str()) != 0 ||
      unlink(s.exe_path.c_str()) != 0)
    return die("deleting");
  return true;
}

std::string verify(State& s) {
  const std::string del = " (deleted)";
  unsigned char buf[10000];
  if (fd_link(s.held) != s.held_path + del) return "held fd link: " + fd_link(s.held);
  if (lseek(s.held, 0, SEEK_CUR) != 1234) return "held position";
  if (pread(s.held, buf, sizeof buf, 0) != sizeof buf || !same(buf, sizeof buf, 1))
    return "held contents";
  struct stat st;
  if (fstat(s.held, &st) != 0 || st.st_size != 10000 || (st.st_mode & 0777) != 0640 ||
      st.st_nlink != 0)
    return "held stat";

  if (fd_link(s.memfd) != "/memfd:ghost-memfd" + del) return "memfd link: " + fd_link(s.memfd);
  if (lseek(s.memfd, 0, SEEK_CUR) != 777) return "memfd position";
  if (fcntl(s.memfd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW)) return "memfd seals";
  if (!same(s.memfd_map, 3 * kPage, 2)) return "memfd mapping contents";
  if (pread(s.memfd, buf, kPage, kPage) != kPage ||
      std::memcmp(buf, s.memfd_map + kPage, kPage) != 0)
    return "memfd contents through the descriptor";
  const char word[] = "written through the descriptor";
  if (pwrite(s.memfd, word, sizeof word, 2 * kPage + 5) != sizeof word) return "memfd pwrite";
  if (std::memcmp(s.memfd_map + 2 * kPage + 5, word, sizeof word) != 0)
    return "a write through the memfd descriptor is not in its mapping (two objects)";
  if (ftruncate(s.memfd, kPage) == 0 || errno != EPERM) return "memfd shrink seal not enforced";

  if (fd_link(s.plain) != "/memfd:plain-memfd" + del) return "plain memfd link";
  if (fcntl(s.plain, F_GET_SEALS) != F_SEAL_SEAL) return "plain memfd seals";
  if (lseek(s.plain, 0, SEEK_CUR) != 5000) return "plain memfd position";
  if (pread(s.plain, buf, 5000, 0) != 5000 || !same(buf, 5000, 3)) return "plain memfd contents";

  if (!same(s.lib_map, kPage, 20)) return "private mapping: the written page";
  if (!same(s.lib_map + kPage, kPage, 11)) return "private mapping: the file's page";
  if (!same(s.shm_map, 32, 4)) return "/dev/shm mapping contents";
  if (!same(s.kept_map, 2 * kPage, 5)) return "kept /dev/shm mapping contents";
  s.kept_map[100] ^= 0xff;  // reaches the file: the mapping is the file's
  int kept = open(s.kept_path.c_str(), O_RDONLY);
  unsigned char byte = 0;
  if (kept < 0 || pread(kept, &byte, 1, 100) != 1 || byte != s.kept_map[100])
    return "kept /dev/shm mapping is not the file";
  close(kept);

  if (link_of("/proc/self/cwd") != s.cwd_path + del) return "cwd: " + link_of("/proc/self/cwd");
  if (link_of("/proc/self/exe") != s.exe_path + del) return "exe: " + link_of("/proc/self/exe");
  if (hash_file("/proc/self/exe") != s.exe_hash) return "exe contents";

  // The maps name the deleted files as before.
  FILE* maps = fopen("/proc/self/maps", "r");
  if (maps == nullptr) return "cannot read maps";
  std::string all;
  char line[4096];
  while (fgets(line, sizeof line, maps)) all += line;
  fclose(maps);
  for (const std::string& name : {s.lib_path + del, s.shm_path + del, s.exe_path + del,
                                  std::string("/memfd:ghost-memfd") + del})
    if (all.find(name) == std::string::npos) return "maps lack " + name;
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  State s;
  s.dir = ".";
  for (int i = 1; i + 1 < argc; i++)
    if (std::string(argv[i]) == "--workdir") s.dir = argv[i + 1];
  struct sigaction sa {};
  sa.sa_handler = on_usr1;
  sigaction(SIGUSR1, &sa, nullptr);
  if (!setup(s)) return 1;
  std::printf("ready pid=%d\n", getpid());
  std::fflush(stdout);
  while (!g_verify) {
    struct timespec ts {
      0, 2000000
    };
    nanosleep(&ts, nullptr);
  }
  std::string why = verify(s);
  if (why.empty())
    std::printf("verified ok\n");
  else
    std::printf("verify FAILED: %s\n", why.c_str());
  std::fflush(stdout);
  return why.empty() ? 0 : 1;
}
