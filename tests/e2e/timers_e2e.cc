// Timers and scheduling (objects/timers, objects/sched, objects/pdeathsig), eager and lazy: a
// target with POSIX timers of every notification kind (a gap in their ids), itimers, threads
// with their own CPUs, nice value, policy and parent death signal checks all of it from inside
// after the restore, and that its periodic timers still signal the right threads.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

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
  if (info.str("rr") == "1") {
    EXPECT_NE(show.out.find("rr priority 3  nice 5"), std::string::npos) << show.out;
  }
  auto json = lazycr({"show", images / "img", "--json"});
  std::string compact;
  for (char c : json.out)
    if (c != ' ' && c != '\n') compact += c;
  EXPECT_NE(compact.find("\"posix_timers\":[{\"id\":1,"), std::string::npos) << json.out;
  EXPECT_NE(compact.find("\"pdeathsig\":12"), std::string::npos) << json.out;

  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "timers_target", info.list("tids")));
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

// struct sched_attr (SCHED_ATTR_SIZE_VER0): glibc 2.36 has no wrapper.
struct SchedAttr {
  uint32_t size, policy;
  uint64_t flags;
  int32_t nice;
  uint32_t priority;
  uint64_t runtime, deadline, period;
};

// A thread under SCHED_DEADLINE (its reservation is not recorded): the dump refuses by pid and
// thread and leaves the process running as it was.
TEST(Timers, DumpRefusesADeadlineThreadAndLeavesItRunning) {
  Child target({target_bin("timers_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const int b = info.list("tids").at(2);
  SchedAttr dl{sizeof(SchedAttr), 6 /* SCHED_DEADLINE */, 0, 0, 0, 1000000, 10000000, 10000000};
  if (syscall(SYS_sched_setattr, b, &dl, 0) != 0)
    GTEST_SKIP() << "cannot put thread " << b << " under SCHED_DEADLINE here: " << strerror(errno);
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1) << d.err;
  EXPECT_NE(d.err.find("thread " + std::to_string(b) + " runs under SCHED_DEADLINE"),
            std::string::npos)
      << d.err;
  EXPECT_FALSE(proc::try_read_file(images / "img/inventory.pb")) << "an image was written";
  // As it was: back in SCHED_BATCH, it finds every timer and setting it had.
  SchedAttr batch{sizeof(SchedAttr), SCHED_BATCH, 1 /* SCHED_FLAG_RESET_ON_FORK */, 0, 0, 0, 0, 0};
  ASSERT_EQ(syscall(SYS_sched_setattr, b, &batch, 0), 0) << strerror(errno);
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

// Dumps the target, edits its image (re-signed, as if lazycr had written it) and expects the
// restore to refuse it with one line containing `why`, leaving nothing behind.
void expect_refused(const std::function<void(image::Process&)>& edit, const std::string& why) {
  Child target({target_bin("timers_target")});
  target.wait_for("ready");
  const pid_t pid = target.pid();
  TempDir images;
  const std::string dir = images / "img";
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", dir});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  const std::string path = image::process_path(dir, pid);
  image::Process p;
  image::read_message_file(path, image::kProcessMagic, &p);
  edit(p);
  image::write_message_file(path, image::kProcessMagic, p);
  sign_test_image(dir);
  auto kids = proc::list_children(getpid());
  std::set<pid_t> ours(kids.begin(), kids.end());
  auto r = lazycr({"restore", "-D", dir, "--shell-job"}, 60);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(why), std::string::npos) << r.err;
  expect_nothing_left(pid, ours);
}

// Fields out of their bounds are refused by validation, before anything is created.
TEST(Timers, ImageWithATimerForAThreadItDoesNotHaveIsRefused) {
  expect_refused(
      [](image::Process& p) {
        for (auto& t : *p.mutable_posix_timers())
          if (t.notify_tid() != 0) t.set_notify_tid(p.pid() + 100000);
      },
      "not one of the process");
}

TEST(Timers, ImageWithARealtimePolicyWithoutPriorityIsRefused) {
  expect_refused(
      [](image::Process& p) {
        image::ThreadSched* s = p.mutable_threads(1)->mutable_sched();
        s->set_policy(1);
        s->set_priority(0);
      },
      "priority 0 for policy 1");
}

// A thread bound only to CPUs this machine does not have (CPU 1000): the restore refuses,
// naming the thread and its CPUs, and kills what it built.
TEST(Timers, ThreadBoundToCpusThatDoNotExistHereIsRefused) {
  expect_refused(
      [](image::Process& p) {
        std::string mask(128, '\0');
        mask[1000 / 8] = 1;
        p.mutable_threads(1)->mutable_sched()->set_affinity(mask);
      },
      "bound to CPUs 1000, none of which exists or may be used here");
}

}  // namespace
}  // namespace lazycr::test
