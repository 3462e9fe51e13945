// Timers and scheduling a restore must give back (objects/timers, objects/sched,
// objects/pdeathsig). Three threads: M (main), A and B.
// - POSIX timers, created after one that is deleted again (so ids are not 0, 1, ...):
//   P: CLOCK_MONOTONIC, relative, periodic 40 ms, SIGEV_SIGNAL SIGRTMIN with value 0x1111;
//   R: CLOCK_REALTIME, absolute in one hour, SIGEV_SIGNAL SIGRTMIN+1 (never fires here);
//   Q: CLOCK_MONOTONIC, periodic 30 ms, SIGEV_THREAD_ID to A with SIGRTMIN+2 and value 0x2222;
//   N: CLOCK_MONOTONIC, SIGEV_NONE, 1000 s then every 7 s.
// - itimers: ITIMER_REAL 3000 s / 100 s, ITIMER_VIRTUAL 2000 s / 50 s, ITIMER_PROF 1000 s.
// - M bound to the highest CPU it may use, A to the lowest (when there are two); A at nice 5
//   and in SCHED_RR priority 3 (where the machine allows it: "rr=1"); B in SCHED_BATCH with
//   SCHED_RESET_ON_FORK and PR_SET_PDEATHSIG SIGUSR2.
// Prints "ready pid=P tids=M,A,B". On SIGUSR1 it checks from inside: /proc/self/timers lists
// the same timers (ids, signals, values, notification, clocks), each timer's interval is the
// same and its time left no more than before and not zero, the periodic timers still signal
// (with their ids and values, Q to A only), getitimer (likewise, but for the tick a CPU-time
// itimer gains at each setitimer), each thread's affinity, nice, policy and PR_GET_PDEATHSIG.
// Prints "verified ok" or "verify FAILED: why", exits 0 or 1.
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace {

std::atomic<bool> g_verify{false};
void on_usr1(int) {
  g_verify = true;
}

std::atomic<pid_t> g_a{0}, g_b{0};
std::atomic<bool> g_a_rr{false};  // A runs under SCHED_RR
std::atomic<int> g_phase{0};      // 1: B reads its death signal; 2: done
std::atomic<int> g_b_pdeathsig{-1};
int g_p_id = -1, g_q_id = -1;                 // kernel timer ids
std::atomic<int> g_p_count{0}, g_q_count{0};  // signals with the right id and value
std::atomic<int> g_bad_signal{0};             // a timer signal that was not as expected

void on_p(int, siginfo_t* si, void*) {
  if (si->si_code == SI_TIMER && si->si_timerid == g_p_id && si->si_value.sival_int == 0x1111)
    g_p_count++;
  else
    g_bad_signal = 1;
}

void on_q(int, siginfo_t* si, void*) {
  if (si->si_code == SI_TIMER && si->si_timerid == g_q_id && si->si_value.sival_int == 0x2222 &&
      static_cast<pid_t>(syscall(SYS_gettid)) == g_a)
    g_q_count++;
  else
    g_bad_signal = 2;
}

void nap() {
  timespec ts{0, 2000000};
  nanosleep(&ts, nullptr);
}

void* thread_a(void*) {
  setpriority(PRIO_PROCESS, 0, 5);
  // Realtime where this machine allows it; A keeps its nice value for when it leaves SCHED_RR.
  sched_param rr{};
  rr.sched_priority = 3;
  g_a_rr = sched_setscheduler(0, SCHED_RR, &rr) == 0;
  g_a = static_cast<pid_t>(syscall(SYS_gettid));
  while (g_phase.load() < 2) nap();
  return nullptr;
}

void* thread_b(void*) {
  sched_param sp{};
  if (sched_setscheduler(0, SCHED_BATCH | SCHED_RESET_ON_FORK, &sp) != 0) {
    perror("SCHED_BATCH");
    _exit(2);
  }
  prctl(PR_SET_PDEATHSIG, SIGUSR2);
  g_b = static_cast<pid_t>(syscall(SYS_gettid));
  while (g_phase.load() < 1) nap();
  int sig = -1;
  prctl(PR_GET_PDEATHSIG, &sig);
  g_b_pdeathsig = sig;
  while (g_phase.load() < 2) nap();
  return nullptr;
}

std::string read_file(const char* path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int64_t ns(const timespec& t) {
  return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec;
}
int64_t us(const timeval& t) {
  return int64_t{t.tv_sec} * 1000000 + t.tv_usec;
}

timer_t make_timer(clockid_t clock, int notify, int signo, int value, pid_t tid) {
  sigevent ev{};
  ev.sigev_notify = notify;
  ev.sigev_signo = signo;
  ev.sigev_value.sival_int = value;
  if (notify == SIGEV_THREAD_ID) ev._sigev_un._tid = tid;  // sigev_notify_thread_id
  timer_t t;
  if (timer_create(clock, &ev, &t) != 0) {
    perror("timer_create");
    _exit(2);
  }
  return t;
}

void arm(timer_t t, int flags, int64_t value_ns, int64_t interval_ns) {
  itimerspec its{};
  its.it_value = {static_cast<time_t>(value_ns / 1000000000),
                  static_cast<long>(value_ns % 1000000000)};
  its.it_interval = {static_cast<time_t>(interval_ns / 1000000000),
                     static_cast<long>(interval_ns % 1000000000)};
  if (timer_settime(t, flags, &its, nullptr) != 0) {
    perror("timer_settime");
    _exit(2);
  }
}

struct Before {
  int64_t value, interval;
};

// The time left may only have gone down (never to zero: none of these can have expired), the
// interval must be the same.
std::string check_timer(const char* name, timer_t t, const Before& b) {
  itimerspec now{};
  if (timer_gettime(t, &now) != 0) return std::string("timer_gettime of ") + name + " failed";
  if (ns(now.it_interval) != b.interval)
    return std::string(name) + " interval " + std::to_string(ns(now.it_interval)) + " ns, was " +
           std::to_string(b.interval);
  if (ns(now.it_value) <= 0 || ns(now.it_value) > b.value)
    return std::string(name) + " time left " + std::to_string(ns(now.it_value)) +
           " ns, was at most " + std::to_string(b.value);
  return "";
}

// setitimer() of a CPU-time timer (ITIMER_VIRTUAL, ITIMER_PROF) adds one tick to the value, so
// that it never expires early (kernel/time/itimer.c set_cpu_itimer()): the restore's setitimer
// may leave up to one tick more than the dump saw, at most 10 ms (HZ >= 100).
constexpr int64_t kTickSlackUs = 10000;

std::string check_itimer(const char* name, int which, const itimerval& before) {
  itimerval now{};
  getitimer(which, &now);
  if (us(now.it_interval) != us(before.it_interval))
    return std::string(name) + " interval " + std::to_string(us(now.it_interval)) + " us, was " +
           std::to_string(us(before.it_interval));
  const int64_t slack = which == ITIMER_REAL ? 0 : kTickSlackUs;
  if (us(now.it_value) <= 0 || us(now.it_value) > us(before.it_value) + slack)
    return std::string(name) + " time left " + std::to_string(us(now.it_value)) +
           " us, was at most " + std::to_string(us(before.it_value));
  return "";
}

std::string cpus(pid_t tid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(tid, sizeof set, &set) != 0) return "?";
  std::string out;
  for (int c = 0; c < CPU_SETSIZE; c++)
    if (CPU_ISSET(c, &set)) out += (out.empty() ? "" : ",") + std::to_string(c);
  return out;
}

std::string sched_of(pid_t tid) {
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
  return "policy " + std::to_string(sched_getscheduler(tid)) + " nice " + std::to_string(nice);
}

}  // namespace

