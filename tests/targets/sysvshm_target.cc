// SysV shared memory a restore must give back with key, id, mode, size and contents:
//   A: key 0x5a5a0000 | (pid & 0xffff), mode 0640, 5 pages + 100 bytes, attached at kAddrA;
//   B: IPC_PRIVATE, mode 0600, 3 pages, attached at kAddrB and marked for removal (IPC_RMID).
// Both hold a byte pattern. A child forked after that inherits both attaches and attaches A a
// second time at kAddrA2. Prints "ready pid=P child=C key=K ida=I idb=J". On SIGUSR1 (the
// parent forwards it to the child) each checks from inside: shmctl(IPC_STAT) key, mode, size,
// attach count, the ids are the original ones, every byte of the pattern; then the parent
// writes a byte the child must see through both its attaches of A and the child one the
// parent must see (shared, not copies). The parent prints "verified ok" or "verify FAILED:
// why" (the child's failure comes as its exit code), removes A and exits 0 or 1.
#include <signal.h>
#include <sys/shm.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

char* const kAddrA = reinterpret_cast<char*>(0x5e0000000000ull);
char* const kAddrA2 = reinterpret_cast<char*>(0x5e1000000000ull);
char* const kAddrB = reinterpret_cast<char*>(0x5d0000000000ull);  // below A: created first
constexpr size_t kSizeA = 5 * 4096 + 100;
constexpr size_t kSizeB = 3 * 4096;
// The last bytes of A carry the sharing handshake, outside the pattern.
constexpr size_t kPatternA = kSizeA - 16;
constexpr size_t kParentSlot = kSizeA - 8;
constexpr size_t kChildSlot = kSizeA - 4;

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

unsigned char pattern(size_t i, int salt) {
  return static_cast<unsigned char>((i * 131 + salt + (i >> 12)) & 0xff);
}

void wait_flag() {
  while (!g_verify) {
    timespec ts{0, 5000000};
    nanosleep(&ts, nullptr);
  }
}

// Spins until the byte at p reads want (any non-zero value for 0): the other process writes it
// once.
void wait_byte(volatile char* p, char want) {
  while (want == 0 ? *p == 0 : *p != want) {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
  }
}

std::string check_segment(int id, int key, unsigned mode, size_t size, unsigned long nattch,
                          bool dest, const char* name) {
  struct shmid_ds ds;
  if (shmctl(id, IPC_STAT, &ds) != 0)
    return std::string(name) + ": IPC_STAT of the original id: " + std::strerror(errno);
  char buf[256];
  if (ds.shm_perm.__key != key || (ds.shm_perm.mode & 0777) != mode || ds.shm_segsz != size ||
      ds.shm_nattch != nattch || ((ds.shm_perm.mode & SHM_DEST) != 0) != dest) {
    std::snprintf(buf, sizeof buf,
                  "%s: key %#x mode %#o size %zu nattch %lu (want %#x %#o%s %zu %lu)", name,
                  static_cast<unsigned>(ds.shm_perm.__key), ds.shm_perm.mode,
                  static_cast<size_t>(ds.shm_segsz), static_cast<unsigned long>(ds.shm_nattch),
                  static_cast<unsigned>(key), mode, dest ? "+SHM_DEST" : "", size, nattch);
    return buf;
  }
  return "";
}

std::string check_content(const char* base, size_t len, int salt, const char* name) {
  for (size_t i = 0; i < len; i++)
    if (static_cast<unsigned char>(base[i]) != pattern(i, salt))
      return std::string(name) + ": byte " + std::to_string(i) + " differs";
  return "";
}

std::string check_all(int key, int ida, int idb, bool child) {
  std::string why;
  auto add = [&](const std::string& w) {
    if (why.empty()) why = w;
  };
  add(check_segment(ida, key, 0640, kSizeA, 3, false, "segment A"));
  add(check_segment(idb, IPC_PRIVATE, 0600, kSizeB, 2, true, "segment B"));
  if (shmget(key, 0, 0) != ida) add("shmget(key) does not find the original id of A");
  add(check_content(kAddrA, kPatternA, 1, "A"));
  add(check_content(kAddrB, kSizeB, 2, "B"));
  if (child) add(check_content(kAddrA2, kPatternA, 1, "A (second attach)"));
  return why;
}

}  // namespace

int main() {
  const int key = static_cast<int>(0x5a5a0000u | (getpid() & 0xffff));
  int idb = shmget(IPC_PRIVATE, kSizeB, IPC_CREAT | 0600);
  int ida = shmget(key, kSizeA, IPC_CREAT | IPC_EXCL | 0640);
  if (ida < 0 || idb < 0) {
    perror("shmget");
    return 2;
  }
  if (shmat(ida, kAddrA, 0) != kAddrA || shmat(idb, kAddrB, 0) != kAddrB) {
    perror("shmat");
    return 2;
  }
  for (size_t i = 0; i < kPatternA; i++) kAddrA[i] = static_cast<char>(pattern(i, 1));
  for (size_t i = 0; i < kSizeB; i++) kAddrB[i] = static_cast<char>(pattern(i, 2));
  if (shmctl(idb, IPC_RMID, nullptr) != 0) {
    perror("IPC_RMID");
    return 2;
  }
  signal(SIGUSR1, on_usr1);
  pid_t child = fork();
  if (child < 0) return 2;
  if (child == 0) {
    if (shmat(ida, kAddrA2, 0) != kAddrA2) _exit(3);
    wait_flag();
    std::string why = check_all(key, ida, idb, true);
    if (!why.empty()) {
      std::fprintf(stderr, "child: %s\n", why.c_str());
      kAddrA[kChildSlot] = 0x33;  // the parent stops waiting
      _exit(4);
    }
    kAddrA2[kChildSlot] = 0x22;
    wait_byte(kAddrA2 + kParentSlot, 0x11);  // the parent's write, through either attach
    wait_byte(kAddrA + kParentSlot, 0x11);
    _exit(0);
  }
  // Once the child has attached A again, nattch is 3: the image must show that.
  struct shmid_ds ds;
  do {
    timespec ts{0, 1000000};
    nanosleep(&ts, nullptr);
    if (shmctl(ida, IPC_STAT, &ds) != 0) return 2;
  } while (ds.shm_nattch != 3);
  std::printf("ready pid=%d child=%d key=%#x ida=%d idb=%d\n", getpid(), child, key, ida, idb);
  std::fflush(stdout);
  wait_flag();
  kill(child, SIGUSR1);
  std::string why = check_all(key, ida, idb, false);
  kAddrA[kParentSlot] = 0x11;
  if (why.empty()) wait_byte(kAddrA + kChildSlot, 0);
  int st = 0;
  waitpid(child, &st, 0);
  if (why.empty() && !(WIFEXITED(st) && WEXITSTATUS(st) == 0))
    why = "the child failed (status " + std::to_string(st) + ")";
  shmctl(ida, IPC_RMID, nullptr);
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
