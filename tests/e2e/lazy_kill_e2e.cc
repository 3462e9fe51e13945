// Whatever dies, in whatever order, a lazily restored process never runs on memory it does not
// own (issue 10, items 1 and 12):
// - the page server and its guardian killed in every order, with prefetch on and off: a group
//   kill of the server's process group (the guardian is in its own: it survives and kills the
//   process, saying why); the guardian first, then the server; both at the same instant (the
//   guardian stopped first so that it cannot act in between). Without both, the keeper
//   parked inside the process keeps its uffd: its next fault on an owed page waits (a hang
//   that can be killed), it never reads zeros;
// - the same for a child the restored process forked while pages were owed (its uffd came
//   from a FORK event: it lives in the server, the guardian and the parked keeper);
// - a detached server holds none of the caller's pipes (`out=$(lazycr restore --lazy -d)`
//   returns): its messages go to --log-file or /run/lazycr/server-PID.log.
// Kills happen at sync points: the server stopping itself after a prefetch chunk
// (LAZYCR_FAULT_INJECT=server-stop-mid-prefetch, seen through waitpid WUNTRACED), the
// guardian seen stopped in /proc, the target seen blocked in a userfault or back at its
// command loop. No sleeps decide anything.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <thread>

#include "common/fd.h"
#include "tests/e2e/lazy_helpers.h"

namespace lazycr::test {
namespace {

// The state letter of /proc/PID/stat ('Z' for a zombie), or 0 if the pid is gone.
char state_of(pid_t pid) {
  auto text = proc::try_read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!text) return 0;
  auto close = text->rfind(')');
  return close == std::string::npos || close + 2 >= text->size() ? 0 : (*text)[close + 2];
}

std::string wchan_of(pid_t pid) {
  return proc::try_read_file("/proc/" + std::to_string(pid) + "/wchan").value_or("");
}

// Polls (a condition, never a duration; only ever after the server is dead) until `pid` waits
// in a userfault ("blocked"), is back at its command loop having taken its command (the file
// is gone: "ran"), or is dead ("exited"). "timeout" after 60 s.
std::string outcome_of(pid_t pid, const std::string& cmd_file) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    const char st = state_of(pid);
    if (st == 0 || st == 'Z' || st == 'X') return "exited";
    // (It may fault before it removed the file: reading the command allocates.)
    const std::string w = wchan_of(pid);
    if (w == "handle_userfault") return "blocked";
    if (!fs::exists(cmd_file) && w.find("nanosleep") != std::string::npos) return "ran";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return "timeout";
}

