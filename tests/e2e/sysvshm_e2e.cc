// SysV shared memory (restore/sysv_shm), eager and lazy: a parent and its child attach a keyed
// segment (the child twice) and one marked for removal; after the restore both check from
// inside key, id, mode, size, attach counts, every byte and that a write by one is seen by
// the other. A key or id taken at restore time is refused by name with nothing left behind.
#include <gtest/gtest.h>
#include <sys/shm.h>
#include <unistd.h>

#include <set>
#include <sstream>
#include <string>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

// The ids /proc/sysvipc/shm lists now.
std::set<int> segment_ids() {
  std::istringstream in(proc::read_file("/proc/sysvipc/shm"));
  std::string line;
  std::getline(in, line);
  std::set<int> ids;
  long long key, id;
  while (in >> key >> id) {
    ids.insert(static_cast<int>(id));
    std::getline(in, line);
  }
  return ids;
}

struct Dumped {
  TargetInfo info;
  TempDir images;
};

// Dumps the target tree (which the dump kills); the keyed segment outlives it.
void dump(Dumped& d) {
  Child target({target_bin("sysvshm_target")});
  d.info = TargetInfo::parse(target.wait_for("ready"));
  auto r = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", d.images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  EXPECT_EQ(reap(static_cast<pid_t>(d.info.first("child"))), 128 + SIGKILL);  // re-parented to us
}

void round_trip(bool lazy) {
  Dumped d;
  ASSERT_NO_FATAL_FAILURE(dump(d));
  const int ida = static_cast<int>(d.info.first("ida"));
  auto show = lazycr({"show", d.images / "img"});
  EXPECT_NE(show.out.find("SysV segment id " + std::to_string(ida) + " key " + d.info.str("key") +
                          " mode 0640 size 20580"),
            std::string::npos)
      << show.out;
  ASSERT_EQ(shmctl(ida, IPC_RMID, nullptr), 0) << "the original keyed segment";

  std::vector<std::string> argv{lazycr_bin(), "restore", "-D", d.images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  Child restore(argv);
  const pid_t pid = static_cast<pid_t>(d.info.first("pid"));
  ASSERT_NO_FATAL_FAILURE(
      wait_restored(restore, {pid, static_cast<pid_t>(d.info.first("child"))}, "sysvshm_target"));
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
  shmctl(ida, IPC_RMID, nullptr);  // the target removes it; a failed run may not have
}

TEST(SysvShm, SegmentsComeBackSharedEager) {
  round_trip(false);
}

TEST(SysvShm, SegmentsComeBackSharedLazy) {
  round_trip(true);
}

// The keyed segment of the dump still exists (same key, same id): the restore refuses by pid,
// key and id, and leaves no process and no segment it made (the other one, created first).
void refuse_taken(bool lazy) {
  Dumped d;
  ASSERT_NO_FATAL_FAILURE(dump(d));
  const int ida = static_cast<int>(d.info.first("ida"));
  const std::set<int> before = segment_ids();
  std::vector<std::string> argv{"restore", "-D", d.images / "img", "--shell-job"};
  if (lazy) argv.push_back("--lazy");
  auto r = lazycr(argv);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(
      r.err.find("pid " + d.info.str("pid") + ": SysV segment key " + d.info.str("key") + " id " +
                 std::to_string(ida) + ": id " + std::to_string(ida) + " is taken now"),
      std::string::npos)
      << r.err;
  EXPECT_EQ(segment_ids(), before) << "a segment of the failed restore is left";
  expect_nothing_left(static_cast<pid_t>(d.info.first("pid")));
  EXPECT_FALSE(proc::exists(static_cast<pid_t>(d.info.first("child"))));
  shmctl(ida, IPC_RMID, nullptr);
}

// A restore that fails after the segments exist (while they are set up, or at the very end)
// removes them: no segment and no process is left.
TEST(SysvShm, FailedRestoreRemovesTheSegmentsItMade) {
  Dumped d;
  ASSERT_NO_FATAL_FAILURE(dump(d));
  const int ida = static_cast<int>(d.info.first("ida"));
  ASSERT_EQ(shmctl(ida, IPC_RMID, nullptr), 0) << "the original keyed segment";
  const std::set<int> before = segment_ids();
  for (const char* step : {"sysv-shm", "detach"})
    for (bool lazy : {false, true}) {
      std::vector<std::string> argv{"restore",        "-D", d.images / "img", "--shell-job",
                                    "--fault-inject", step};
      if (lazy) argv.push_back("--lazy");
      auto r = lazycr(argv);
      EXPECT_EQ(r.exit_code, 1) << step << ": " << r.err;
      EXPECT_NE(r.err.find("injected fault"), std::string::npos) << r.err;
      EXPECT_EQ(segment_ids(), before) << step << (lazy ? " (lazy)" : "") << ": a segment is left";
      expect_nothing_left(static_cast<pid_t>(d.info.first("pid")));
    }
}

TEST(SysvShm, TakenKeyOrIdIsRefusedNothingLeftEager) {
  refuse_taken(false);
}

TEST(SysvShm, TakenKeyOrIdIsRefusedNothingLeftLazy) {
  refuse_taken(true);
}

}  // namespace
}  // namespace lazycr::test
