// Timers and scheduling (objects/timers, objects/sched, objects/pdeathsig), eager and lazy: a
// target with POSIX timers of every notification kind (a gap in their ids), itimers, threads
// with their own CPUs, nice value, policy and parent death signal checks all of it from inside
// after the restore, and that its periodic timers still signal the right threads.
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// Restored: the process has its own name again and none of its threads is traced any more.
void wait_restored(pid_t pid, const std::vector<int>& tids, Child& restore) {
  auto done = [&] {
    auto name = proc::try_read_file("/proc/" + std::to_string(pid) + "/comm");
    if (!name || *name != "timers_target\n") return false;
    for (int tid : tids) {
      auto st = proc::try_read_file("/proc/" + std::to_string(pid) + "/task/" +
                                    std::to_string(tid) + "/status");
      if (!st || st->find("TracerPid:\t0\n") == std::string::npos) return false;
    }
    return true;
  };
  for (int i = 0; i < 30000 && restore.running(); i++) {
    if (done()) return;
    usleep(2000);
  }
  FAIL() << "pid " << pid << " was not restored";
}

void round_trip(bool lazy) {
  Child target({target_bin("timers_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const pid_t pid = target.pid();
  const std::string timers = proc::read_file("/proc/" + std::to_string(pid) + "/timers");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);

  auto show = lazycr({"show", images / "img"});
  for (const char* what :
       {"POSIX timers (4)", "Interval timer real", "Interval timer virtual", "Interval timer prof",
        "batch reset-on-fork", "nice 5", "parent death signal 12"})
    EXPECT_NE(show.out.find(what), std::string::npos) << what << " missing in\n" << show.out;
  auto json = lazycr({"show", images / "img", "--json"});
  std::string compact;
  for (char c : json.out)
    if (c != ' ' && c != '\n') compact += c;
  EXPECT_NE(compact.find("\"posix_timers\":[{\"id\":1,"), std::string::npos) << json.out;
  EXPECT_NE(compact.find("\"pdeathsig\":12"), std::string::npos) << json.out;

  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  ASSERT_NO_FATAL_FAILURE(wait_restored(pid, info.list("tids"), restore));
  // The same timers with the same ids, signals, values, targets and clocks, seen from outside.
  EXPECT_EQ(proc::read_file("/proc/" + std::to_string(pid) + "/timers"), timers);
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(Timers, TimersSchedulingAndDeathSignalComeBackEager) {
  round_trip(false);
}

TEST(Timers, TimersSchedulingAndDeathSignalComeBackLazy) {
  round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
