// Pipes with a closed end (restored with that end closed, as the kernel had them) and
// pseudo-terminal pairs held whole by the tree (objects/pty.h), eager and lazy: C targets that
// verify themselves from inside, a pipeline consumer whose writer finished, make -j2 with its
// job server, and script(1) and Python's pty.spawn driving a shell through a pty.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// A killed tree's processes are re-parented to us (PID 1 here reaps no orphans).
class Subreaper : public ::testing::Environment {
 public:
  void SetUp() override { prctl(PR_SET_CHILD_SUBREAPER, 1); }
};
const auto* const kSubreaper = ::testing::AddGlobalTestEnvironment(new Subreaper);

// The processes of an image (its process-<pid>.pb files).
std::vector<pid_t> pids_in(const std::string& dir) {
  std::vector<pid_t> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if (name.rfind("process-", 0) == 0) out.push_back(std::atoi(name.c_str() + 8));
  }
  return out;
}

// Waits until none of pids exists (their PIDs are the restore's to take), reaping ours.
void wait_gone(const std::vector<pid_t>& pids) {
  for (int i = 0; i < 15000; i++) {
    bool left = false;
    for (pid_t p : pids) {
      int status;
      waitpid(p, &status, WNOHANG);
      left |= proc::exists(p);
    }
    if (!left) return;
    usleep(2000);
  }
  ADD_FAILURE() << "the dumped tree is still there";
}

char state_of(pid_t pid) {
  auto st = proc::try_read_file("/proc/" + std::to_string(pid) + "/stat");
  if (!st) return 0;
  size_t close = st->rfind(')');
  return close == std::string::npos || close + 2 >= st->size() ? 0 : (*st)[close + 2];
}

