// Descriptor kinds of objects/fd_kinds.h (eventfd, timerfd, signalfd, inotify, pidfd), O_PATH
// descriptors and devices, eager and lazy: fdkinds_target verifies each from inside after the
// restore; an eventfd inherited at fork stays one description. What stays unsupported is
// refused at dump by pid, fd and kind.
#include <gtest/gtest.h>
#include <sys/stat.h>
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

// Dumps fdkinds_target with `kinds`, checks `show` names each state, restores it (eager or
// lazy) and lets it verify itself.
void round_trip(const std::string& kinds, bool lazy, const std::vector<std::string>& shown) {
  TempDir work;
  Child target({target_bin("fdkinds_target"), "--kinds", kinds, "--workdir", work.path()});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  std::vector<pid_t> pids{target.pid()};
  if (info.first("child") > 0) pids.push_back(static_cast<pid_t>(info.first("child")));
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  if (pids.size() > 1) {
    EXPECT_EQ(reap(pids[1], 30), 128 + SIGKILL);  // re-parented to us
  }
  auto show = lazycr({"show", images / "img"});
  for (const auto& s : shown)
    EXPECT_NE(show.out.find(s), std::string::npos) << s << " in\n" << show.out;

  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, pids, "fdkinds_target"));
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
}

TEST(FdKinds, EventfdsComeBackEager) {
  round_trip("eventfd,shared", false, {"eventfd count 12", "eventfd count 3 semaphore"});
}

TEST(FdKinds, EventfdsComeBackLazy) {
  round_trip("eventfd,shared", true, {"eventfd count 1099511627776"});
}

TEST(FdKinds, TimerfdsSignalfdInotifyPidfdComeBackEager) {
  round_trip("timerfd,signalfd,inotify,pidfd", false,
             {"timerfd clock 1", "signalfd mask", "inotify 2 watches", "pidfd of pid"});
}

TEST(FdKinds, TimerfdsSignalfdInotifyPidfdComeBackLazy) {
  round_trip("timerfd,signalfd,inotify,pidfd", true, {"timerfd clock 7"});
}

TEST(FdKinds, OpathAndDevicesComeBackWithTheirFlags) {
  round_trip("opath,devices", false, {});
  round_trip("opath,devices", true, {});
}

// What stays unsupported is refused at dump by pid, fd, kind and reason; the tree runs on.
void refused(const std::string& kinds, const std::string& kind, const std::string& why) {
  TempDir work;
  Child target({target_bin("fdkinds_target"), "--kinds", kinds, "--workdir", work.path()});
  TargetInfo refused = TargetInfo::parse(target.wait_for("refused"));
  target.wait_for("ready");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1) << d.err;
  EXPECT_NE(d.err.find("fd " + refused.str("fd") + " is a"), std::string::npos) << d.err;
  EXPECT_NE(d.err.find(kind), std::string::npos) << d.err;
  EXPECT_NE(d.err.find(why), std::string::npos) << d.err;
  EXPECT_NE(d.err.find(std::to_string(target.pid())), std::string::npos) << d.err;
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

TEST(FdKinds, InotifyWithEventsUnreadIsRefused) {
  refused("inotify-unread", "INOTIFY", "events queued unread");
}

TEST(FdKinds, PidfdOfAProcessOutsideTheTreeIsRefused) {
  refused("pidfd-outside", "PIDFD", "not in the dumped tree");
}

}  // namespace
}  // namespace lazycr::test
