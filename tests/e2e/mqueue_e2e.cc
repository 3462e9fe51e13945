// POSIX message queues (objects/mqueue.cc), eager and lazy: mqueue_target verifies from inside
// that its named and its unlinked queue are back with their attributes and messages in order.
#include <gtest/gtest.h>
#include <mqueue.h>
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

// `remove_named`: the named queue is gone at restore (as after a reboot): the restore makes it
// from the image. Otherwise it still exists and is opened again.
void round_trip(bool lazy, bool remove_named) {
  Child target({target_bin("mqueue_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const std::string name = info.str("name");
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("mqueue " + name + " mode 0640 8 x 64 bytes, 4 queued (19 bytes)"),
            std::string::npos)
      << show.out;
  EXPECT_NE(show.out.find("(unlinked) mode 0640 4 x 16 bytes, 2 queued (3 bytes)"),
            std::string::npos)
      << show.out;
  if (remove_named) {
    ASSERT_EQ(mq_unlink(name.c_str()), 0);
  }
  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {target.pid()}, "mqueue_target"));
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
  mq_unlink(name.c_str());
}

TEST(Mqueue, QueuesComeBackFromTheImageEager) {
  round_trip(false, true);
}
TEST(Mqueue, QueuesComeBackFromTheImageLazy) {
  round_trip(true, true);
}
// The dump took every message and put it back: the queue left in place holds them all.
TEST(Mqueue, AQueueStillThereIsOpenedAgain) {
  round_trip(false, false);
}

}  // namespace
}  // namespace lazycr::test