// Polls until `pid` is a zombie or gone (60 s at most).
bool wait_exited(pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    const char st = state_of(pid);
    if (st == 0 || st == 'Z' || st == 'X') return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// Polls until `pid` (not our child) is in a stop.
bool wait_stopped(pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    const char st = state_of(pid);
    if (st == 'T') return true;
    if (st == 0 || st == 'Z') return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

pid_t guardian_of(pid_t server) {
  for (pid_t c : proc::list_children(server)) {
    auto comm = proc::try_read_file("/proc/" + std::to_string(c) + "/comm");
    if (comm && *comm == "lazycr-guardian\n") return c;
  }
  return 0;
}

// Sets an environment variable for the processes started while it lives.
struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& v) : name(n) {
    if (!v.empty()) setenv(n.c_str(), v.c_str(), 1);
  }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

// How the server and the guardian die.
enum class Order { kGroup, kGuardianFirst, kAtOnce };

// Kills them (the guardian, re-parented to us, is reaped through children_named).
void kill_in_order(Order order, pid_t server, pid_t guardian) {
  switch (order) {
    case Order::kGroup: {
      const pid_t group = getpgid(server);
      ASSERT_GT(group, 1);
      ASSERT_EQ(kill(-group, SIGKILL), 0);
      break;
    }
    case Order::kGuardianFirst:
      ASSERT_TRUE(send_signal(guardian, SIGKILL));
      ASSERT_TRUE(send_signal(server, SIGKILL));
      break;
    case Order::kAtOnce:
      // Stopped, the guardian cannot act between the two kills: they die as if at once.
      ASSERT_TRUE(send_signal(guardian, SIGSTOP));
      ASSERT_TRUE(wait_stopped(guardian));
      ASSERT_TRUE(send_signal(server, SIGKILL));
      ASSERT_TRUE(send_signal(guardian, SIGKILL));
      break;
  }
}

struct KillCase {
  Order order;
  bool prefetch;
};

class LazyKill : public ::testing::TestWithParam<KillCase> {};

TEST_P(LazyKill, ProcessNeverRunsOnZeroPages) {
  const KillCase c = GetParam();
  EventsTarget t({"--mib", "32"});
  TempDir logs;
  const std::string log = logs / "lazycr.log";
  LazyDetached l;
  {
    ScopedEnv env("LAZYCR_FAULT_INJECT", c.prefetch ? "server-stop-mid-prefetch" : "");
    l.start(t.dir, t.work, {"--prefetch", c.prefetch ? "on" : "off"}, {"--log-file", log});
  }
  ASSERT_GT(l.server, 0);
  if (c.prefetch) {  // stopped after one prefetch chunk: most pages are still owed
    int status = 0;
    ASSERT_EQ(waitpid(l.server, &status, WUNTRACED), l.server);
    ASSERT_TRUE(WIFSTOPPED(status));
  }
  const pid_t guardian = guardian_of(l.server);
  ASSERT_GT(guardian, 0);
  kill_in_order(c.order, l.server, guardian);
  EXPECT_EQ(l.wait_server(), 128 + SIGKILL);
  // Asked to check every page, the process must not run on: with the guardian alive it is
  // killed; without, its first fault on an owed page waits.
  t.send("all");
  const std::string outcome = outcome_of(l.rp.pid, t.cmd_file);
  if (c.order == Order::kGroup) {
    // The guardian may not have acted yet when the process faults: it waits ("blocked")
    // until the guardian kills it (seen failing 2 in 12 runs at main under load).
    EXPECT_TRUE(outcome == "exited" || outcome == "blocked") << outcome;
    EXPECT_TRUE(wait_exited(l.rp.pid));
  } else {
    EXPECT_EQ(outcome, "blocked");
    send_signal(l.rp.pid, SIGKILL);
  }
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.lz->read_rest(), "") << "the process ran on without its page server";
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  if (c.order == Order::kGroup) {
    std::string text = read_text(log);
    EXPECT_NE(text.find("died before it finished; killed pid " + std::to_string(l.rp.pid)),
              std::string::npos)
        << text;
  }
  expect_nothing_left(t.pid());
}

INSTANTIATE_TEST_SUITE_P(
    Lazy, LazyKill,
    ::testing::Values(KillCase{Order::kGroup, true}, KillCase{Order::kGroup, false},
                      KillCase{Order::kGuardianFirst, true}, KillCase{Order::kGuardianFirst, false},
                      KillCase{Order::kAtOnce, true}, KillCase{Order::kAtOnce, false}),
    [](const auto& info) {
      const char* o = info.param.order == Order::kGroup           ? "GroupKill"
                      : info.param.order == Order::kGuardianFirst ? "GuardianThenServer"
                                                                  : "BothAtOnce";
      return std::string(o) + (info.param.prefetch ? "PrefetchOn" : "PrefetchOff");
    });

// How many userfaultfds `pid` holds (its descriptors that are "anon_inode:[userfaultfd]").
int uffds_held(pid_t pid) {
  int n = 0;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return 0;
  while (dirent* e = readdir(d)) {
    char target[64] = {};
    const std::string path = dir + "/" + e->d_name;
    if (readlink(path.c_str(), target, sizeof(target) - 1) > 0 &&
        std::strcmp(target, "anon_inode:[userfaultfd]") == 0)
      ++n;
  }
  closedir(d);
  return n;
}

