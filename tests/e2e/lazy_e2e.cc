// `lazycr restore --lazy` against real processes and the real kernel:
// - every eager restore scenario again, lazily: the restored target verifies itself, its maps,
//   TIDs and /proc state are the original's, 20 restores in a row, python3, vector registers
//   and TIDs from inside, --pidns while the original runs, a failure at any step (the lazy
//   steps included) leaves nothing behind, the page server included;
// - layout changes while pages are still owed (--prefetch off), each checked from inside by
//   lazy_events_target: mremap, MADV_DONTNEED, munmap + a new mapping there, fork, threads
//   faulting the same pages;
// - a page server killed with SIGKILL mid-way: the restored process is killed by the guardian
//   and never reads zero pages (its check would print a verdict if it ran on); a corrupt frame
//   met while serving: the same;
// - a 2 GiB image with prefetch on and off.
// Nothing here depends on timing: the page server's progress is never waited for except
// through the process's own verdicts and exits.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "common/proc.h"
#include "common/signals.h"
#include "image-format/page_store.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/lazy_helpers.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// ---- every eager scenario, lazily ------------------------------------------------------------

TEST(Lazy, StateTargetComesBackWithItsMapsTidsAndState) {
  StateTarget t({"--mib", "16"});
  TempDir images, work;
  std::string dir = images / "img";
  t.dump(dir);
  LazyDetached l;
  l.start(dir, work);
  ASSERT_EQ(l.rp.pid, t.pid());
  // While pages are owed (or not: prefetch runs) the process cannot tell.
  EXPECT_EQ(maps_of(l.rp.pid), t.maps);
  expect_tids(tids_of(l.rp.pid), t.info.list("tids"));
  // The server ends when the prefetch has served everything; the areas it let go of stay as
  // they were (no merge when the uffd is released).
  EXPECT_EQ(l.wait_server(), 0);
  EXPECT_EQ(maps_of(l.rp.pid), t.maps);
  // No userfaultfd inside, and the keeper parked there while pages were owed is closed:
  // exactly the image's descriptors.
  expect_same(t.state, snapshot(l.rp.pid, t.stable_tids()));
  std::string stats = read_text(l.stats);
  EXPECT_GT(json_number(stats, "lazy_pages"), 4000) << stats;
  EXPECT_GT(json_number(stats, "time_until_nothing_owed_ns"), 0) << stats;
  EXPECT_EQ(json_number(stats, "killed"), 0) << stats;
  t.go();
  EXPECT_EQ(l.lz->read_line(), "verified ok");
  EXPECT_EQ(l.rp.wait(), 0);
}