int main() {
  signal(SIGUSR1, on_usr1);
  signal(SIGUSR2, SIG_IGN);
  struct sigaction sa {};
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sa.sa_sigaction = on_p;
  sigaction(SIGRTMIN, &sa, nullptr);
  sa.sa_sigaction = on_q;
  sigaction(SIGRTMIN + 2, &sa, nullptr);

  // SIGUSR1 is for M: the threads start with it blocked.
  sigset_t usr1, old;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, &old);
  pthread_t a, b;
  pthread_create(&a, nullptr, thread_a, nullptr);
  pthread_create(&b, nullptr, thread_b, nullptr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  while (g_a == 0 || g_b == 0) nap();

  cpu_set_t all;
  CPU_ZERO(&all);
  sched_getaffinity(0, sizeof all, &all);
  int lo = -1, hi = -1;
  for (int c = 0; c < CPU_SETSIZE; c++)
    if (CPU_ISSET(c, &all)) {
      if (lo < 0) lo = c;
      hi = c;
    }
  if (lo != hi) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(hi, &one);
    sched_setaffinity(0, sizeof one, &one);
    CPU_ZERO(&one);
    CPU_SET(lo, &one);
    sched_setaffinity(g_a, sizeof one, &one);
  }

  timer_delete(make_timer(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0));  // a gap in the ids
  timer_t p = make_timer(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN, 0x1111, 0);
  timer_t r = make_timer(CLOCK_REALTIME, SIGEV_SIGNAL, SIGRTMIN + 1, 0x3333, 0);
  timer_t q = make_timer(CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIGRTMIN + 2, 0x2222, g_a);
  timer_t n = make_timer(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
  g_p_id = static_cast<int>(reinterpret_cast<intptr_t>(p));
  g_q_id = static_cast<int>(reinterpret_cast<intptr_t>(q));
  timespec real{};
  clock_gettime(CLOCK_REALTIME, &real);
  arm(p, 0, 40000000, 40000000);
  arm(r, TIMER_ABSTIME, ns(real) + 3600 * int64_t{1000000000}, 0);
  arm(q, 0, 30000000, 30000000);
  arm(n, 0, 1000 * int64_t{1000000000}, 7 * int64_t{1000000000});
  const itimerval real_set{{100, 0}, {3000, 0}}, virt_set{{50, 0}, {2000, 0}},
      prof_set{{0, 0}, {1000, 0}};
  setitimer(ITIMER_REAL, &real_set, nullptr);
  setitimer(ITIMER_VIRTUAL, &virt_set, nullptr);
  setitimer(ITIMER_PROF, &prof_set, nullptr);
  itimerval real_it{}, virt_it{}, prof_it{};  // as the kernel keeps them
  getitimer(ITIMER_REAL, &real_it);
  getitimer(ITIMER_VIRTUAL, &virt_it);
  getitimer(ITIMER_PROF, &prof_it);

  const std::string timers_before = read_file("/proc/self/timers");
  const std::string cpus_before[3] = {cpus(getpid()), cpus(g_a), cpus(g_b)};
  const std::string sched_before[3] = {sched_of(getpid()), sched_of(g_a), sched_of(g_b)};
  const Before p_b{40000000, 40000000}, q_b{30000000, 30000000}, r_b{3600 * int64_t{1000000000}, 0},
      n_b{1000 * int64_t{1000000000}, 7 * int64_t{1000000000}};

  std::printf("ready pid=%d tids=%d,%d,%d cpus=%s;%s;%s rr=%d\n", getpid(), getpid(), g_a.load(),
              g_b.load(), cpus_before[0].c_str(), cpus_before[1].c_str(), cpus_before[2].c_str(),
              g_a_rr ? 1 : 0);
  std::fflush(stdout);
  // Not pause(): a SIGUSR1 landing between the check and pause() would be slept through.
  while (!g_verify) nap();

  std::string why;
  const std::string timers_after = read_file("/proc/self/timers");
  if (timers_after != timers_before)
    why = "/proc/self/timers was\n" + timers_before + "and is now\n" + timers_after;
  struct Checked {
    const char* name;
    timer_t t;
    Before b;
  };
  for (const Checked& c :
       {Checked{"P", p, p_b}, Checked{"Q", q, q_b}, Checked{"R", r, r_b}, Checked{"N", n, n_b}})
    if (why.empty()) why = check_timer(c.name, c.t, c.b);
  if (why.empty()) why = check_itimer("ITIMER_REAL", ITIMER_REAL, real_it);
  if (why.empty()) why = check_itimer("ITIMER_VIRTUAL", ITIMER_VIRTUAL, virt_it);
  if (why.empty()) why = check_itimer("ITIMER_PROF", ITIMER_PROF, prof_it);
  const pid_t tids[3] = {getpid(), g_a, g_b};
  for (int i = 0; i < 3 && why.empty(); i++) {
    if (cpus(tids[i]) != cpus_before[i])
      why = "thread " + std::to_string(tids[i]) + " may run on CPUs " + cpus(tids[i]) + ", was " +
            cpus_before[i];
    else if (sched_of(tids[i]) != sched_before[i])
      why = "thread " + std::to_string(tids[i]) + ": " + sched_of(tids[i]) + ", was " +
            sched_before[i];
  }
  g_phase = 1;
  while (g_b_pdeathsig.load() < 0) nap();
  if (why.empty() && g_b_pdeathsig != SIGUSR2)
    why = "B's parent death signal is " + std::to_string(g_b_pdeathsig.load());
  int mine = -1;
  prctl(PR_GET_PDEATHSIG, &mine);
  if (why.empty() && mine != 0) why = "M's parent death signal is " + std::to_string(mine);
  // The periodic timers go on signalling (as long as it takes: no timing is asserted).
  const int p0 = g_p_count, q0 = g_q_count;
  while (why.empty() && (g_p_count < p0 + 2 || g_q_count < q0 + 2) && !g_bad_signal) nap();
  if (why.empty() && g_bad_signal)
    why = g_bad_signal == 1 ? "a SIGRTMIN came without P's id and value"
                            : "a SIGRTMIN+2 came without Q's id and value, or not to A";
  g_phase = 2;
  pthread_join(a, nullptr);
  pthread_join(b, nullptr);
  if (why.empty()) {
    std::printf("verified ok\n");
    return 0;
  }
  std::printf("verify FAILED: %s\n", why.c_str());
  return 1;
}
