// A target that checks, from inside, what only a faithful restore gets right:
// - thread IDs: each thread compares gettid() with glibc's cached tid in its struct pthread
//   (found before the dump by looking for gettid() in pthread_self()'s memory), and sends
//   itself a signal with pthread_kill(), which glibc addresses with that cached tid;
// - vector registers: one thread loads ymm0-ymm15 and another (with AVX-512) zmm16-zmm31 and
//   k1-k7 with known values, and each spins in a pure asm loop that touches no vector register
//   until the main thread sets a flag, then stores them; main compares.
// - per-thread state: each thread has its own name, sigaltstack, blocked signals, robust list
//   and rseq registration (the kernel must still update the thread's rseq area after a
//   restore).
// It prints
//   ready pid=P tids=A,B,C avx=1 avx512=1 tidoff=OFFSET
// waits for --verify-file to appear, then prints "verified ok" or "verify FAILED: why" and
// exits 0 or 1.
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kWorkers = 3;
constexpr size_t kScanBytes = 1024;  // of struct pthread (about 2.3 KiB) searched for the tid

pid_t gettid_raw() {
  return static_cast<pid_t>(syscall(SYS_gettid));
}

// Offsets into pthread_self() that hold the thread's tid; intersected over every thread.
std::vector<size_t> tid_offsets() {
  pid_t tid = gettid_raw();
  const unsigned char* self = reinterpret_cast<const unsigned char*>(pthread_self());
  std::vector<size_t> out;
  for (size_t off = 0; off + sizeof(pid_t) <= kScanBytes; off += sizeof(pid_t)) {
    pid_t v;
    std::memcpy(&v, self + off, sizeof v);
    if (v == tid) out.push_back(off);
  }
  return out;
}

thread_local pid_t t_handler_tid = 0;
void on_usr1(int) {
  t_handler_tid = gettid_raw();
}

// Per-thread kernel state recorded before the dump and compared after.
struct ThreadState {
  char name[16] = {};
  stack_t ss = {};
  void* robust_head = nullptr;
  size_t robust_len = 0;
  sigset_t mask;
};

void record_state(int i, ThreadState& st) {
  char name[16];
  std::snprintf(name, sizeof name, "tidavx-%d", i);
  prctl(PR_SET_NAME, name);
  prctl(PR_GET_NAME, st.name);
  stack_t ss = {};
  ss.ss_size = 64 * 1024;
  ss.ss_sp = std::malloc(ss.ss_size);
  sigaltstack(&ss, nullptr);
  sigaltstack(nullptr, &st.ss);
  syscall(SYS_get_robust_list, 0, &st.robust_head, &st.robust_len);
  sigset_t block;
  sigemptyset(&block);
  sigaddset(&block, SIGRTMIN + 2 + i);
  pthread_sigmask(SIG_BLOCK, &block, nullptr);
  pthread_sigmask(SIG_BLOCK, nullptr, &st.mask);
}

std::string check_state(const ThreadState& st) {
  char name[16] = {};
  prctl(PR_GET_NAME, name);
  if (std::strcmp(name, st.name) != 0) return std::string("name ") + name + " != " + st.name;
  stack_t ss;
  sigaltstack(nullptr, &ss);
  if (ss.ss_sp != st.ss.ss_sp || ss.ss_size != st.ss.ss_size || ss.ss_flags != st.ss.ss_flags)
    return "sigaltstack differs";
  void* head = nullptr;
  size_t len = 0;
  syscall(SYS_get_robust_list, 0, &head, &len);
  if (head != st.robust_head || len != st.robust_len) return "robust list differs";
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  for (int sig = 1; sig < NSIG; sig++)
    if (sigismember(&mask, sig) != sigismember(&st.mask, sig))
      return "blocked signal " + std::to_string(sig) + " differs";
  // rseq: the kernel writes the current cpu into the registered area when the thread comes
  // back to user space after a sleep.
  if (__rseq_size > 0) {
    auto* rs = reinterpret_cast<volatile struct rseq*>(
        static_cast<char*>(__builtin_thread_pointer()) + __rseq_offset);
    rs->cpu_id = RSEQ_CPU_ID_UNINITIALIZED;
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
    if (static_cast<int32_t>(rs->cpu_id) < 0) return "rseq area not registered any more";
  }
  return "";
}

