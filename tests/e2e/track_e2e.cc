// `lazycr dump --track`: write tracking between incremental dumps. A chain of five dumps of a
// process rewriting 1% of 256 MiB reads only the written pages (the -v line "read N pages" and
// the summary's "left unread"), stores about 1% per link and restores from the last link
// (eager and lazy) to a process whose every byte is checked; MADV_DONTNEED, munmap + mmap and
// mremap between dumps stay correct; a lost tracking (holder killed) falls back to comparing
// by content with one -v line saying why; the target never sees an extra descriptor, and the
// holder ends with the target.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/signals.h"
#include "tests/e2e/harness.h"

namespace lazycr::test {
namespace {

namespace fs = std::filesystem;

struct Counts {
  uint64_t stored = 0, parent = 0, unread = 0, read = 0;
  pid_t holder = 0;
};

Counts dump_counts(const std::string& err) {
  Counts c;
  std::smatch m;
  static const std::regex sum(
      "([0-9]+) stored, [0-9]+ zero, [0-9]+ deduped(, ([0-9]+) in the "
      "parent image \\(link [0-9]+ of its chain; ([0-9]+) not written)?");
  if (!std::regex_search(err, m, sum)) {
    ADD_FAILURE() << "no page counts in: " << err;
    return c;
  }
  c.stored = std::stoull(m[1]);
  if (m[2].matched) c.parent = std::stoull(m[3]);
  if (m[4].matched) c.unread = std::stoull(m[4]);
  static const std::regex read("pid [0-9]+: read ([0-9]+) pages");
  if (std::regex_search(err, m, read)) c.read = std::stoull(m[1]);
  static const std::regex holder("holder process ([0-9]+) keeps");
  if (std::regex_search(err, m, holder)) c.holder = std::stoi(m[1]);
  return c;
}

struct Target {
  Target(const std::string& mib, const std::string& permille, bool churn = false)
      : child(churn ? std::vector<std::string>{target_bin("track_target"), mib, permille, "churn"}
                    : std::vector<std::string>{target_bin("track_target"), mib, permille}) {
    child.wait_for("ready ");
    pid = child.pid();
  }
  uint64_t rewrite() {
    EXPECT_TRUE(send_signal(pid, SIGUSR2));
    std::string line = child.wait_for("round ");
    return std::stoull(line.substr(line.rfind(' ') + 1));
  }
  Child child;
  pid_t pid = 0;
};

RunResult dump(pid_t pid, const std::string& dir, const std::string& parent, bool track = true) {
  std::vector<std::string> args{"-v", "dump",           "-t", std::to_string(pid), "-D",
                                dir,  "--leave-running"};
  if (track) args.push_back("--track");
  if (!parent.empty()) args.insert(args.end(), {"--parent", parent});
  return lazycr(args);
}

std::vector<std::string> fds_of(pid_t pid) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd"))
    out.push_back(e.path().filename().string() + " -> " + fs::read_symlink(e.path()).string());
  std::sort(out.begin(), out.end());
  return out;
}

// Exited: gone, or a zombie (the holder is reparented, maybe to this test as a subreaper).
bool gone_within(pid_t pid, int seconds) {
  for (int i = 0; i < seconds * 20; i++) {
    int status = 0;
    ::waitpid(pid, &status, WNOHANG);
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const size_t paren = text.rfind(')');
    if (paren == std::string::npos || paren + 2 >= text.size() || text[paren + 2] == 'Z')
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

void restore_and_verify(const std::string& dir, pid_t pid) {
  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    Child restore(restore_argv(dir, lazy));
    ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "track_target"));
    expect_verified(restore, pid);
  }
}

TEST(Track, ChainOfFiveReadsOnlyTheWrittenPagesAndRestoresEagerAndLazy) {
  TempDir images;
  Target t("256", "10");  // 65536 pages, ~1% rewritten per round
  const std::vector<std::string> fds = fds_of(t.pid);
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const Counts base = dump_counts(full.err);
  ASSERT_GT(base.stored, 65536u);
  ASSERT_NE(base.holder, 0) << full.err;
  EXPECT_EQ(fds_of(t.pid), fds) << "the target sees no extra descriptor";
  pid_t holder = base.holder;
  for (int link = 2; link <= 5; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    const uint64_t rewritten = t.rewrite();
    ASSERT_GT(rewritten, 65536u / 200) << "about 1% of the pages";
    auto r = dump(t.pid, images / std::to_string(link), images / std::to_string(link - 1));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const Counts c = dump_counts(r.err);
    // Read: the rewritten pages and the target's own bookkeeping (its 65536-entry tables,
    // stack, libc data), never the untouched rest, which is left to the parent unread.
    EXPECT_GE(c.read, rewritten) << r.err;
    EXPECT_LE(c.read, rewritten + 1024) << r.err;
    EXPECT_GE(c.unread, base.stored - rewritten - 1024) << r.err;
    EXPECT_GE(c.stored, rewritten) << r.err;
    EXPECT_LE(c.stored * 100, base.stored * 2) << r.err;
    EXPECT_EQ(fds_of(t.pid), fds) << "the target sees no extra descriptor";
    // The previous holder gave its uffds to this dump's holder and ended.
    EXPECT_TRUE(gone_within(holder, 5)) << "holder " << holder;
    ASSERT_NE(c.holder, 0) << r.err;
    holder = c.holder;
  }
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  EXPECT_TRUE(gone_within(holder, 5)) << "the holder ends with the tracked processes";
  restore_and_verify(images / "5", pid);
}

