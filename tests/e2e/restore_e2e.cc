// `lazycr restore` (eager) against real processes: the restored process verifies itself (its
// verdict comes through lazycr's own stdout, given to it with --shell-job), its maps and TIDs
// are the original's, refusals name what is wrong, and a failure at any step leaves nothing
// behind.
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
#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

namespace fs = boost::filesystem;

TEST(Restore, StateTargetComesBackWithItsMapsTidsAndState) {
  StateTarget t({"--mib", "16"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);

  Child lz({lazycr_bin(), "restore", "-D", dir, "--shell-job", "--detach"});
  Restored rp;
  rp.pid = std::atoi(lz.read_line().c_str());
  EXPECT_EQ(lz.wait(), 0);
  ASSERT_EQ(rp.pid, t.pid());
  // The restored process cannot tell: same maps (vdso and vvar included), same TIDs.
  EXPECT_EQ(maps_of(rp.pid), t.maps);
  expect_tids(tids_of(rp.pid), t.info.list("tids"));
  expect_same(t.state, snapshot(rp.pid, t.stable_tids()));
  // Its own verdict on memory, files, signals and threads, through lazycr's stdout.
  t.go();
  EXPECT_EQ(lz.read_line(), "verified ok");
  EXPECT_EQ(rp.wait(), 0);
}

TEST(Restore, ForegroundExitsWithTheProcessStatus) {
  TempDir images;
  {
    StateTarget t;
    t.dump(images / "a");
    t.go();  // it verifies as soon as it runs again
    auto r = lazycr({"restore", "-D", images / "a", "--shell-job"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "verified ok\n");
    expect_nothing_left(t.pid());
  }
  {
    StateTarget t;
    t.dump(images / "b");
    std::string pidfile = images / "pid";
    Child lz({lazycr_bin(), "restore", "-D", images / "b", "--shell-job", "--pidfile", pidfile});
    for (int i = 0; i < 5000 && !fs::exists(pidfile); i++)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    ASSERT_TRUE(fs::exists(pidfile));
    EXPECT_EQ(std::atoi(proc::read_file(pidfile).c_str()), t.pid());
    ASSERT_TRUE(send_signal(t.pid(), SIGKILL));
    EXPECT_EQ(lz.wait(), 128 + SIGKILL);
    expect_nothing_left(t.pid());
  }
}

// A stopped job comes back stopped, eager and lazy: it runs no instruction until continued.
TEST(Restore, AStoppedJobComesBackStopped) {
  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    StateTarget t({"--mib", "4"});
    ASSERT_TRUE(send_signal(t.pid(), SIGSTOP));
    int status = 0;
    ASSERT_EQ(waitpid(t.pid(), &status, WUNTRACED), t.pid());
    ASSERT_TRUE(WIFSTOPPED(status));
    TempDir images;
    t.dump(images / "img");
    image::ImageReader img(images / "img");
    EXPECT_EQ(img.process(t.pid()).stop_signo(), SIGSTOP);
    t.go();  // it would verify and exit at once if it ran

    std::vector<std::string> args{lazycr_bin(),   "restore",     "-D",
                                  images / "img", "--shell-job", "--detach"};
    const std::string server_pidfile = images / "server.pid";
    if (lazy) args.insert(args.end(), {"--lazy", "--server-pidfile", server_pidfile});
    Child lz(args);
    Restored rp;
    rp.pid = std::atoi(lz.read_line().c_str());
    EXPECT_EQ(lz.wait(), 0);
    ASSERT_EQ(rp.pid, t.pid());
    char state = '?';
    for (int i = 0; i < 10000 && state != 'T'; i++) {
      state = proc::read_stat(rp.pid).state;
      if (state != 'T') std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(state, 'T') << "the restored job is not stopped";
    ASSERT_TRUE(send_signal(rp.pid, SIGCONT));
    EXPECT_EQ(lz.read_line(), "verified ok");
    EXPECT_EQ(rp.wait(), 0);
    // The detached page server is ours now (subreaper); it ends once the process is gone.
    if (lazy) reap(std::atoi(proc::read_file(server_pidfile).c_str()));
  }
}

TEST(Restore, SameImageTwentyTimesInARow) {
  // With shared anonymous memory and a memfd: their contents come back each time.
  StateTarget t({"--mib", "4", "--pattern", "random", "--shared"});
  TempDir images;
  t.dump(images / "img");
  t.go();
  for (int i = 0; i < 20; i++) {
    auto r = lazycr({"restore", "-D", images / "img", "--shell-job"});
    ASSERT_EQ(r.exit_code, 0) << "round " << i << ": " << r.err;
    ASSERT_EQ(r.out, "verified ok\n") << "round " << i;
  }
  expect_nothing_left(t.pid());
}

TEST(Restore, WhileTheOriginalRunsInANewPidNamespace) {
  StateTarget t({"--mib", "8"});
  TempDir images;
  t.dump(images / "img", /*leave_running=*/true);

  Child lz({lazycr_bin(), "restore", "-D", images / "img", "--shell-job", "--pidns", "--detach"});
  Restored rp;
  rp.pid = std::atoi(lz.read_line().c_str());
  EXPECT_EQ(lz.wait(), 0);
  ASSERT_GT(rp.pid, 0);
  ASSERT_NE(rp.pid, t.pid());
  // Inside its namespace it has the original's pid and tids; its parent is the reaper, PID 1.
  std::istringstream nspid(status_field(rp.pid, "NSpid"));
  pid_t outer = 0, inner = 0;
  nspid >> outer >> inner;
  EXPECT_EQ(outer, rp.pid);
  EXPECT_EQ(inner, t.pid());
  pid_t reaper = std::atoi(status_field(rp.pid, "PPid").c_str());
  std::istringstream reaper_ns(status_field(reaper, "NSpid"));
  pid_t r_outer = 0, r_inner = 0;
  reaper_ns >> r_outer >> r_inner;
  EXPECT_EQ(r_inner, 1) << "the restored process's parent is PID 1 of its namespace";
  EXPECT_EQ(maps_of(rp.pid), t.maps);
  // The same process state (threads are compared by their ids inside, below).
  expect_same(snapshot(t.pid(), {}), snapshot(rp.pid, {}));
  std::set<int> inner_tids;
  for (int tid : tids_of(rp.pid)) {
    std::istringstream ns(proc::read_file("/proc/" + std::to_string(rp.pid) + "/task/" +
                                          std::to_string(tid) + "/status")
                              .substr(0));
    std::string line;
    while (std::getline(ns, line))
      if (line.rfind("NSpid:", 0) == 0) {
        std::istringstream v(line.substr(6));
        int o, i;
        v >> o >> i;
        inner_tids.insert(i);
      }
  }
  expect_tids(inner_tids, t.info.list("tids"));

  // Two independent processes, both correct.
  t.go();
  EXPECT_EQ(t.child->read_line(), "verified ok");
  EXPECT_EQ(t.child->wait(), 0);
  EXPECT_EQ(lz.read_line(), "verified ok");
  // The reaper (re-parented to us) leaves with the restored process's status.
  EXPECT_EQ(reap(reaper), 0);
  rp.reaped = true;
}

TEST(Restore, RefusesAPidInUseAndNamesIt) {
  StateTarget t;
  TempDir images;
  t.dump(images / "img", /*leave_running=*/true);
  auto r = lazycr({"restore", "-D", images / "img", "--shell-job"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: validate for pid " + std::to_string(t.pid())), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("in use: " + std::to_string(t.pid()) + " (state_target)"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("--pidns"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
  expect_nothing_left(-1, {t.pid()});
  t.go();
  EXPECT_EQ(t.child->read_line(), "verified ok");
  EXPECT_EQ(t.child->wait(), 0);
}

// fd 1 is our pipe (its reading end is outside the image): refused without --shell-job, with
// the way out named. The target's own pipe (both ends inside) comes back either way.
TEST(Restore, RefusesAnOutsidePipeWithoutShellJobAndRestoresItsOwnPipe) {
  StateTarget t({"--pipe"});
  TempDir images;
  auto d = lazycr(
      {"dump", "--skip-unsupported-fds", "-t", std::to_string(t.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(t.child->wait(30), 128 + SIGKILL);
  auto r = lazycr({"restore", "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("fd 1 is a PIPE"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--shell-job"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("restore: validate for pid " + std::to_string(t.pid())), std::string::npos)
      << r.err;
  expect_nothing_left(t.pid());
  t.go();
  r = lazycr({"restore", "-D", images / "img", "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

TEST(Restore, RefusesAChangedMappedFile) {
  TempDir bin;
  std::string copy = bin / "state_target";
  fs::copy_file(target_bin("state_target"), copy);
  fs::permissions(copy, fs::perms(0755));
  StateTarget t({}, copy);
  TempDir images;
  t.dump(images / "img");
  std::ofstream(copy, std::ios::app) << "changed";
  auto r = lazycr({"restore", "-D", images / "img", "--shell-job"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: validate for pid " + std::to_string(t.pid())), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find(copy + " changed since the dump (size"), std::string::npos) << r.err;
  expect_nothing_left(t.pid());
}

TEST(Restore, RefusesADamagedImage) {
  StateTarget t({"--mib", "4", "--pattern", "random"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);
  auto flip = [](const std::string& path, off_t off) {
    int fd = open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0) << path;
    unsigned char b = 0;
    ASSERT_EQ(pread(fd, &b, 1, off), 1);
    b ^= 0x40;
    ASSERT_EQ(pwrite(fd, &b, 1, off), 1);
    close(fd);
  };
  // Metadata: refused before anything exists.
  fs::copy(dir, images / "meta");
  std::string proc_file = images / "meta" + "/process-" + std::to_string(t.pid()) + ".pb";
  flip(proc_file, static_cast<off_t>(fs::file_size(proc_file) / 2));
  auto r = lazycr({"restore", "-D", images / "meta", "--shell-job"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: validate for image"), std::string::npos) << r.err;
  expect_nothing_left(t.pid());
  // Page data: frames are checked as they are read, in the middle of the restore; the
  // half-built process is killed and reaped.
  fs::copy(dir, images / "pages");
  flip(images / "pages" + "/pages-" + std::to_string(t.pid()) + ".lzp", 64 + 200);
  // A root process's image: its MAC covers the store's index, which holds each frame's
  // SHA-256, not the frames; the damaged frame is refused against its digest as it is read.
  // Trusted anyway (or unprivileged), the same.
  for (const char* trust : {"", "--trust-image"}) {
    std::vector<std::string> args{"restore", "-D", images / "pages", "--shell-job"};
    if (*trust) args.push_back(trust);
    r = lazycr(args);
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("restore: fill for pid " + std::to_string(t.pid())), std::string::npos)
        << r.err;
    EXPECT_NE(r.err.find("frame 0: its "), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("do not match their SHA-256"), std::string::npos) << r.err;
    expect_nothing_left(t.pid());
  }
  // The undamaged image still restores.
  t.go();
  r = lazycr({"restore", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

TEST(Restore, FaultAtEachStepLeavesNothingBehind) {
  StateTarget t({"--mib", "2"});
  TempDir images;
  std::string dir = images / "img";
  t.dump(dir);
  const std::vector<std::string> steps = {
      "create",    "seize",   "pin",           "trampoline",       "rseq",
      "close-fds", "unmap",   "vdso",          "map-areas",        "fill",
      "protect",   "mm",      "after-shaping", "process-state",    "sigactions",
      "fds",       "session", "thread-state",  "threads",          "thread-created",
      "signals",   "rlimits", "credentials",   "unmap-trampoline", "registers",
      "detach"};
  for (const auto& step : steps) {
    for (bool pidns : {false, true}) {
      if (pidns && step != "create" && step != "seize" && step != "fill" && step != "threads" &&
          step != "detach")
        continue;
      std::vector<std::string> args{"restore", "-D", dir, "--shell-job", "--fault-inject", step};
      if (pidns) args.push_back("--pidns");
      auto r = lazycr(args);
      EXPECT_EQ(r.exit_code, 1) << step << ": " << r.err;
      // A fault after the first extra thread exists is reported by the "threads" step.
      std::string reported = step == "thread-created" ? "threads" : step;
      EXPECT_NE(r.err.find("restore: " + reported + " for "), std::string::npos) << r.err;
      EXPECT_NE(r.err.find("injected fault"), std::string::npos) << r.err;
      expect_nothing_left(t.pid());
    }
  }
  t.go();
  auto r = lazycr({"restore", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

// Memory the program asked to have in huge pages (MADV_HUGEPAGE) comes back in huge pages:
// the restore gives an area its THP advice before it writes the area's pages (4 KiB pages
// otherwise, whatever the VmFlags say), and a lazy restore's page server, which fills them
// 4 KiB at a time, collapses them once it owes nothing. Skipped where the original got none
// (THP "never", or none to be had).
uint64_t anon_huge_kb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("AnonHugePages:", 0) == 0) return std::stoull(line.substr(14));
  ADD_FAILURE() << "no AnonHugePages in smaps_rollup of pid " << pid;
  return 0;
}

TEST(Restore, HugePageMemoryComesBackInHugePages) {
  Child t({"/usr/bin/env", "INCR_TARGET_THP=1", target_bin("incr_target"), "32", "0"});
  ASSERT_FALSE(t.wait_for("ready ").empty());
  const pid_t pid = t.pid();
  const uint64_t original = anon_huge_kb(pid);
  if (original == 0) GTEST_SKIP() << "the original got no huge pages on this machine";
  TempDir images;
  const std::string dir = images / "img";
  ASSERT_NO_FATAL_FAILURE(dump_killing(t, dir));

  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    Child restore(restore_argv(dir, lazy));
    ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "incr_target"));
    // The kernel may be short of free 2 MiB blocks at any moment: half the original's is the
    // bar. Lazily, the collapse comes once the server has served everything (well within the
    // 10 s given here; khugepaged, at its defaults, would take 20 s for half of 32 MiB).
    uint64_t restored = anon_huge_kb(pid);
    for (int i = 0; i < 100 && restored < original / 2; i++) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      restored = anon_huge_kb(pid);
    }
    std::printf("AnonHugePages: original %llu kB, restored (%s) %llu kB\n",
                static_cast<unsigned long long>(original), lazy ? "lazy" : "eager",
                static_cast<unsigned long long>(restored));
    EXPECT_GE(restored, original / 2);
    expect_verified(restore, pid);
  }
}

TEST(Restore, ManyAreasOfEveryKind) {
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
  Child lz({lazycr_bin(), "restore", "-D", images / "img", "--shell-job", "--detach"});
  Restored rp;
  rp.pid = std::atoi(lz.read_line().c_str());
  EXPECT_EQ(lz.wait(), 0);
  ASSERT_EQ(rp.pid, target.pid());
  EXPECT_EQ(maps_without_shmem_inodes(maps_of(rp.pid)), maps_without_shmem_inodes(maps));
  std::ofstream(verify) << "go";
  EXPECT_EQ(lz.read_line(), "verified ok");
  EXPECT_EQ(rp.wait(), 0);
}

TEST(Restore, TidsAndVectorRegistersFromInside) {
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
  auto r = lazycr({"restore", "-D", images / "img", "--shell-job"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n")
      << "avx=" << info.str("avx") << " avx512=" << info.str("avx512");
}

// A process of another user with capabilities of its own: restored by root, it has exactly
// its credentials again, in every thread (checked from inside and through /proc).
TEST(Restore, AnotherUsersProcessGetsItsCredentialsBack) {
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

  Child restore({lazycr_bin(), "restore", "-D", images / "img", "--shell-job"});
  // Running (no longer traced by lazycr) means restored: compare, then ask it to verify.
  for (int i = 0; i < 5000; i++) {
    if (proc::exists(pid) && status_field(pid, "TracerPid") == "\t0" &&
        status_field(pid, "Uid") == before["Uid"])
      break;
    usleep(2000);
  }
  for (const auto& [key, value] : before) EXPECT_EQ(status_field(pid, key), value) << key;
  for (int tid : info.list("tids"))
    EXPECT_EQ(
        proc::read_file("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/status")
                .find("Uid:" + before["Uid"]) != std::string::npos,
        true)
        << "thread " << tid;
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(Restore, Python3ComputationGivesTheUninterruptedResult) {
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
  auto r = lazycr({"restore", "-D", images / "img", "--shell-job"}, 300);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, expected);
}

// A --pidfile that cannot be written fails the restore before anything runs, and leaves
// nothing behind (with --pidns, no reaper either); a good one holds the pid once it runs.
TEST(Restore, AnUnwritablePidfileLeavesNothingBehind) {
  StateTarget t;
  TempDir images;
  t.dump(images / "img");
  for (bool pidns : {false, true}) {
    for (const std::string& bad : {std::string("/nonexistent/pid"), images.path()}) {
      SCOPED_TRACE(bad + (pidns ? " --pidns" : ""));
      std::vector<std::string> args{"restore",   "-D", images / "img", "--shell-job", "--detach",
                                    "--pidfile", bad};
      if (pidns) args.push_back("--pidns");
      auto r = lazycr(args);
      EXPECT_EQ(r.exit_code, 1) << r.err;
      EXPECT_NE(r.err.find("--pidfile " + bad), std::string::npos) << r.err;
      EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
      expect_nothing_left(t.pid());
    }
  }
  t.go();
  std::string pidfile = images / "pid";
  auto r = lazycr({"restore", "-D", images / "img", "--shell-job", "--pidfile", pidfile});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
  EXPECT_EQ(std::atoi(proc::read_file(pidfile).c_str()), t.pid());
  for (auto it = fs::directory_iterator(images.path()); it != fs::directory_iterator(); ++it)
    EXPECT_EQ(it->path().string().find(".tmp-"), std::string::npos) << it->path();
}

TEST(Restore, BadOptionsAndMissingImage) {
  EXPECT_EQ(lazycr({"restore"}).exit_code, 2);
  EXPECT_EQ(lazycr({"restore", "--help"}).exit_code, 0);
  TempDir images;
  auto r = lazycr({"restore", "-D", images / "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: validate for image"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

// A restore by an ordinary user gets as far as creating the first process, where choosing its
// PID needs privilege: the refusal says so (it was the bare EPERM of clone3), nothing is left.
TEST(Restore, UnprivilegedRestoreSaysExactPidsNeedRoot) {
  const std::vector<std::string> as_nobody{"/usr/bin/setpriv", "--reuid", "65534",
                                           "--regid",          "65534",   "--clear-groups"};
  std::vector<std::string> argv = as_nobody;
  for (const char* a :
       {"/usr/bin/python3", "-c", "import time; print('ready', flush=True); time.sleep(100000)"})
    argv.push_back(a);
  Child py(argv);
  py.wait_for("ready");
  pid_t pid = py.pid();
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(py.wait(30), 128 + SIGKILL);
  // Readable by the user who restores it.
  for (const auto& dir : {images.path(), images / "img"}) fs::permissions(dir, fs::perms(0755));
  for (fs::directory_iterator it(images / "img"), end; it != end; ++it)
    fs::permissions(it->path(), fs::perms(0644));
  argv = as_nobody;
  argv.push_back(lazycr_bin());
  for (const char* a : {"restore", "--shell-job", "-D"}) argv.push_back(a);
  argv.push_back(images / "img");
  auto r = run(argv);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("restore: create for pid " + std::to_string(pid) +
                       ": restoring a process with its own PID needs root (or "
                       "CAP_CHECKPOINT_RESTORE)"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  expect_nothing_left(pid);
}

}  // namespace
}  // namespace lazycr::test
