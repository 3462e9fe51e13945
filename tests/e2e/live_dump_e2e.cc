// Live dumps (`lazycr dump --leave-running`): the tree is frozen only while its state is
// recorded and each process gets a copy-on-write twin; its memory is read from the twins while
// it runs on. A target writing generations all the time, and acting on its memory (munmap,
// MADV_DONTNEED, mremap, fork, rewrites of shared / DONTFORK / WIPEONFORK memory) while its
// pages are read, restores (eager and lazy) to one instant it checks from inside. After the
// dump it has no extra child or descriptor; a lazycr SIGKILLed mid-way leaves no twin.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/signals.h"
#include "tests/e2e/harness.h"

namespace lazycr::test {
namespace {

// The read is slowed (test knob) so that the target acts while its pages are being read.
constexpr char kSlowRead[] = "LAZYCR_TEST_LIVE_READ_DELAY_US=20000";

std::set<std::string> entries(const std::string& dir) {
  std::set<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d))
      if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.insert(e->d_name);
    closedir(d);
  }
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Children of every thread of `pid` (/proc/PID/task/*/children).
std::string children_of(pid_t pid) {
  std::string all;
  for (const auto& tid : entries("/proc/" + std::to_string(pid) + "/task")) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + tid + "/children");
    std::stringstream ss;
    ss << in.rdbuf();
    all += ss.str();
  }
  return all;
}

// `lazycr -v dump --leave-running` of `pid` in the background, its stderr on the Child's
// stdout, with the read slowed down.
std::vector<std::string> background_dump(pid_t pid, const std::string& dir,
                                         const std::string& extra = "") {
  return {"/bin/sh", "-c",
          std::string("exec env ") + kSlowRead + " " + lazycr_bin() + " -v dump -t " +
              std::to_string(pid) + " -D " + dir + " --leave-running " + extra + " 2>&1"};
}

struct Target {
  explicit Target(const std::string& mode) : child({target_bin("live_dump_target"), "64", mode}) {
    child.wait_for("ready ");
    pid = child.pid();
  }
  Child child;
  pid_t pid = 0;
};

// Dumps the target live, has it act (SIGUSR2) while its pages are read, checks that it has
// no extra child or descriptor afterwards, then restores the image eager and lazy: each
// restored process checks from inside that its memory is one instant from before the action.
void act_during_copy(const std::string& mode) {
  TempDir images;
  Target t(mode);
  const std::set<std::string> fds_before = entries("/proc/" + std::to_string(t.pid) + "/fd");
  Child dump(background_dump(t.pid, images / "img"));
  dump.wait_for("lazycr: live dump: tree frozen");
  ASSERT_TRUE(send_signal(t.pid, SIGUSR2));
  EXPECT_EQ(t.child.wait_for("acted"), "acted");
  EXPECT_TRUE(dump.running()) << "the action must come while the pages are being read";
  std::string rest = dump.read_rest(120);
  ASSERT_EQ(dump.wait(120), 0) << rest;
  EXPECT_NE(rest.find("left running (live dump)"), std::string::npos) << rest;

  // Nothing of the twin stays with the target.
  EXPECT_EQ(children_of(t.pid), "");
  EXPECT_EQ(entries("/proc/" + std::to_string(t.pid) + "/fd"), fds_before);
  ASSERT_TRUE(send_signal(t.pid, SIGHUP));
  EXPECT_EQ(t.child.wait_for("children"), "children -1 10") << "waitpid(-1): ECHILD";

  auto show = lazycr({"show", images / "img"});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("frozen "), std::string::npos) << show.out;

  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    Child restore(restore_argv(images / "img", lazy));
    ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "live_dump_targe"));
    expect_verified(restore, pid);
  }
}

TEST(LiveDump, WritesDuringTheCopyRestoreOneInstant) {
  act_during_copy("write");
}
TEST(LiveDump, MunmapDuringTheCopy) {
  act_during_copy("munmap");
}
TEST(LiveDump, DontneedDuringTheCopy) {
  act_during_copy("dontneed");
}
TEST(LiveDump, MremapDuringTheCopy) {
  act_during_copy("mremap");
}
TEST(LiveDump, ForkDuringTheCopy) {
  act_during_copy("fork");
}
TEST(LiveDump, SharedMemoryRewrittenDuringTheCopy) {
  act_during_copy("shared");
}
TEST(LiveDump, DontforkMemoryRewrittenDuringTheCopy) {
  act_during_copy("dontfork");
}
TEST(LiveDump, WipeonforkMemoryRewrittenDuringTheCopy) {
  act_during_copy("wipeonfork");
}

// A flag given over a whole area after smaps was read (before the freeze, to keep its
// page-table walk out of the frozen time) and before the freeze: the flags read say nothing of
// it. MADV_WIPEONFORK / MADV_DONTFORK: the twin holds zeros there or lacks the area; the dump
// finds that on the twin and copies the area while frozen, so the image holds its contents.
// Every mode: the restored process finds the flag on the area in its own smaps.
void flag_given_after_smaps_was_read(const std::string& mode, const std::string& logged) {
  TempDir images, logs;
  Target t(mode);
  const std::string dir = images / "img", err_path = logs / "dump.err";
  pid_t dumper = fork();
  ASSERT_GE(dumper, 0);
  if (dumper == 0) {
    int err = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int null = ::open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(err, 2);
    std::string pid = std::to_string(t.pid);
    execl(lazycr_bin().c_str(), "lazycr", "-v", "dump", "--fault-inject", "stop-after-smaps", "-t",
          pid.c_str(), "-D", dir.c_str(), "--leave-running", nullptr);
    _exit(127);
  }
  int status = 0;
  ASSERT_EQ(waitpid(dumper, &status, WUNTRACED), dumper);
  ASSERT_TRUE(WIFSTOPPED(status)) << "the dump ended before the freeze: " << slurp(err_path);
  ASSERT_TRUE(send_signal(t.pid, SIGUSR2));
  EXPECT_EQ(t.child.wait_for("acted"), "acted");
  ASSERT_EQ(kill(dumper, SIGCONT), 0);
  ASSERT_EQ(waitpid(dumper, &status, 0), dumper);
  const std::string err = slurp(err_path);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << err;
  EXPECT_NE(err.find("live dump: tree frozen"), std::string::npos) << err;
  if (!logged.empty()) {
    EXPECT_NE(err.find(logged), std::string::npos) << err;
  }

  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    Child restore(restore_argv(dir, lazy));
    ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "live_dump_targe"));
    expect_verified(restore, pid);
  }
}

TEST(LiveDump, WipeonforkGivenAfterSmapsWasRead) {
  flag_given_after_smaps_was_read("latewipe", "1 area(s) changed MADV_DONTFORK / MADV_WIPEONFORK");
}
TEST(LiveDump, DontforkGivenAfterSmapsWasRead) {
  flag_given_after_smaps_was_read("latedontfork",
                                  "1 area(s) changed MADV_DONTFORK / MADV_WIPEONFORK");
}
// Flags the twin has too: taken from its smaps once the tree runs again.
TEST(LiveDump, DontdumpGivenAfterSmapsWasRead) {
  flag_given_after_smaps_was_read("latedontdump", "1 area(s) changed flags since smaps was read");
}
// mlock, which fork does not pass on: the locked total in /proc/PID/status no longer matches
// the smaps read, which is read again while frozen.
TEST(LiveDump, MlockGivenAfterSmapsWasRead) {
  flag_given_after_smaps_was_read("latelock", "");
}

// lazycr SIGKILLed while it reads the twin: the target runs on with no child left (the twin
// exits at once, and is reaped), its descriptors as they were.
TEST(LiveDump, KilledLazycrLeavesNoTwin) {
  TempDir images;
  Target t("write");
  const std::set<std::string> fds_before = entries("/proc/" + std::to_string(t.pid) + "/fd");
  Child dump(background_dump(t.pid, images / "img"));
  dump.wait_for("lazycr: live dump: tree frozen");
  EXPECT_NE(children_of(t.pid), "") << "the twin is there while its pages are read";
  ASSERT_TRUE(send_signal(dump.pid(), SIGKILL));
  dump.wait();
  std::string left;
  for (int i = 0; i < 500 && !(left = children_of(t.pid)).empty(); i++) usleep(10000);
  EXPECT_EQ(left, "") << "the twin is left behind";
  EXPECT_EQ(entries("/proc/" + std::to_string(t.pid) + "/fd"), fds_before);
  ASSERT_TRUE(send_signal(t.pid, SIGHUP));
  EXPECT_EQ(t.child.wait_for("children"), "children -1 10");
  EXPECT_TRUE(t.child.running());
  EXPECT_FALSE(std::ifstream(images / "img").good()) << "no image under the final name";
}

// A live dump failing once the twins exist (before and after the tree runs again) leaves the
// target as it was: no child, the same descriptors, no image.
TEST(LiveDump, FailureLeavesNoTwin) {
  TempDir images;
  Target t("write");
  const std::set<std::string> fds_before = entries("/proc/" + std::to_string(t.pid) + "/fd");
  for (const char* step : {"twins", "memory"}) {
    SCOPED_TRACE(step);
    auto r = lazycr({"dump", "-t", std::to_string(t.pid), "-D", images / step, "--leave-running",
                     "--fault-inject", step});
    EXPECT_NE(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find(std::string("injected fault at step ") + step), std::string::npos)
        << r.err;
    EXPECT_EQ(children_of(t.pid), "");
    EXPECT_EQ(entries("/proc/" + std::to_string(t.pid) + "/fd"), fds_before);
    EXPECT_FALSE(std::ifstream(images / step).good());
  }
  ASSERT_TRUE(send_signal(t.pid, SIGHUP));
  EXPECT_EQ(t.child.wait_for("children"), "children -1 10");
}

// --frozen-copy keeps the tree frozen while the memory is read (no twin).
TEST(LiveDump, FrozenCopyStillWorks) {
  TempDir images;
  Target t("write");
  auto r = lazycr({"dump", "-t", std::to_string(t.pid), "-D", images / "img", "--leave-running",
                   "--frozen-copy"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("live dump"), std::string::npos) << r.err;
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  Child restore(restore_argv(images / "img", false));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "live_dump_targe"));
  expect_verified(restore, pid);
}

}  // namespace
}  // namespace lazycr::test