bool exists_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void closed_pipes_round_trip(bool lazy) {
  Child target({target_bin("ptypipes_target"), "--closed-pipe"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = static_cast<pid_t>(info.first("pid"));
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("(no writer)"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("(no reader)"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "ptypipes_target"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "pipes verified ok");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(PtyPipes, PipesWithAClosedEndComeBackClosedEager) {
  closed_pipes_round_trip(false);
}

TEST(PtyPipes, PipesWithAClosedEndComeBackClosedLazy) {
  closed_pipes_round_trip(true);
}

// `echo hello | { wait; cat; }`: the consumer, dumped once the writer has exited, gets its
// buffered "hello" and then EOF from its restored stdin (not lazycr's, with --shell-job).
void finished_pipeline(bool lazy) {
  TempDir work;
  const std::string flag = work / "go";
  Child sh({"/bin/bash", "-c",
            "{ echo hello; } | { echo \"ready pid=$BASHPID\"; while [ ! -e " + flag +
                " ]; do /usr/bin/sleep 0.05; done; exec /usr/bin/cat; }"});
  TargetInfo info = TargetInfo::parse(sh.wait_for("ready"));
  const pid_t reader = static_cast<pid_t>(info.first("pid"));
  // The writer (the other child of the outer shell) is gone or a zombie: it holds no end.
  for (bool writing = true; writing;) {
    writing = false;
    for (pid_t c : proc::list_children(sh.pid()))
      if (c != reader && state_of(c) != 'Z' && state_of(c) != 0) writing = true;
    if (writing) usleep(2000);
  }
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(reader), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  sh.wait(30);
  wait_gone(pids_in(images / "img"));
  std::ofstream(flag).put('1');
  Child restore(restore_argv(images / "img", lazy));
  EXPECT_EQ(restore.read_rest(60), "hello\n");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(PtyPipes, FinishedPipelineAtStdinKeepsItsBytesEager) {
  finished_pipeline(false);
}

TEST(PtyPipes, FinishedPipelineAtStdinKeepsItsBytesLazy) {
  finished_pipeline(true);
}

// A pipe whose writer runs outside the tree: refused by name at a high fd (restoring it closed
// would be a false EOF); at fd 0 with --shell-job the process gets lazycr's stdin.
TEST(PtyPipes, PipeWithItsWriterOutsideIsRefusedOrLazycrsStdin) {
  {
    Child sh({"/bin/bash", "-c",
              "{ echo hi; exec /usr/bin/sleep 1000; } | exec " + target_bin("ptypipes_target") +
                  " --hold-stdin"});
    TargetInfo info = TargetInfo::parse(sh.wait_for("ready"));
    pid_t pid = static_cast<pid_t>(info.first("pid"));
    TempDir images;
    auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
    EXPECT_EQ(d.exit_code, 1) << d.err;
    EXPECT_NE(d.err.find("fd 40 is a PIPE"), std::string::npos) << d.err;
    EXPECT_NE(d.err.find("its writing end is held by pid"), std::string::npos) << d.err;
    EXPECT_NE(d.err.find("outside the tree"), std::string::npos) << d.err;
    EXPECT_FALSE(exists_file(images / "img"));
    ASSERT_TRUE(send_signal(pid, SIGUSR1));  // it still runs, as it was
    EXPECT_EQ(sh.read_line(), "held");
    kill(-sh.pid(), SIGKILL);
  }
  Child sh({"/bin/bash", "-c",
            "{ echo hi; exec /usr/bin/sleep 1000; } | exec " + target_bin("ptypipes_target") +
                " --hold-stdin-only"});
  TargetInfo info = TargetInfo::parse(sh.wait_for("ready"));
  pid_t pid = static_cast<pid_t>(info.first("pid"));
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  kill(-sh.pid(), SIGKILL);
  sh.wait(30);
  Child restore(restore_argv(images / "img", false));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "ptypipes_target"));
  EXPECT_EQ(proc::read_link("/proc/" + std::to_string(pid) + "/fd/0"), "/dev/null");
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "held");
  EXPECT_EQ(restore.wait(60), 0);
}

void pty_round_trip(bool lazy) {
  Child target({target_bin("ptypipes_target"), "--pty"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = static_cast<pid_t>(info.first("pid"));
  pid_t child = static_cast<pid_t>(info.first("child"));
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  wait_gone(pids_in(images / "img"));
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("37x111 (5x7 px), packet mode on, locked, 15 bytes unread at the "
                          "master, 19 at the slave"),
            std::string::npos)
      << show.out;
  EXPECT_NE(show.out.find("controlling terminal pty"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "ptypipes_target"));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {child}, "ptypipes_target"));
  ASSERT_TRUE(send_signal(child, SIGUSR1));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  std::set<std::string> lines{restore.read_line(), restore.read_line()};
  EXPECT_EQ(lines, (std::set<std::string>{"master verified ok", "slave verified ok"}));
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(PtyPipes, PtyPairComesBackWithSettingsDataAndControllingTerminalEager) {
  pty_round_trip(false);
}

TEST(PtyPipes, PtyPairComesBackWithSettingsDataAndControllingTerminalLazy) {
  pty_round_trip(true);
}

// The dump reads a pty's unread data to see it: with --leave-running the pair must be left as
// it was, data in place, settings unchanged (the target checks itself, not restored).
TEST(PtyPipes, PtyDumpLeavesTheRunningPairAsItWas) {
  Child target({target_bin("ptypipes_target"), "--pty"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = static_cast<pid_t>(info.first("pid"));
  pid_t child = static_cast<pid_t>(info.first("child"));
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  ASSERT_TRUE(send_signal(child, SIGUSR1));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  std::set<std::string> lines{target.read_line(), target.read_line()};
  EXPECT_EQ(lines, (std::set<std::string>{"master verified ok", "slave verified ok"}));
  EXPECT_EQ(target.wait(60), 0);
}

// A small C project for make -j2: nine objects, each rule slowed by a sleep so that the dump
// meets make with its children and its job-server pipe in the middle of the build.
void write_project(const std::string& dir) {
  std::string objs = "main.o";
  for (int i = 1; i <= 8; i++) {
    std::ofstream(dir + "/a" + std::to_string(i) + ".c")
        << "int f" << i << "(int x) { return x * " << i << " + " << i << "; }\n";
    objs += " a" + std::to_string(i) + ".o";
  }
  std::ofstream(dir + "/main.c") << "int f1(int);\nint main(void) { return f1(0) - 1; }\n";
  std::ofstream(dir + "/Makefile")
      << "OBJS = " << objs
      << "\nprog: $(OBJS)\n\t/usr/bin/sleep 0.3 && /usr/bin/gcc -o $@ $(OBJS)\n"
      << "%.o: %.c\n\t/usr/bin/sleep 0.3 && /usr/bin/gcc -O2 -c -o $@ $<\n";
}

std::vector<std::string> outputs() {
  std::vector<std::string> out{"prog", "main.o"};
  for (int i = 1; i <= 8; i++) out.push_back("a" + std::to_string(i) + ".o");
  return out;
}

void make_round_trip(bool lazy) {
  TempDir reference, work;
  write_project(reference.path());
  write_project(work.path());
  auto r = run({"/usr/bin/make", "-j2", "-C", reference.path()}, 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;

  Child make({"/usr/bin/make", "-j2", "-C", work.path()});
  make.wait_for("/usr/bin/sleep");  // the first rule runs
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(make.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(make.wait(30), 128 + SIGKILL);
  wait_gone(pids_in(images / "img"));
  ASSERT_FALSE(exists_file(work / "prog")) << "the build was over before the dump";

  Child restore(restore_argv(images / "img", lazy));
  restore.read_rest(300);
  ASSERT_EQ(restore.wait(300), 0);
  for (const auto& f : outputs()) {
    ASSERT_TRUE(exists_file(work / f)) << f;
    EXPECT_TRUE(read_text(work / f) == read_text(reference / f)) << f << " differs";
  }
}

TEST(PtyPipes, MakeJobServerBuildFinishesIdenticalEager) {
  make_round_trip(false);
}

TEST(PtyPipes, MakeJobServerBuildFinishesIdenticalLazy) {
  make_round_trip(true);
}

// The numbers of a counter written through a pty into FILE: consecutive from 1 (a line cut at
// the end is left out); returns the last, or -1 if they are not consecutive.
long counter_in(const std::string& text) {
  std::istringstream in(text);
  std::string line;
  long last = 0;
  while (std::getline(in, line)) {
    if (in.eof()) break;  // no '\n' yet
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (std::atol(line.c_str()) != last + 1) return -1;
    last++;
  }
  return last;
}

// Real programs driving a shell through a pty: script(1) (all its signals blocked and read
// from a signalfd, its master polled with a timeout) and Python's pty.spawn. The shell writes
// a counter; after the restore it continues in FILE, no number lost or repeated.
// `driver` is the command line that runs a shell command given as its last argument.
void pty_counter_round_trip(const std::string& driver, bool lazy) {
  TempDir work;
  const std::string file = work / "typescript";
  const std::string loop =
      "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); echo $i; /usr/bin/sleep 0.02; done";
  Child drv({"/bin/sh", "-c", "exec " + driver + " '" + loop + "' > " + file + " < /dev/null"});
  while (counter_in(read_text(file)) < 5) usleep(2000);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(drv.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(drv.wait(30), 128 + SIGKILL);
  const std::vector<pid_t> pids = pids_in(images / "img");
  wait_gone(pids);
  const long at_dump = counter_in(read_text(file));
  ASSERT_GT(at_dump, 0) << read_text(file);
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("controlling terminal pty"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  long now = at_dump;
  for (int i = 0; i < 30000 && now >= 0 && now < at_dump + 20 && restore.running(); i++) {
    usleep(2000);
    now = counter_in(read_text(file));
  }
  const bool ran_on = restore.running();
  for (pid_t p : pids) kill(p, SIGKILL);
  restore.wait(60);
  EXPECT_GE(now, at_dump + 20) << "the counter did not go on:\n" << read_text(file);
  EXPECT_TRUE(ran_on) << "the restored tree ended by itself";
}

const char* const kPtySpawn =
    "/usr/bin/python3 -c 'import pty,sys; pty.spawn(sys.argv[1:])' /bin/sh -c";
const char* const kScript = "/usr/bin/script -q /dev/null -c";

TEST(PtyPipes, PtySpawnedShellCounterContinuesEager) {
  pty_counter_round_trip(kPtySpawn, false);
}

TEST(PtyPipes, PtySpawnedShellCounterContinuesLazy) {
  pty_counter_round_trip(kPtySpawn, true);
}

// script(1) waits in poll with a timeout: a restore that answered it with EINTR (the kernel's
// restart block is not restored) made it exit.
TEST(PtyPipes, ScriptShellCounterContinuesEager) {
  pty_counter_round_trip(kScript, false);
}

TEST(PtyPipes, ScriptShellCounterContinuesLazy) {
  pty_counter_round_trip(kScript, true);
}

}  // namespace
}  // namespace lazycr::test
