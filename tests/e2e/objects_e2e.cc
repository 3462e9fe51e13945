// Kernel objects a process holds beyond memory and descriptors (objects/): seccomp filters and
// file locks, eager and lazy. Each target verifies its own state from inside after the
// restore; sqlite3 in a write transaction keeps its lock across a dump and restore.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

std::string thread_status(pid_t pid, int tid, const std::string& key) {
  std::istringstream in(
      proc::read_file("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) + "/status"));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return line.substr(key.size() + 1);
  return "";
}

// Seccomp mode and filter count of each thread, as /proc shows them.
std::map<int, std::string> seccomp_of(pid_t pid, const std::vector<int>& tids) {
  std::map<int, std::string> out;
  for (int tid : tids)
    out[tid] =
        thread_status(pid, tid, "Seccomp") + "/" + thread_status(pid, tid, "Seccomp_filters");
  return out;
}

// Dumps a target that printed "ready pid=P tids=...", restores it (eager or lazy), checks
// /proc shows each thread's seccomp state as before, then lets it verify itself.
void seccomp_round_trip(const std::vector<std::string>& argv, bool lazy) {
  Child target(argv);
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  pid_t pid = target.pid();
  const auto before = seccomp_of(pid, info.list("tids"));
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));

  auto show = lazycr({"show", images / "img"});
  EXPECT_NE(show.out.find("seccomp"), std::string::npos) << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "seccomp_target", info.list("tids")));
  EXPECT_EQ(seccomp_of(pid, info.list("tids")), before);
  expect_verified(restore, pid);
}

TEST(Objects, SeccompFiltersComeBackSharedAndPerThreadEager) {
  seccomp_round_trip({target_bin("seccomp_target")}, false);
}

TEST(Objects, SeccompFiltersComeBackSharedAndPerThreadLazy) {
  seccomp_round_trip({target_bin("seccomp_target")}, true);
}

TEST(Objects, SeccompStrictModeThreadComesBack) {
  seccomp_round_trip({target_bin("seccomp_target"), "--strict"}, false);
}

void locks_round_trip(bool lazy) {
  TempDir work;
  Child target({target_bin("locks_target"), "--workdir", work.path()});
  target.wait_for("ready");
  pid_t pid = target.pid();
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  auto show = lazycr({"show", images / "img"});
  for (const char* kind : {"POSIX", "OFD", "flock"})
    EXPECT_NE(show.out.find(kind), std::string::npos) << kind << " lock missing in\n" << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "locks_target", {pid}));
  expect_verified(restore, pid);
}

TEST(Objects, LocksOfTheThreeKindsAreHeldAgainEager) {
  locks_round_trip(false);
}

TEST(Objects, LocksOfTheThreeKindsAreHeldAgainLazy) {
  locks_round_trip(true);
}