// Checks one thread's identity after the restore.
std::string check_identity(size_t tidoff, pid_t tid_before) {
  pid_t tid = gettid_raw();
  if (tid != tid_before)
    return "gettid " + std::to_string(tid) + " != " + std::to_string(tid_before) + " before";
  pid_t cached;
  std::memcpy(&cached, reinterpret_cast<const unsigned char*>(pthread_self()) + tidoff,
              sizeof cached);
  if (cached != tid)
    return "glibc's cached tid " + std::to_string(cached) + " != gettid " + std::to_string(tid);
  t_handler_tid = 0;
  int rc = pthread_kill(pthread_self(), SIGUSR1);  // glibc: tgkill(getpid(), cached tid, ...)
  if (rc != 0) return "pthread_kill to itself failed: " + std::string(std::strerror(rc));
  if (t_handler_tid != tid) return "pthread_kill did not reach the thread itself";
  return "";
}

std::atomic<int> g_go{0};     // set by main after the verify file appears
std::atomic<int> g_ready{0};  // workers that reached their wait
std::vector<size_t> g_offsets[kWorkers + 1];
ThreadState g_state[kWorkers + 1];
pid_t g_tids[kWorkers + 1];
std::string g_result[kWorkers + 1];
size_t g_tidoff = 0;

void wait_go() {
  while (g_go.load() == 0) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
}

// --- vector registers ---
alignas(64) uint8_t g_ymm_in[16 * 32], g_ymm_out[16 * 32];
alignas(64) uint8_t g_zmm_in[16 * 64], g_zmm_out[16 * 64];
alignas(8) uint64_t g_k_in[7], g_k_out[7];
std::atomic<int> g_spinning{0};
volatile int g_release_avx = 0;  // read by the asm loops
volatile int g_release_avx512 = 0;

void fill_pattern(uint8_t* p, size_t n, uint8_t seed) {
  for (size_t i = 0; i < n; i++) p[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 5) * 13);
}