TEST(Track, DontneedMunmapAndMremapBetweenDumpsStayCorrect) {
  TempDir images;
  Target t("32", "10", true);
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  for (int link = 2; link <= 4; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    t.rewrite();
    auto r = dump(t.pid, images / std::to_string(link), images / std::to_string(link - 1));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const Counts c = dump_counts(r.err);
    EXPECT_GT(c.unread, 0u) << r.err;
    // The swapped chunks and the fresh mapping are other mappings than the ones registered.
    EXPECT_NE(r.err.find("is no longer the tracked mapping"), std::string::npos) << r.err;
  }
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  restore_and_verify(images / "4", pid);
}

TEST(Track, LostTrackingFallsBackToComparingByContent) {
  TempDir images;
  Target t("16", "10");
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const Counts base = dump_counts(full.err);
  ASSERT_NE(base.holder, 0) << full.err;
  ASSERT_EQ(::kill(base.holder, SIGKILL), 0);
  ASSERT_TRUE(gone_within(base.holder, 5));
  const uint64_t rewritten = t.rewrite();
  auto r = dump(t.pid, images / "2", images / "1", false);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Counts c = dump_counts(r.err);
  EXPECT_NE(r.err.find("write tracking lost: its holder process " + std::to_string(base.holder) +
                       " is gone"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(c.unread, 0u) << r.err;
  EXPECT_GE(c.read, base.stored) << "every page read and compared: " << r.err;
  EXPECT_GE(c.stored, rewritten) << r.err;
  EXPECT_LE(c.stored * 100, base.stored * 3) << r.err;
  // Without --track nothing is armed: no holder.
  EXPECT_EQ(c.holder, 0) << r.err;
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  restore_and_verify(images / "2", pid);
}

// A tree (pages fork-shared between processes, stored once: REF runs) tracked across a chain:
// the unwritten pages of each process become PARENT runs, which no REF may name; the last link
// (the tree killed) restores in a fresh PID namespace with every byte of every task checked.
TEST(Track, TreeWithSharedPagesRestoresFromATrackedChain) {
  TempDir work;
  const std::string out = work / "out", verify = work / "verify";
  Child sh({"/bin/sh", "-c",
            "exec " + target_bin("tree_target") + " --mode levels --setsid --mib 8 --verify-file " +
                verify + " --workdir " + work.path() + " >" + out + " 2>&1"});
  std::string text;
  for (int i = 0; i < 600 && text.find("ready ") == std::string::npos; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::ifstream in(out);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, std::regex(" pid=([0-9]+) tasks=([^ ]+)"))) << text;
  const pid_t root = std::stoi(m[1]);
  const std::string task_list = m[2];
  const size_t tasks = std::count(task_list.begin(), task_list.end(), ',') + 1;
  auto r1 = dump(root, work / "1", "");
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  auto r2 = dump(root, work / "2", work / "1");
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_GT(dump_counts(r2.err).unread, 0u) << r2.err;
  auto r3 =
      lazycr({"-v", "dump", "-t", std::to_string(root), "-D", work / "3", "--parent", work / "2"});
  ASSERT_EQ(r3.exit_code, 0) << r3.err;
  EXPECT_GT(dump_counts(r3.err).unread, 0u) << r3.err;
  EXPECT_TRUE(gone_within(root, 30));
  Child restore({lazycr_bin(), "restore", "--pidns", "--shell-job", "-D", work / "3"});
  std::this_thread::sleep_for(std::chrono::seconds(2));
  std::ofstream(verify) << "go";
  size_t ok = 0;
  for (int i = 0; i < 1200 && ok < tasks; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::ifstream in(out);
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    ok = 0;
    for (size_t p = text.find("VERIFY "); p != std::string::npos; p = text.find("VERIFY ", p + 1)) {
      const size_t eol = text.find('\n', p);
      if (eol != std::string::npos && eol >= p + 3 && text.compare(eol - 3, 3, " ok") == 0) ok++;
    }
  }
  EXPECT_EQ(ok, tasks) << text;
  EXPECT_EQ(text.find("FAILED"), std::string::npos) << text;
}

TEST(Track, RefusedWithoutLeaveRunning) {
  Target t("4", "10");
  TempDir images;
  auto r = lazycr({"dump", "-t", std::to_string(t.pid), "-D", images / "1", "--track"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--track needs --leave-running"), std::string::npos) << r.err;
  EXPECT_TRUE(t.child.running());
}

}  // namespace
}  // namespace lazycr::test