TEST(Lazy, ForegroundExitsWithTheProcessStatusAndWritesStats) {
  TempDir images, work;
  {
    StateTarget t({"--mib", "8"});
    t.dump(images / "a");
    t.go();  // it verifies as soon as it runs again
    std::string stats = work / "a.json";
    auto r = lazycr({"-v", "restore", "--lazy", "-D", images / "a", "--shell-job", "--stats", stats,
                     "--prefetch", "off"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "verified ok\n");
    expect_nothing_left(t.pid());  // the page server too
    // The stats are complete when lazycr returns; -v summarised them.
    std::string s = read_text(stats);
    for (const char* key : {"time_to_first_instruction_ns", "time_until_nothing_owed_ns", "faults",
                            "by_fault", "by_prefetch", "zero", "p50", "p90", "p99", "max",
                            "bytes_decompressed", "fork", "remap", "remove", "unmap"})
      EXPECT_NE(s.find("\"" + std::string(key) + "\":"), std::string::npos) << key << " in " << s;
    // Prefetch off: what the process never touched was still owed when it exited.
    EXPECT_EQ(json_number(s, "time_until_nothing_owed_ns"), -1) << s;
    EXPECT_GT(json_number(s, "faults"), 0) << s;
    EXPECT_EQ(json_number(s, "by_prefetch"), 0) << s;
    EXPECT_GT(json_number(s, "by_fault"), 2000) << s;  // the 8 MiB buffer, at least
    EXPECT_GT(json_number(s, "time_to_first_instruction_ns"), 0);
    EXPECT_NE(r.err.find("first instruction after"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("page server: 1 process"), std::string::npos) << r.err;
  }
  {
    StateTarget t;
    t.dump(images / "b");
    std::string pidfile = images / "pid";
    Child lz({lazycr_bin(), "restore", "--lazy", "--prefetch", "off", "-D", images / "b",
              "--shell-job", "--pidfile", pidfile});
    for (int i = 0; i < 5000 && !fs::exists(pidfile); i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ASSERT_TRUE(fs::exists(pidfile));
    EXPECT_EQ(std::atoi(proc::read_file(pidfile).c_str()), t.pid());
    ASSERT_TRUE(send_signal(t.pid(), SIGKILL));
    EXPECT_EQ(lz.wait(), 128 + SIGKILL);
    expect_nothing_left(t.pid());
  }
}

TEST(Lazy, SameImageTwentyTimesInARow) {
  StateTarget t({"--mib", "4", "--pattern", "random", "--shared"});
  TempDir images;
  t.dump(images / "img");
  t.go();
  for (int i = 0; i < 20; i++) {
    // Alternately with and without prefetch, and with a 4 KiB window now and then.
    std::vector<std::string> args{"restore",           "--lazy",      "-D",
                                  images / "img",      "--shell-job", "--prefetch",
                                  i % 2 ? "off" : "on"};
    if (i % 5 == 4) {
      args.push_back("--window");
      args.push_back("4K");
    }
    auto r = lazycr(args);
    ASSERT_EQ(r.exit_code, 0) << "round " << i << ": " << r.err;
    ASSERT_EQ(r.out, "verified ok\n") << "round " << i;
  }
  expect_nothing_left(t.pid());
}

TEST(Lazy, WhileTheOriginalRunsInANewPidNamespace) {
  StateTarget t({"--mib", "8"});
  TempDir images, work;
  t.dump(images / "img", /*leave_running=*/true);

  LazyDetached l;
  l.start(images / "img", work, {"--pidns", "--prefetch", "off"});
  ASSERT_GT(l.rp.pid, 0);
  ASSERT_NE(l.rp.pid, t.pid());
  std::istringstream nspid(status_field(l.rp.pid, "NSpid"));
  pid_t outer = 0, inner = 0;
  nspid >> outer >> inner;
  EXPECT_EQ(inner, t.pid());
  pid_t reaper = std::atoi(status_field(l.rp.pid, "PPid").c_str());
  EXPECT_EQ(maps_of(l.rp.pid), t.maps);
  // Pages are owed (prefetch off): besides the original's descriptors it holds exactly one,
  // the page server's keeper (uffd/keeper.h), a socket, close-on-exec.
  auto original = snapshot(t.pid(), {});
  auto restored = snapshot(l.rp.pid, {});
  std::vector<std::string> extra;
  for (const auto& [key, value] : restored)
    if (key.rfind("fd ", 0) == 0 && !original.count(key)) extra.push_back(key);
  ASSERT_EQ(extra.size(), 1u) << "descriptors the original does not have";
  EXPECT_EQ(restored[extra[0]].rfind("socket:[", 0), 0u) << restored[extra[0]];
  const std::string info = "fdinfo " + extra[0].substr(3);
  EXPECT_TRUE(std::stoi(restored[info].substr(restored[info].find(' ') + 1)) & O_CLOEXEC);
  restored.erase(extra[0]);
  restored.erase(info);
  expect_same(original, restored);

  t.go();
  EXPECT_EQ(t.child->read_line(), "verified ok");
  EXPECT_EQ(t.child->wait(), 0);
  EXPECT_EQ(l.lz->read_line(), "verified ok");
  EXPECT_EQ(reap(reaper), 0);
  l.rp.reaped = true;
  EXPECT_EQ(l.wait_server(), 0);
  EXPECT_EQ(json_number(read_text(l.stats), "killed"), 0);
}

TEST(Lazy, FaultAtEachStepLeavesNothingBehind) {
  StateTarget t({"--mib", "2"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);
  const std::vector<std::string> steps = {
      "create",           "seize",          "pin",       "trampoline", "rseq",
      "close-fds",        "unmap",          "vdso",      "map-areas",  "uffd",
      "server",           "fill",           "protect",   "mm",         "after-shaping",
      "process-state",    "sigactions",     "fds",       "session",    "thread-state",
      "threads",          "thread-created", "signals",   "rlimits",    "credentials",
      "unmap-trampoline", "release",        "registers", "detach",     "server-ready"};
  for (const auto& step : steps) {
    for (bool pidns : {false, true}) {
      if (pidns && step != "uffd" && step != "release" && step != "detach" &&
          step != "server-ready")
        continue;
      for (const char* prefetch : {"on", "off"}) {
        std::vector<std::string> args{"restore", "--lazy",         "-D",
                                      dir,       "--shell-job",    "--prefetch",
                                      prefetch,  "--fault-inject", step};
        if (pidns) args.push_back("--pidns");
        auto r = lazycr(args);
        EXPECT_EQ(r.exit_code, 1) << step << ": " << r.err;
        std::string reported = step == "thread-created" ? "threads" : step;
        EXPECT_NE(r.err.find("restore: " + reported + " for "), std::string::npos) << r.err;
        EXPECT_NE(r.err.find("injected fault"), std::string::npos) << r.err;
        // One line: the page server of a failed restore leaves quietly.
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << step << ": " << r.err;
        expect_nothing_left(t.pid());
      }
    }
  }
  t.go();
  auto r = lazycr({"restore", "--lazy", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

// The lazy probe and the MAC check run on a thread beside the creation of the tree
// (restore/parallel_checks.h): when they refuse the image after the tree is made, the restore
// still fails before the tree's first instruction and leaves nothing behind, lazy or eager.
TEST(Lazy, ChecksBesideCreationRefuseBeforeTheFirstInstruction) {
  StateTarget t({"--mib", "2"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);
  for (bool lazy : {true, false}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    std::vector<std::string> args{"restore", "-D", dir, "--shell-job", "--fault-inject", "checks"};
    if (lazy) args.push_back("--lazy");
    auto r = lazycr(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_EQ(r.out, "") << r.out;  // the target prints once it runs
    EXPECT_NE(
        r.err.find("restore: validate for pid " + std::to_string(t.pid()) + ": injected fault"),
        std::string::npos)
        << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    expect_nothing_left(t.pid());
  }
  t.go();
  auto r = lazycr({"restore", "--lazy", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

TEST(Lazy, ManyAreasOfEveryKind) {
  TempDir work;
  std::string verify = work / "verify";
  Child target({target_bin("areas_target"), "--areas", "300", "--verify-file", verify, "--workdir",
                work.path()});
  ASSERT_EQ(target.wait_for("ready").rfind("ready pid=", 0), 0u);
  std::string maps = maps_of(target.pid());
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  LazyDetached l;
  l.start(images / "img", work, {"--prefetch", "off"});
  ASSERT_EQ(l.rp.pid, target.pid());
  EXPECT_EQ(maps_without_shmem_inodes(maps_of(l.rp.pid)), maps_without_shmem_inodes(maps));
  std::ofstream(verify) << "go";
  EXPECT_EQ(l.lz->read_line(), "verified ok");
  EXPECT_EQ(l.rp.wait(), 0);
  EXPECT_EQ(l.wait_server(), 0);
  std::string s = read_text(l.stats);
  EXPECT_GT(json_number(s, "lazy_areas"), 100) << s;
  EXPECT_EQ(json_number(s, "killed"), 0) << s;
}

TEST(Lazy, TidsAndVectorRegistersFromInside) {
  TempDir work;
  std::string verify = work / "verify";
  Child target({target_bin("tid_avx_target"), "--verify-file", verify});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  ASSERT_EQ(info.list("tids").size(), 4u);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  std::ofstream(verify) << "go";
  for (const char* prefetch : {"on", "off"}) {
    auto r =
        lazycr({"restore", "--lazy", "--prefetch", prefetch, "-D", images / "img", "--shell-job"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "verified ok\n") << "prefetch " << prefetch << " avx=" << info.str("avx")
                                      << " avx512=" << info.str("avx512");
  }
}

TEST(Lazy, AnotherUsersProcessGetsItsCredentialsBack) {
  // Its pages are still owed (prefetch off) while it runs as another user: the userfaultfd
  // was made while it was still root, and is served by lazycr's root page server.
  Child target({target_bin("creds_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = target.pid();
  std::map<std::string, std::string> before;
  for (const char* key :
       {"Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"})
    before[key] = status_field(pid, key);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);

  Child restore({lazycr_bin(), "restore", "--lazy", "--prefetch", "off", "-D", images / "img",
                 "--shell-job"});
  Restored rp;  // killed if the test fails
  rp.pid = pid;
  for (int i = 0; i < 5000; i++) {
    if (proc::exists(pid) && status_field(pid, "TracerPid") == "\t0" &&
        status_field(pid, "Uid") == before["Uid"])
      break;
    usleep(2000);
  }
  for (const auto& [key, value] : before) EXPECT_EQ(status_field(pid, key), value) << key;
  for (int tid : info.list("tids"))
    EXPECT_NE(
        proc::read_file("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/status")
            .find("Uid:" + before["Uid"]),
        std::string::npos)
        << "thread " << tid;
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
  rp.reaped = true;
}

TEST(Lazy, Python3ComputationGivesTheUninterruptedResult) {
  const std::string prog =
      "import hashlib, sys\n"
      "data = list(range(1_000_000))\n"
      "print('ready', flush=True)\n"
      "h = hashlib.sha256(); x = 0\n"
      "for i in range(20_000_000):\n"
      "    h.update(i.to_bytes(8, 'little')); x = (x * 31 + data[i % len(data)]) % 1000000007\n"
      "print(h.hexdigest(), x, sum(data), flush=True)\n";
  auto whole = run({"/usr/bin/python3", "-c", prog}, 300);
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  ASSERT_EQ(whole.out.rfind("ready\n", 0), 0u);
  std::string expected = whole.out.substr(6);

  Child py({"/usr/bin/python3", "-c", prog});
  ASSERT_EQ(py.read_line(), "ready");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(py.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(py.wait(30), 128 + SIGKILL);
  auto r =
      lazycr({"restore", "--lazy", "--prefetch", "off", "-D", images / "img", "--shell-job"}, 300);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, expected);
}

TEST(Lazy, BadOptions) {
  TempDir images;
  EXPECT_EQ(lazycr({"restore", "-D", images / "x", "--stats", images / "s"}).exit_code, 2)
      << "--stats without --lazy";
  EXPECT_EQ(lazycr({"restore", "--lazy", "-D", images / "x", "--prefetch", "maybe"}).exit_code, 2);
  EXPECT_EQ(lazycr({"restore", "--lazy", "-D", images / "x", "--window", "3000"}).exit_code, 2);
  EXPECT_EQ(lazycr({"restore", "--lazy", "-D", images / "x", "--window", "2M"}).exit_code, 2);
  auto r = lazycr({"restore", "--lazy", "-D", images / "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: validate for image"), std::string::npos) << r.err;
  // Refused before anything is created: a stats file that could not be written at the end.
  StateTarget t;
  t.dump(images / "img");
  r = lazycr({"restore", "--lazy", "-D", images / "img", "--shell-job", "--stats",
              images / "no/such/dir/stats.json"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--stats " + images / "no/such/dir/stats.json" + ": cannot write in"),
            std::string::npos)
      << r.err;
  expect_nothing_left(t.pid());
}

// ---- layout changes while pages are owed -----------------------------------------------------

class LazyEvents : public ::testing::TestWithParam<std::string> {};

TEST_P(LazyEvents, WhilePagesAreOwed) {
  const std::string event = GetParam();
  EventsTarget t;
  LazyDetached l;
  l.start(t.dir, t.work, {"--prefetch", "off"});
  ASSERT_EQ(l.rp.pid, t.pid());
  t.send(event);
  EXPECT_EQ(l.lz->read_line(), event + " ok");
  // Whatever the command did not change is still the image's.
  t.send("all");
  EXPECT_EQ(l.lz->read_line(), "all ok");
  t.send("exit");
  EXPECT_EQ(l.rp.wait(), 0);
  EXPECT_EQ(l.wait_server(), 0);
  std::string s = read_text(l.stats);
  EXPECT_EQ(json_number(s, "killed"), 0) << s;
  EXPECT_EQ(json_number(s, "by_prefetch"), 0) << s;
  // The server saw the event it had to follow.
  if (event == "remap") {
    EXPECT_GE(json_number(s, "remap"), 1) << s;
  }
  if (event == "dontneed") {
    EXPECT_GE(json_number(s, "remove"), 2) << s;
  }
  if (event == "unmap") {
    EXPECT_GE(json_number(s, "unmap"), 2) << s;
  }
  if (event == "fork") {
    EXPECT_EQ(json_number(s, "fork"), 1) << s;
    EXPECT_EQ(json_number(s, "processes"), 2) << s;
  }
  if (event == "threads") {
    EXPECT_GT(json_number(s, "faults"), 0) << s;
  }
}

INSTANTIATE_TEST_SUITE_P(Lazy, LazyEvents,
                         ::testing::Values("remap", "dontneed", "unmap", "fork", "threads"),
                         [](const auto& info) { return info.param; });

TEST(Lazy, AllEventsInOneRestore) {
  EventsTarget t;
  LazyDetached l;
  l.start(t.dir, t.work, {"--prefetch", "off", "--window", "4K"});
  for (const char* e : {"threads", "fork", "remap", "unmap", "dontneed", "all"}) {
    t.send(e);
    EXPECT_EQ(l.lz->read_line(), std::string(e) + " ok");
  }
  t.send("exit");
  EXPECT_EQ(l.rp.wait(), 0);
  EXPECT_EQ(l.wait_server(), 0);
}

// ---- the page server dies, or meets a corrupt frame --------------------------------------------

TEST(Lazy, ServerKilledMidWayKillsTheProcessNeverZeroPages) {
  EventsTarget t;
  TempDir logs;
  std::string log = logs / "lazycr.log";
  LazyDetached l;
  l.start(t.dir, t.work, {"--prefetch", "off"}, {"--log-file", log});
  ASSERT_GT(l.server, 0);
  // The process runs, nearly all its pages owed. The server dies.
  ASSERT_TRUE(send_signal(l.server, SIGKILL));
  EXPECT_EQ(l.wait_server(), 128 + SIGKILL);
  // Asked to check its memory, the process would report pages reading zero if it ran on
  // without a server ("all FAILED: ... reads zero"); it must be killed instead, silently.
  t.send("all");
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.lz->read_rest(), "") << "the process ran on without its page server";
  // The guardian says why, then ends (re-parented to us when the server died).
  for (pid_t g : children_named("lazycr-guardian")) EXPECT_EQ(reap(g), 1);
  std::string text = read_text(log);
  EXPECT_NE(text.find("lazycr guardian: the page server (pid "), std::string::npos) << text;
  EXPECT_NE(text.find("died before it finished; killed pid " + std::to_string(l.rp.pid)),
            std::string::npos)
      << text;
  expect_nothing_left(t.pid());
}

TEST(Lazy, ServerKilledInForegroundGivesTheKilledStatus) {
  EventsTarget t;
  TempDir logs;
  std::string spid = logs / "server.pid";
  Child lz({lazycr_bin(), "--log-file", logs / "log", "restore", "--lazy", "--prefetch", "off",
            "-D", t.dir, "--shell-job", "--server-pidfile", spid});
  Restored rp;  // killed if the test fails (it would run on otherwise)
  rp.pid = t.pid();
  pid_t server = read_pidfile(spid);
  ASSERT_GT(server, 0);
  t.send("remap");  // the process runs, owing pages
  EXPECT_EQ(lz.read_line(), "remap ok");
  ASSERT_TRUE(send_signal(server, SIGKILL));
  t.send("all");
  EXPECT_EQ(lz.wait(), 128 + SIGKILL);  // lazycr exits with the killed process's status
  rp.reaped = !proc::exists(rp.pid);    // by lazycr
  EXPECT_EQ(lz.read_rest(), "");
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  EXPECT_NE(read_text(logs / "log").find("lazycr guardian: the page server"), std::string::npos);
  expect_nothing_left(t.pid());
}

TEST(Lazy, ServerStoppedWithSigtermKillsTheOwingProcessWithAMessage) {
  EventsTarget t;
  TempDir logs;
  std::string log = logs / "lazycr.log";
  LazyDetached l;
  l.start(t.dir, t.work, {"--prefetch", "off"}, {"--log-file", log});
  ASSERT_TRUE(send_signal(l.server, SIGTERM));
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.wait_server(), 1);
  EXPECT_EQ(l.lz->read_rest(), "");
  std::string s = read_text(l.stats);
  EXPECT_EQ(json_number(s, "killed"), 1) << s;
  std::string text = read_text(log);
  EXPECT_NE(text.find("page server stopped with"), std::string::npos) << text;
  EXPECT_NE(text.find("killed the process rather than serve wrong memory"), std::string::npos)
      << text;
  expect_nothing_left(t.pid());
}

TEST(Lazy, CorruptFrameWhileServingKillsTheProcessWithAMessage) {
  EventsTarget t;
  // Damage the frame holding the target's "plain" area (lazy: never read before it runs).
  const uint64_t plain = t.info.first("plain");
  ASSERT_GT(plain, 0u);
  std::string store_path = t.dir + "/pages-" + std::to_string(t.pid()) + ".lzp";
  uint64_t offset = 0;
  {
    auto store = image::PageStoreReader::open(store_path);
    const auto& idx = store->index();
    for (const auto& run : idx.runs()) {
      if (run.kind() != image::PageRun::DATA || plain < run.start() ||
          plain >= run.start() + run.pages() * 4096)
        continue;
      const uint64_t frame = (run.first_page() + (plain - run.start()) / 4096) / idx.frame_pages();
      ASSERT_LT(frame, store->frame_count());
      offset = store->frame(frame).offset + store->frame(frame).size / 2;
    }
  }
  ASSERT_GT(offset, 0u);
  {
    int fd = open(store_path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    unsigned char b = 0;
    ASSERT_EQ(pread(fd, &b, 1, static_cast<off_t>(offset)), 1);
    b ^= 0x40;
    ASSERT_EQ(pwrite(fd, &b, 1, static_cast<off_t>(offset)), 1);
    close(fd);
  }
  TempDir logs;
  std::string log = logs / "lazycr.log";
  LazyDetached l;
  // Trusted anyway (its MAC no longer matches): the frame is checked as it is served.
  l.start(t.dir, t.work, {"--prefetch", "off", "--trust-image"}, {"--log-file", log});
  t.send("all");  // touches the damaged frame's pages
  EXPECT_EQ(l.rp.wait(), 128 + SIGKILL);
  EXPECT_EQ(l.lz->read_rest(), "") << "the process went on past a page it could not be served";
  EXPECT_EQ(l.wait_server(), 1);
  std::string s = read_text(l.stats);
  EXPECT_EQ(json_number(s, "killed"), 1) << s;
  std::string text = read_text(log);
  EXPECT_NE(text.find("page server: pid " + std::to_string(l.rp.pid)), std::string::npos) << text;
  EXPECT_NE(text.find("killed the process rather than serve wrong memory"), std::string::npos)
      << text;
  expect_nothing_left(t.pid());
}

// ---- a large image -----------------------------------------------------------------------------

TEST(Lazy, TwoGiBImageVerifiedWithPrefetchOnAndOff) {
  StateTarget t({"--mib", "2048"});
  TempDir images;
  t.dump(images / "img");
  t.go();
  for (const char* prefetch : {"on", "off"}) {
    auto r = lazycr({"restore", "--lazy", "--prefetch", prefetch, "-D", images / "img",
                     "--shell-job", "--stats", images / "stats.json"},
                    300);
    EXPECT_EQ(r.exit_code, 0) << "prefetch " << prefetch << ": " << r.err;
    EXPECT_EQ(r.out, "verified ok\n") << "prefetch " << prefetch;
    std::string s = read_text(images / "stats.json");
    EXPECT_GT(json_number(s, "lazy_pages"), 2048 * 256 - 1) << s;
    EXPECT_EQ(json_number(s, "killed"), 0) << s;
    if (std::string(prefetch) == "off") {
      EXPECT_EQ(json_number(s, "by_prefetch"), 0) << s;
    }
  }
  expect_nothing_left(t.pid());
}

}  // namespace
}  // namespace lazycr::test