// Loads ymm0-15, spins until g_release_avx, stores them. Nothing in between touches a vector
// register.
__attribute__((target("avx"))) void spin_avx() {
  asm volatile(
      "vmovdqu 0(%0), %%ymm0\n\t"
      "vmovdqu 32(%0), %%ymm1\n\t"
      "vmovdqu 64(%0), %%ymm2\n\t"
      "vmovdqu 96(%0), %%ymm3\n\t"
      "vmovdqu 128(%0), %%ymm4\n\t"
      "vmovdqu 160(%0), %%ymm5\n\t"
      "vmovdqu 192(%0), %%ymm6\n\t"
      "vmovdqu 224(%0), %%ymm7\n\t"
      "vmovdqu 256(%0), %%ymm8\n\t"
      "vmovdqu 288(%0), %%ymm9\n\t"
      "vmovdqu 320(%0), %%ymm10\n\t"
      "vmovdqu 352(%0), %%ymm11\n\t"
      "vmovdqu 384(%0), %%ymm12\n\t"
      "vmovdqu 416(%0), %%ymm13\n\t"
      "vmovdqu 448(%0), %%ymm14\n\t"
      "vmovdqu 480(%0), %%ymm15\n\t"
      "lock incl (%3)\n\t"
      "1:\n\t"
      "pause\n\t"
      "cmpl $0, (%1)\n\t"
      "je 1b\n\t"
      "vmovdqu %%ymm0, 0(%2)\n\t"
      "vmovdqu %%ymm1, 32(%2)\n\t"
      "vmovdqu %%ymm2, 64(%2)\n\t"
      "vmovdqu %%ymm3, 96(%2)\n\t"
      "vmovdqu %%ymm4, 128(%2)\n\t"
      "vmovdqu %%ymm5, 160(%2)\n\t"
      "vmovdqu %%ymm6, 192(%2)\n\t"
      "vmovdqu %%ymm7, 224(%2)\n\t"
      "vmovdqu %%ymm8, 256(%2)\n\t"
      "vmovdqu %%ymm9, 288(%2)\n\t"
      "vmovdqu %%ymm10, 320(%2)\n\t"
      "vmovdqu %%ymm11, 352(%2)\n\t"
      "vmovdqu %%ymm12, 384(%2)\n\t"
      "vmovdqu %%ymm13, 416(%2)\n\t"
      "vmovdqu %%ymm14, 448(%2)\n\t"
      "vmovdqu %%ymm15, 480(%2)\n\t"
      "vzeroupper\n\t"
      :
      : "r"(g_ymm_in), "r"(&g_release_avx), "r"(g_ymm_out), "r"(&g_spinning)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

// The same with zmm16-31 and k1-k7 (AVX-512 state: opmask, Hi16_ZMM).
__attribute__((target("avx512f"))) void spin_avx512() {
  asm volatile(
      "vmovdqu64 0(%0), %%zmm16\n\t"
      "vmovdqu64 64(%0), %%zmm17\n\t"
      "vmovdqu64 128(%0), %%zmm18\n\t"
      "vmovdqu64 192(%0), %%zmm19\n\t"
      "vmovdqu64 256(%0), %%zmm20\n\t"
      "vmovdqu64 320(%0), %%zmm21\n\t"
      "vmovdqu64 384(%0), %%zmm22\n\t"
      "vmovdqu64 448(%0), %%zmm23\n\t"
      "vmovdqu64 512(%0), %%zmm24\n\t"
      "vmovdqu64 576(%0), %%zmm25\n\t"
      "vmovdqu64 640(%0), %%zmm26\n\t"
      "vmovdqu64 704(%0), %%zmm27\n\t"
      "vmovdqu64 768(%0), %%zmm28\n\t"
      "vmovdqu64 832(%0), %%zmm29\n\t"
      "vmovdqu64 896(%0), %%zmm30\n\t"
      "vmovdqu64 960(%0), %%zmm31\n\t"
      "kmovq 0(%4), %%k1\n\t"
      "kmovq 8(%4), %%k2\n\t"
      "kmovq 16(%4), %%k3\n\t"
      "kmovq 24(%4), %%k4\n\t"
      "kmovq 32(%4), %%k5\n\t"
      "kmovq 40(%4), %%k6\n\t"
      "kmovq 48(%4), %%k7\n\t"
      "lock incl (%3)\n\t"
      "1:\n\t"
      "pause\n\t"
      "cmpl $0, (%1)\n\t"
      "je 1b\n\t"
      "vmovdqu64 %%zmm16, 0(%2)\n\t"
      "vmovdqu64 %%zmm17, 64(%2)\n\t"
      "vmovdqu64 %%zmm18, 128(%2)\n\t"
      "vmovdqu64 %%zmm19, 192(%2)\n\t"
      "vmovdqu64 %%zmm20, 256(%2)\n\t"
      "vmovdqu64 %%zmm21, 320(%2)\n\t"
      "vmovdqu64 %%zmm22, 384(%2)\n\t"
      "vmovdqu64 %%zmm23, 448(%2)\n\t"
      "vmovdqu64 %%zmm24, 512(%2)\n\t"
      "vmovdqu64 %%zmm25, 576(%2)\n\t"
      "vmovdqu64 %%zmm26, 640(%2)\n\t"
      "vmovdqu64 %%zmm27, 704(%2)\n\t"
      "vmovdqu64 %%zmm28, 768(%2)\n\t"
      "vmovdqu64 %%zmm29, 832(%2)\n\t"
      "vmovdqu64 %%zmm30, 896(%2)\n\t"
      "vmovdqu64 %%zmm31, 960(%2)\n\t"
      "kmovq %%k1, 0(%5)\n\t"
      "kmovq %%k2, 8(%5)\n\t"
      "kmovq %%k3, 16(%5)\n\t"
      "kmovq %%k4, 24(%5)\n\t"
      "kmovq %%k5, 32(%5)\n\t"
      "kmovq %%k6, 40(%5)\n\t"
      "kmovq %%k7, 48(%5)\n\t"
      "vzeroupper\n\t"
      :
      : "r"(g_zmm_in), "r"(&g_release_avx512), "r"(g_zmm_out), "r"(&g_spinning), "r"(g_k_in),
        "r"(g_k_out)
      : "memory", "cc", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
        "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "k1", "k2", "k3",
        "k4", "k5", "k6", "k7");
}

bool g_avx = false, g_avx512 = false;

// Worker 1 holds ymm0-15, worker 2 zmm16-31 and k1-k7 (when the CPU has them), worker 3 only
// checks its identity.
void* worker(void* arg) {
  int i = static_cast<int>(reinterpret_cast<intptr_t>(arg));
  g_tids[i] = gettid_raw();
  g_offsets[i] = tid_offsets();
  record_state(i, g_state[i]);
  g_ready++;
  if (i == 1 && g_avx) spin_avx();
  if (i == 2 && g_avx512) spin_avx512();
  wait_go();
  g_result[i] = check_identity(g_tidoff, g_tids[i]);
  if (g_result[i].empty()) g_result[i] = check_state(g_state[i]);
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  std::string verify_file;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--verify-file" && i + 1 < argc) {
      verify_file = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s --verify-file PATH\n", argv[0]);
      return 2;
    }
  }
  __builtin_cpu_init();
  g_avx = __builtin_cpu_supports("avx");
  g_avx512 = __builtin_cpu_supports("avx512f");
  fill_pattern(g_ymm_in, sizeof g_ymm_in, 0x11);
  fill_pattern(g_zmm_in, sizeof g_zmm_in, 0x5a);
  for (int k = 0; k < 7; k++) g_k_in[k] = 0x0123456789abcdefull * static_cast<uint64_t>(k + 3);

  struct sigaction sa = {};
  sa.sa_handler = on_usr1;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, nullptr);

  g_tids[0] = gettid_raw();
  g_offsets[0] = tid_offsets();
  record_state(0, g_state[0]);
  pthread_t threads[kWorkers];
  for (int i = 1; i <= kWorkers; i++)
    pthread_create(&threads[i - 1], nullptr, worker,
                   reinterpret_cast<void*>(static_cast<intptr_t>(i)));
  int expected_spins = (g_avx ? 1 : 0) + (g_avx512 ? 1 : 0);
  while (g_ready.load() < kWorkers || g_spinning.load() < expected_spins) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, nullptr);
  }
  // The cached tid's offset: where every thread's struct pthread holds its own tid.
  std::vector<size_t> common = g_offsets[0];
  for (int i = 1; i <= kWorkers; i++) {
    std::vector<size_t> keep;
    for (size_t off : common)
      for (size_t o : g_offsets[i])
        if (o == off) keep.push_back(off);
    common = keep;
  }
  if (common.empty()) {
    std::printf("setup FAILED: no common tid offset in struct pthread\n");
    return 3;
  }
  g_tidoff = common.front();
  std::printf("ready pid=%d tids=%d,%d,%d,%d avx=%d avx512=%d tidoff=%zu\n", getpid(), g_tids[0],
              g_tids[1], g_tids[2], g_tids[3], g_avx ? 1 : 0, g_avx512 ? 1 : 0, g_tidoff);
  std::fflush(stdout);

  struct stat st;
  while (stat(verify_file.c_str(), &st) != 0) {
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, nullptr);
  }
  g_release_avx = 1;
  g_release_avx512 = 1;
  g_go = 1;
  for (auto& t : threads) pthread_join(t, nullptr);
  std::string why;
  if (g_avx && std::memcmp(g_ymm_in, g_ymm_out, sizeof g_ymm_in) != 0) why = "ymm0-15 changed";
  if (why.empty() && g_avx512 && std::memcmp(g_zmm_in, g_zmm_out, sizeof g_zmm_in) != 0)
    why = "zmm16-31 changed";
  if (why.empty() && g_avx512 && std::memcmp(g_k_in, g_k_out, sizeof g_k_in) != 0)
    why = "k1-k7 changed";
  if (why.empty()) why = check_identity(g_tidoff, g_tids[0]);
  if (why.empty()) why = check_state(g_state[0]);
  for (int i = 1; i <= kWorkers && why.empty(); i++)
    if (!g_result[i].empty()) why = "thread " + std::to_string(g_tids[i]) + ": " + g_result[i];
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