// The original still runs and holds its locks: the restore refuses by name, leaves nothing.
TEST(Objects, RestoreRefusesLocksTheRunningOriginalHolds) {
  TempDir work;
  Child target({target_bin("locks_target"), "--workdir", work.path()});
  target.wait_for("ready");
  TempDir images;
  auto d =
      lazycr({"dump", "-t", std::to_string(target.pid()), "-D", images / "img", "--leave-running"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  for (bool lazy : {false, true}) {
    std::vector<std::string> args{"restore", "-D", images / "img", "--pidns", "--shell-job"};
    if (lazy) args.push_back("--lazy");
    auto r = lazycr(args);
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("someone else holds"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("fd 3 (" + work / "posix" + ")"), std::string::npos) << r.err;
    expect_nothing_left(-1, {target.pid()});
  }
  // The original kept its locks and runs on.
  ASSERT_TRUE(send_signal(target.pid(), SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

// sqlite3 in a write transaction (BEGIN EXCLUSIVE, pages already written to the database
// file): after the restore it holds its lock again, a second writer is kept out, and the
// commit leaves a database that passes integrity_check.
TEST(Objects, Sqlite3KeepsItsWriteTransactionLock) {
  const std::string sqlite = "/usr/bin/sqlite3";
  if (access(sqlite.c_str(), X_OK) != 0)
    GTEST_SKIP() << "sqlite3 is not installed (tools/setup.sh)";
  TempDir work;
  const std::string db = work / "test.db";
  const std::string fifo = work / "in";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  // Read and write: opening never blocks, and the FIFO never reaches EOF while we hold it.
  int in = open(fifo.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(in, 0);
  auto say = [&](const std::string& s) {
    ASSERT_EQ(write(in, s.data(), s.size()), static_cast<ssize_t>(s.size()));
  };
  auto second_writer = [&] {
    return run({sqlite, db, "PRAGMA busy_timeout=0; INSERT INTO t VALUES(-1, 'intruder');"});
  };
  Child target({"/bin/sh", "-c", "exec " + sqlite + " -batch " + db + " < " + fifo});
  say("PRAGMA journal_mode=DELETE; PRAGMA cache_size=10;\n"
      "CREATE TABLE t(i INTEGER, v TEXT);\n"
      "BEGIN EXCLUSIVE;\n"
      "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)\n"
      "  INSERT INTO t SELECT i, printf('%0200d', i) FROM n;\n"
      "SELECT 'in transaction';\n");
  EXPECT_EQ(target.wait_for("in transaction"), "in transaction");
  auto w = second_writer();
  ASSERT_NE(w.exit_code, 0) << "the transaction does not keep writers out before the dump";

  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));

  Child restore(
      {"/bin/sh", "-c",
       "exec " + lazycr_bin() + " restore -D " + images / "img" + " --shell-job < " + fifo});
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {target.pid()}, "sqlite3", {target.pid()}));
  w = second_writer();
  EXPECT_NE(w.exit_code, 0) << "a second writer got in after the restore: " << w.out;
  EXPECT_NE(w.err.find("locked"), std::string::npos) << w.err;
  say("COMMIT;\nPRAGMA integrity_check;\nSELECT count(*) FROM t;\n.quit\n");
  EXPECT_EQ(restore.read_line(), "ok");
  EXPECT_EQ(restore.read_line(), "20000");
  EXPECT_EQ(restore.wait(60), 0);
  close(in);
  auto check = run({sqlite, db, "PRAGMA integrity_check; SELECT count(*) FROM t;"});
  EXPECT_EQ(check.out, "ok\n20000\n");
}

// Memory-deny-write-execute (objects/mdwe): set by the program, it comes back (PR_GET_MDWE from
// inside, and a writable and executable mapping is still refused). Such a process also refuses
// the dump's executable batch area: its signal handlers are read one call at a time then, and
// its SIGUSR1 handler must still run after the restore.
const char kMdweScript[] = R"PY(
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    print('no-mdwe', ctypes.get_errno(), flush=True)
    sys.exit(0)
print('ready', flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGUSR1)
rwx = libc.mmap(None, 4096, 7, 0x22, -1, 0)  # PROT_READ|WRITE|EXEC, MAP_PRIVATE|ANONYMOUS
print(f'mdwe={libc.prctl(66, 0, 0, 0, 0)} handler={got == [signal.SIGUSR1]} '
      f'rwx_refused={rwx == ctypes.c_void_p(-1).value}', flush=True)
)PY";

void mdwe_round_trip(bool lazy) {
  if (access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no python3 (tools/setup.sh)";
  TempDir work, images;
  const std::string go = work / "go";
  Child target({"/usr/bin/python3", "-c", kMdweScript, go});
  const std::string first = target.read_line();
  if (first.rfind("no-mdwe", 0) == 0) GTEST_SKIP() << "PR_SET_MDWE refused here: " << first;
  ASSERT_EQ(first, "ready");
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  EXPECT_NE(lazycr({"show", "--json", images / "img"}).out.find("\"mdwe\": 1"), std::string::npos);
  std::ofstream(go) << "go";
  auto r = run(restore_argv(images / "img", lazy));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "mdwe=1 handler=True rwx_refused=True\n") << r.err;
}

TEST(Objects, MemoryDenyWriteExecuteComesBackEager) {
  mdwe_round_trip(false);
}

TEST(Objects, MemoryDenyWriteExecuteComesBackLazy) {
  mdwe_round_trip(true);
}

}  // namespace
}  // namespace lazycr::test