// Polls until the guardian holds `n` uffds (the server hands them over after parking them in
// the process's keeper: once it has them, the keeper has them too).
bool guardian_holds(pid_t guardian, int n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (uffds_held(guardian) >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

TEST(LazyKill, ForkedChildNeverRunsOnZeroPages) {
  EventsTarget t({"--mib", "8"});
  LazyDetached l;
  l.start(t.dir, t.work, {"--prefetch", "off"});
  t.send("forkwait");
  const std::string line = l.lz->read_line();
  ASSERT_EQ(line.rfind("forkwait ok child=", 0), 0u) << line;
  const pid_t child = std::atoi(line.c_str() + std::string("forkwait ok child=").size());
  ASSERT_GT(child, 0);
  Restored forked;  // killed if the test fails
  forked.pid = child;
  // The child owes pages through its own uffd, read by the server from the FORK event.
  const pid_t guardian = guardian_of(l.server);
  ASSERT_GT(guardian, 0);
  // The fork returns as soon as the server has read the FORK event, before the child's uffd
  // is parked: killed in between, both at once, the child would lose it (the fork window,
  // ForkedChildKilledInForkWindow). Killed once the guardian has it (the parent's and the
  // child's): from then on the keeper holds it too.
  ASSERT_TRUE(guardian_holds(guardian, 2));
  kill_in_order(Order::kAtOnce, l.server, guardian);
  EXPECT_EQ(l.wait_server(), 128 + SIGKILL);
  const std::string go = t.cmd_file + ".child";
  std::ofstream(go) << "go\n";
  EXPECT_EQ(outcome_of(child, go), "blocked");
  t.send("all");
  EXPECT_EQ(outcome_of(l.rp.pid, t.cmd_file), "blocked");
  send_signal(l.rp.pid, SIGKILL);
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  send_signal(child, SIGKILL);  // re-parented to us with its parent's death
  EXPECT_EQ(forked.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.lz->read_rest(), "") << "a process ran on without its page server";
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  expect_nothing_left(t.pid());
}

// The fork window: the kernel lets a fork go on as soon as the server reads the FORK event,
// and the child's uffd is then held by the server alone until it parks it and hands it to
// the guardian. The server stops itself exactly there (LAZYCR_FAULT_INJECT=
// server-stop-in-fork-window) and is killed; the guardian, alive, must kill the child it was
// never told of (with the server it lost its uffd: it would read zero pages) and its parent.
TEST(LazyKill, ForkedChildKilledInForkWindow) {
  EventsTarget t({"--mib", "8"});
  TempDir logs;
  const std::string log = logs / "lazycr.log";
  LazyDetached l;
  {
    ScopedEnv env("LAZYCR_FAULT_INJECT", "server-stop-in-fork-window");
    l.start(t.dir, t.work, {"--prefetch", "off"}, {"--log-file", log});
  }
  ASSERT_GT(l.server, 0);
  t.send("forkwait");
  int status = 0;
  ASSERT_EQ(waitpid(l.server, &status, WUNTRACED), l.server);
  ASSERT_TRUE(WIFSTOPPED(status));
  const std::string line = l.lz->read_line();
  ASSERT_EQ(line.rfind("forkwait ok child=", 0), 0u) << line;
  const pid_t child = std::atoi(line.c_str() + std::string("forkwait ok child=").size());
  ASSERT_GT(child, 0);
  Restored forked;  // killed if the test fails
  forked.pid = child;
  const pid_t guardian = guardian_of(l.server);
  ASSERT_GT(guardian, 0);
  EXPECT_EQ(uffds_held(guardian), 1) << "the child's uffd was handed over before the stop";
  ASSERT_TRUE(send_signal(l.server, SIGKILL));
  EXPECT_EQ(l.wait_server(), 128 + SIGKILL);
  // The guardian kills the descendants before their parent: once the parent is dead, the
  // child was killed or never will be. Only then may it try to read its memory.
  EXPECT_TRUE(wait_exited(l.rp.pid));
  const std::string go = t.cmd_file + ".child";
  std::ofstream(go) << "go\n";
  EXPECT_EQ(outcome_of(child, go), "exited");
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  EXPECT_EQ(forked.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.lz->read_rest(), "") << "a process ran on without its page server";
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  const std::string text = read_text(log);
  EXPECT_NE(text.find(" " + std::to_string(child)), std::string::npos) << text;
  expect_nothing_left(t.pid());
}

// Polls until `pid` and every thread of it are in a stop ('T').
bool all_threads_stopped(pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    bool all = true;
    for (pid_t tid : proc::list_tasks(pid)) all = all && state_of(tid) == 'T';
    if (all) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

// A detached lazy restore whose lazycr stops (LAZYCR_FAULT_INJECT=lazycr-stop-before-release)
// while it still traces the process, until the server has served everything: the server
// must then wait in its loop (epoll) for lazycr to let the process go, not end.
struct StoppedBeforeRelease {
  std::unique_ptr<Child> lz;
  pid_t server = 0;
  std::string stats;

  void start(const std::string& dir, const TempDir& work, std::vector<std::string> extra = {}) {
    const std::string spid = work / "server.pid";
    stats = work / "stats.json";
    std::vector<std::string> argv{lazycr_bin(), "restore", "--lazy", "--shell-job",
                                  "-d",         "-D",      dir,      "--server-pidfile",
                                  spid,         "--stats", stats};
    argv.insert(argv.end(), extra.begin(), extra.end());
    {
      ScopedEnv env("LAZYCR_FAULT_INJECT", "lazycr-stop-before-release");
      lz = std::make_unique<Child>(argv);
    }
    int status = 0;
    ASSERT_EQ(waitpid(lz->pid(), &status, WUNTRACED), lz->pid());
    ASSERT_TRUE(WIFSTOPPED(status));
    server = read_pidfile(spid);
    ASSERT_GT(server, 0);
    // Prefetch on and the process not running: the server sleeps in epoll_wait only once
    // nothing is owed (it polls without waiting while it prefetches).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    std::string outcome = "timeout";
    while (std::chrono::steady_clock::now() < deadline) {
      const char st = state_of(server);
      if (st == 0 || st == 'Z') {
        outcome = "ended before lazycr let the process go";
        break;
      }
      const std::string w = wchan_of(server);
      if (w.find("ep") != std::string::npos && w.find("poll") != std::string::npos) {
        outcome = "waiting";
        break;
      }
      if (w.find("pipe_read") != std::string::npos) {  // for lazycr's "go", serving over
        outcome = "released the keepers before lazycr let the process go";
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_EQ(outcome, "waiting");
  }
  // Lets lazycr go on; returns the restored pid it prints.
  pid_t resume() {
    EXPECT_TRUE(send_signal(lz->pid(), SIGCONT));
    pid_t pid = std::atoi(lz->read_line().c_str());
    EXPECT_EQ(lz->wait(), 0);
    return pid;
  }
};

// The descriptors >= 3 of `pid`, and those of a snapshot() of the original.
std::vector<int> fds_of(pid_t pid) {
  std::vector<int> out;
  for (int fd : proc::list_fds(pid))
    if (fd >= 3) out.push_back(fd);
  return out;
}
std::vector<int> fds_in(const std::map<std::string, std::string>& state) {
  std::vector<int> out;
  for (const auto& [key, value] : state)
    if (key.rfind("fd ", 0) == 0) out.push_back(std::stoi(key.substr(3)));
  std::sort(out.begin(), out.end());
  return out;
}

// The server closes the keeper it parked in the process once nothing is owed, also when it
// is done before lazycr has let the process go: it waits for that, since lazycr traces the
// process until then (the close found it "already traced" and left it: the two Lazy tests
// comparing descriptors failed now and then on a loaded machine).
TEST(LazyKeeper, ClosedEvenWhenServingEndsBeforeLazycrLetsGo) {
  StateTarget t({"--mib", "16"});
  TempDir images, work;
  t.dump(images / "img");
  StoppedBeforeRelease l;
  l.start(images / "img", work);
  Restored rp;
  rp.pid = l.resume();
  ASSERT_EQ(rp.pid, t.pid());
  EXPECT_EQ(reap(l.server), 0);
  expect_same(t.state, snapshot(rp.pid, t.stable_tids()));
  const std::string s = read_text(l.stats);
  EXPECT_EQ(json_number(s, "closed"), 1) << s;
  EXPECT_EQ(json_number(s, "left"), 0) << s;
  t.go();
  EXPECT_EQ(l.lz->read_line(), "verified ok");
  EXPECT_EQ(rp.wait(), 0);
}

// A stopped job (SIGSTOP) loses the keeper and stays stopped; in a new PID namespace too.
// (Stopped before lazycr lets it go: a thread waiting in a kernel-mode userfault cannot enter
// a group stop until its page arrives.)
TEST(LazyKeeper, StoppedJobStaysStoppedAndLosesTheKeeper) {
  for (bool pidns : {false, true}) {
    SCOPED_TRACE(pidns ? "--pidns" : "same namespace");
    StateTarget t({"--mib", "16"});
    TempDir images, work;
    t.dump(images / "img");
    StoppedBeforeRelease l;
    std::vector<std::string> extra;
    if (pidns) extra.push_back("--pidns");
    l.start(images / "img", work, extra);
    // Its pid: the only one lazycr traces (as the namespace's reaper's child with --pidns).
    pid_t pid = 0, reaper = 0;
    for (pid_t c : proc::list_children(l.lz->pid())) {
      if (c == l.server) continue;
      pid = c;
      if (pidns) {
        reaper = c;
        pid = proc::list_children(c).at(0);
      }
    }
    ASSERT_GT(pid, 0);
    ASSERT_TRUE(send_signal(pid, SIGSTOP));  // pending until lazycr lets it go
    Restored rp;
    rp.pid = l.resume();
    ASSERT_EQ(rp.pid, pid);
    EXPECT_EQ(reap(l.server), 0);
    EXPECT_TRUE(all_threads_stopped(pid));
    EXPECT_EQ(fds_of(pid), fds_in(t.state));
    const std::string s = read_text(l.stats);
    EXPECT_EQ(json_number(s, "closed"), 1) << s;
    EXPECT_EQ(json_number(s, "left"), 0) << s;
    ASSERT_TRUE(send_signal(pid, SIGCONT));
    t.go();
    EXPECT_EQ(l.lz->read_line(), "verified ok");
    if (pidns) {
      EXPECT_EQ(reap(reaper), 0);
      rp.reaped = true;
    } else {
      EXPECT_EQ(rp.wait(), 0);
    }
  }
}

// Traced by someone else when serving ends (a debugger, strace): the server leaves the keeper
// (an idle socket), says so in its log and stats, and ends normally.
TEST(LazyKeeper, TracedBySomeoneElseKeepsTheKeeperAndSaysSo) {
  StateTarget t({"--mib", "16"});
  TempDir images, work;
  t.dump(images / "img");
  const std::string log = work / "lazycr.log";
  LazyDetached l;
  {
    ScopedEnv env("LAZYCR_FAULT_INJECT", "server-stop-mid-prefetch");
    l.start(images / "img", work, {"--prefetch", "on"}, {"--log-file", log});
  }
  ASSERT_GT(l.server, 0);
  int status = 0;
  ASSERT_EQ(waitpid(l.server, &status, WUNTRACED), l.server);
  ASSERT_TRUE(WIFSTOPPED(status));
  const size_t before = proc::list_fds(l.rp.pid).size();
  ASSERT_EQ(ptrace(PTRACE_SEIZE, l.rp.pid, 0, 0), 0) << std::strerror(errno);
  ASSERT_TRUE(send_signal(l.server, SIGCONT));
  EXPECT_EQ(l.wait_server(), 0);
  const std::string s = read_text(l.stats);
  EXPECT_EQ(json_number(s, "closed"), 0) << s;
  EXPECT_EQ(json_number(s, "left"), 1) << s;
  const std::string text = read_text(log);
  EXPECT_NE(text.find("pid " + std::to_string(l.rp.pid) + " keeps descriptor "), std::string::npos)
      << text;
  EXPECT_NE(text.find("already traced by pid " + std::to_string(getpid())), std::string::npos)
      << text;
  EXPECT_EQ(proc::list_fds(l.rp.pid).size(), before) << "the keeper is still there";
  // Let it go (a seized, running tracee is interrupted before it can be detached).
  ASSERT_EQ(ptrace(PTRACE_INTERRUPT, l.rp.pid, 0, 0), 0);
  ASSERT_EQ(waitpid(l.rp.pid, &status, __WALL), l.rp.pid);
  ASSERT_EQ(ptrace(PTRACE_DETACH, l.rp.pid, 0, 0), 0) << std::strerror(errno);
  t.go();
  EXPECT_EQ(l.lz->read_line(), "verified ok");
  EXPECT_EQ(l.rp.wait(), 0);
}

// The "pipe:[N]" link of a descriptor of ours.
std::string link_of(int fd) {
  struct stat st {};
  EXPECT_EQ(fstat(fd, &st), 0);
  return "pipe:[" + std::to_string(st.st_ino) + "]";
}

// Descriptors of `pid` that lead to one of `links`.
std::vector<std::string> holding(pid_t pid, const std::vector<std::string>& links) {
  std::vector<std::string> out;
  for (int fd : proc::list_fds(pid)) {
    char buf[128];
    const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
    ssize_t n = readlink(path.c_str(), buf, sizeof buf);
    if (n <= 0) continue;
    const std::string l(buf, static_cast<size_t>(n));
    for (const auto& want : links)
      if (l == want) out.push_back(std::to_string(fd) + " -> " + l);
  }
  return out;
}

TEST(LazyDetach, ServerAndGuardianHoldNoneOfTheCallersPipes) {
  for (bool log_file : {false, true}) {
    SCOPED_TRACE(log_file ? "with --log-file" : "without --log-file");
    EventsTarget t;
    TempDir logs;
    const std::string spid = logs / "server.pid";
    int out[2], err[2];
    ASSERT_EQ(pipe2(out, O_CLOEXEC), 0);
    ASSERT_EQ(pipe2(err, O_CLOEXEC), 0);
    std::vector<std::string> args{lazycr_bin()};
    if (log_file) {
      args.push_back("--log-file");
      args.push_back(logs / "lazycr.log");
    }
    for (const std::string& a :
         {std::string("restore"), std::string("--lazy"), std::string("-d"),
          std::string("--shell-job"), std::string("--prefetch"), std::string("off"),
          std::string("-D"), t.dir, std::string("--server-pidfile"), spid})
      args.push_back(a);
    pid_t lz = fork();
    ASSERT_GE(lz, 0);
    if (lz == 0) {
      dup2(out[1], 1);
      dup2(err[1], 2);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    close(err[1]);
    Restored rp;
    rp.pid = t.pid();
    int status = 0;
    ASSERT_EQ(waitpid(lz, &status, 0), lz);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
    const pid_t server = read_pidfile(spid);
    ASSERT_GT(server, 0);
    const pid_t guardian = guardian_of(server);
    ASSERT_GT(guardian, 0);
    // The restored process has them (--shell-job: the caller's stdio is its own), the server
    // and its guardian (idle: nothing touched, prefetch off) must not.
    const std::vector<std::string> links{link_of(out[0]), link_of(err[0])};
    for (pid_t p : {server, guardian}) {
      const auto held = holding(p, links);
      EXPECT_TRUE(held.empty()) << "pid " << p << " holds the caller's pipe: " << held.front();
    }
    if (!log_file) {
      EXPECT_TRUE(fs::exists("/run/lazycr/server-" + std::to_string(server) + ".log"));
    }
    t.send("exit");
    EXPECT_EQ(rp.wait(), 0);
    EXPECT_EQ(reap(server), 0);
    if (!log_file) {
      // Nothing was said: the empty log does not stay behind (one per detached restore).
      const std::string log = "/run/lazycr/server-" + std::to_string(server) + ".log";
      EXPECT_FALSE(fs::exists(log)) << proc::try_read_file(log).value_or("");
      fs::remove(log);
    }
    close(out[0]);
    close(err[0]);
  }
}

// lazycr lets the process go before the page server says it is ready (it starts up
// meanwhile, and a fault waits for it); a server that fails to start then still fails the
// restore, with the server's error, and kills the process: nothing runs on without its pages.
// In a new PID namespace and detached too.
TEST(LazyKill, ServerFailingToStartFailsTheRestoreAndLeavesNothing) {
  StateTarget t({"--mib", "2"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);
  for (bool pidns : {false, true}) {
    for (bool detach : {false, true}) {
      SCOPED_TRACE(std::string(pidns ? "pidns" : "") + (detach ? " detached" : ""));
      std::vector<std::string> args{"restore", "--lazy", "-D", dir, "--shell-job"};
      if (pidns) args.push_back("--pidns");
      if (detach) args.push_back("-d");
      ScopedEnv env("LAZYCR_FAULT_INJECT", "server-start");
      auto r = lazycr(args);
      EXPECT_EQ(r.exit_code, 1) << r.err;
      EXPECT_NE(r.err.find("restore: server-ready for "), std::string::npos) << r.err;
      EXPECT_NE(r.err.find("injected fault before the page server was ready"), std::string::npos)
          << r.err;
      expect_nothing_left(t.pid());
    }
  }
  t.go();
  auto r = lazycr({"restore", "--lazy", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

// The process SIGKILLed while the server traces every thread of it to close the keeper (it
// stops itself inside the injected close: LAZYCR_FAULT_INJECT=keeper-stop-in-injected-close).
// Its threads die traced by the server: their zombies are the server's to reap, and the
// leader's exit cannot be reported before they are. The server must reap them, let the
// process go to its parent and end, not wait for the leader forever (a hang seen with a
// multi-threaded redis-server killed ~50 ms after a detached lazy restore).
TEST(LazyKill, ProcessKilledWhileTheServerTracesItsThreads) {
  StateTarget t({"--mib", "16"});
  ASSERT_GE(proc::list_tasks(t.pid()).size(), 2u) << "the target must be multi-threaded";
  TempDir images, work;
  t.dump(images / "img");
  LazyDetached l;
  {
    ScopedEnv env("LAZYCR_FAULT_INJECT", "keeper-stop-in-injected-close");
    l.start(images / "img", work);
  }
  ASSERT_GT(l.server, 0);
  ASSERT_GT(l.rp.pid, 0);
  int status = 0;
  ASSERT_EQ(waitpid(l.server, &status, WUNTRACED), l.server);
  ASSERT_TRUE(WIFSTOPPED(status)) << "the server ended before it traced the process";
  ASSERT_TRUE(send_signal(l.rp.pid, SIGKILL));
  ASSERT_TRUE(wait_exited(l.rp.pid));
  ASSERT_TRUE(send_signal(l.server, SIGCONT));
  // A bound, not a timing: the server has nothing left to do but end.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  pid_t r = 0;
  while ((r = waitpid(l.server, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (r == 0) {
    const std::string stack =
        proc::try_read_file("/proc/" + std::to_string(l.server) + "/stack").value_or("");
    ADD_FAILURE() << "the page server hangs (wchan " << wchan_of(l.server) << "):\n" << stack;
    send_signal(l.server, SIGKILL);
    reap(l.server);
  } else {
    EXPECT_EQ(r, l.server);
  }
  l.server = 0;
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  expect_nothing_left(t.pid());
}

}  // namespace
}  // namespace lazycr::test
