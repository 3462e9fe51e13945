// Ghost files (FORMAT.md "Ghost files"): deleted files held open or mapped, memfds held and
// mapped with their seals, a deleted working directory and a deleted executable come back
// from the image's copy, eager and lazy (and a /dev/shm file that still exists is a shared
// file mapping of it); python's multiprocessing (semaphores are deleted
// /dev/shm files mapped shared by every process of the pool) finishes its work after a restore.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include <boost/filesystem.hpp>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"

namespace lazycr::test {
namespace {

// The children of pid (from /proc/PID/task/PID/children).
std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  auto text = proc::try_read_file(cat("/proc/", pid, "/task/", pid, "/children"));
  std::istringstream in(text ? *text : "");
  for (pid_t c; in >> c;) out.push_back(c);
  return out;
}

// Waits until none of pids exists, reaping them (a killed tree's tasks are re-parented to us,
// a child subreaper).
void wait_gone(const std::vector<pid_t>& pids) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (pid_t p : pids) {
    for (;;) {
      int status;
      waitpid(p, &status, WNOHANG);
      if (!proc::exists(p)) break;
      if (std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << "pid " << p << " is still there";
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
}

// Kills and reaps, at the end of a test, the restored processes a failed test leaves running.
struct KillAtEnd {
  std::vector<pid_t> pids;
  ~KillAtEnd() {
    for (pid_t p : pids)
      if (proc::exists(p)) send_signal(p, SIGKILL);
    wait_gone(pids);
  }
};

// The target runs from a copy of itself in `work` (it deletes its executable).
std::string copy_target(const TempDir& work) {
  std::string exe = work / "ghost_target";
  boost::filesystem::copy_file(target_bin("ghost_target"), exe);
  EXPECT_EQ(chmod(exe.c_str(), 0755), 0);
  return exe;
}

void ghost_round_trip(bool lazy) {
  TempDir work;
  std::string exe = copy_target(work);
  Child target({exe, "--workdir", work.path()});
  ASSERT_EQ(target.wait_for("ready").rfind("ready", 0), 0u);
  pid_t pid = target.pid();
  KillAtEnd restored{{pid}};
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);

  auto show = lazycr({"show", images / "img"});
  for (const std::string& want :
       {std::string("ghost 1"), work / "held", std::string("memfd:ghost-memfd"), work / "cwd", exe})
    EXPECT_NE(show.out.find(want), std::string::npos) << want << " missing in\n" << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "ghost_target"));
  // Recreated and unlinked: nothing of them is left under their names.
  for (const char* name : {"held", "lib", "cwd", "ghost_target"})
    EXPECT_FALSE(boost::filesystem::exists(work / name)) << name;
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
  boost::filesystem::remove("/dev/shm/lazycr-kept-" + std::to_string(pid));
}

TEST(Ghost, DeletedFilesMemfdsCwdAndExecutableComeBackEager) {
  ghost_round_trip(false);
}

TEST(Ghost, DeletedFilesMemfdsCwdAndExecutableComeBackLazy) {
  ghost_round_trip(true);
}

// A deleted file larger than --ghost-limit is refused by name, and the target runs on.
TEST(Ghost, DumpRefusesAGhostPastTheLimit) {
  TempDir work;
  std::string exe = copy_target(work);
  Child target({exe, "--workdir", work.path()});
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr(
      {"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--ghost-limit", "8K"});
  EXPECT_EQ(d.exit_code, 1) << d.err;
  EXPECT_NE(d.err.find("--ghost-limit"), std::string::npos) << d.err;
  EXPECT_NE(d.err.find("fd 3 is " + work / "held (deleted) of 10000 bytes"), std::string::npos)
      << d.err;
  EXPECT_FALSE(boost::filesystem::exists(images / "img"));
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
  boost::filesystem::remove("/dev/shm/lazycr-kept-" + std::to_string(target.pid()));
}

// python3's multiprocessing.Pool(2) in the middle of its work: the parent (with its pool
// threads), two workers, the pipes between them and the pool's semaphores (deleted files in
// /dev/shm, mapped shared by all three). The last task waits for a file the test creates only
// after the restore, so the dump always falls mid-work.
constexpr const char kPoolScript[] = R"(
import multiprocessing, os, sys, time
out, gate = sys.argv[1], sys.argv[2]
def work(i):
    if i == 199:
        while not os.path.exists(gate):
            time.sleep(0.01)
    return sum(x * x % 1009 for x in range(i * 1000, (i + 1) * 1000))
if __name__ == '__main__':
    with multiprocessing.Pool(2) as pool:
        results = pool.imap(work, range(200))
        total = next(results)
        print('ready', flush=True)
        total += sum(results)
    with open(out, 'w') as f:
        f.write(str(total))
    print('done', flush=True)
)";

void python_pool_round_trip(bool lazy) {
  const std::string python = "/usr/bin/python3";
  if (access(python.c_str(), X_OK) != 0) GTEST_SKIP() << "python3 is not installed";
  TempDir work;
  const std::string script = work / "pool.py", out = work / "out", gate = work / "gate";
  std::ofstream(script) << kPoolScript;
  long long expect = 0;
  for (long long x = 0; x < 200000; x++) expect += x * x % 1009;

  Child target({python, script, out, gate});
  ASSERT_EQ(target.wait_for("ready"), "ready");
  std::vector<pid_t> workers = children_of(target.pid());
  ASSERT_EQ(workers.size(), 2u);
  KillAtEnd restored{{target.pid(), workers[0], workers[1]}};
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  wait_gone(workers);
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("/dev/shm/"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {target.pid()}, "python3"));
  std::ofstream(gate) << "go";
  EXPECT_EQ(restore.read_line(120), "done");
  EXPECT_EQ(restore.wait(120), 0);
  std::ifstream in(out);
  std::string got;
  in >> got;
  EXPECT_EQ(got, std::to_string(expect));
}

TEST(Ghost, PythonMultiprocessingPoolFinishesItsWorkEager) {
  python_pool_round_trip(false);
}

TEST(Ghost, PythonMultiprocessingPoolFinishesItsWorkLazy) {
  python_pool_round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
