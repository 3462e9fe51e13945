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
#include "tests/e2e/chain_helpers.h"
#include "tests/e2e/harness.h"

namespace lazycr::test {
namespace {

namespace fs = std::filesystem;

// track_target MIB PERMILLE [MODE].
RewritingTarget track_target(const std::string& mib, const std::string& permille,
                             const std::string& mode = "", const std::string& mode_arg = "") {
  std::vector<std::string> argv{target_bin("track_target"), mib, permille};
  if (!mode.empty()) argv.push_back(mode);
  if (!mode_arg.empty()) argv.push_back(mode_arg);
  return RewritingTarget(argv);
}

RunResult dump(pid_t pid, const std::string& dir, const std::string& parent, bool track = true,
               const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args{"-v", "dump",           "-t", std::to_string(pid), "-D",
                                dir,  "--leave-running"};
  if (track) args.push_back("--track");
  if (!parent.empty()) args.insert(args.end(), {"--parent", parent});
  args.insert(args.end(), extra.begin(), extra.end());
  return lazycr(args);
}

// Link N of the chain in `images` (its parent N - 1): a round of rewrites, then the dump.
Link link_of(RewritingTarget& t, const TempDir& images, int link, bool track = true,
             const std::vector<std::string>& extra = {}) {
  return next_link(t, [&] {
    return dump(t.pid, images / std::to_string(link), images / std::to_string(link - 1), track,
                extra);
  });
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

TEST(Track, ChainOfFiveReadsOnlyTheWrittenPagesAndRestoresEagerAndLazy) {
  TempDir images;
  RewritingTarget t = track_target("256", "10");  // 65536 pages, ~1% rewritten per round
  const std::vector<std::string> fds = fds_of(t.pid);
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const PageCounts base = dump_counts(full.err);
  ASSERT_GT(base.stored, 65536u);
  ASSERT_NE(base.holder, 0) << full.err;
  EXPECT_EQ(fds_of(t.pid), fds) << "the target sees no extra descriptor";
  pid_t holder = base.holder;
  for (int link = 2; link <= 5; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = link_of(t, images, link);
    ASSERT_EQ(l.run.exit_code, 0);
    const uint64_t rewritten = l.rewritten;
    ASSERT_GT(rewritten, 65536u / 200) << "about 1% of the pages";
    const PageCounts& c = l.counts;
    const std::string& err = l.run.err;
    // Read: the rewritten pages and the target's own bookkeeping (its 65536-entry tables,
    // stack, libc data), never the untouched rest, which is left to the parent unread.
    EXPECT_GE(c.read, rewritten) << err;
    EXPECT_LE(c.read, rewritten + 1024) << err;
    EXPECT_GE(c.unread, base.stored - rewritten - 1024) << err;
    EXPECT_GE(c.stored, rewritten) << err;
    EXPECT_LE(c.stored * 100, base.stored * 2) << err;
    EXPECT_EQ(fds_of(t.pid), fds) << "the target sees no extra descriptor";
    // The previous holder gave its uffds to this dump's holder and ended.
    EXPECT_TRUE(gone_within(holder, 5)) << "holder " << holder;
    ASSERT_NE(c.holder, 0) << err;
    holder = c.holder;
  }
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  EXPECT_TRUE(gone_within(holder, 5)) << "the holder ends with the tracked processes";
  restore_and_verify(images / "5", pid, "track_target");
}

TEST(Track, DontneedMunmapAndMremapBetweenDumpsStayCorrect) {
  TempDir images;
  RewritingTarget t = track_target("32", "10", "churn");
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  for (int link = 2; link <= 4; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = link_of(t, images, link);
    ASSERT_EQ(l.run.exit_code, 0);
    EXPECT_GT(l.counts.unread, 0u) << l.run.err;
    // The swapped chunks and the fresh mapping are other mappings than the ones registered.
    EXPECT_NE(l.run.err.find("is no longer the tracked mapping"), std::string::npos) << l.run.err;
  }
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  restore_and_verify(images / "4", pid, "track_target");
}

TEST(Track, LostTrackingFallsBackToComparingByContent) {
  TempDir images;
  RewritingTarget t = track_target("16", "10");
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const PageCounts base = dump_counts(full.err);
  ASSERT_NE(base.holder, 0) << full.err;
  ASSERT_EQ(::kill(base.holder, SIGKILL), 0);
  ASSERT_TRUE(gone_within(base.holder, 5));
  const Link l = link_of(t, images, 2, false);
  ASSERT_EQ(l.run.exit_code, 0);
  const uint64_t rewritten = l.rewritten;
  const RunResult& r = l.run;
  const PageCounts& c = l.counts;
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
  restore_and_verify(images / "2", pid, "track_target");
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
  RewritingTarget t = track_target("4", "10");
  TempDir images;
  auto r = lazycr({"dump", "-t", std::to_string(t.pid), "-D", images / "1", "--track"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--track needs --leave-running"), std::string::npos) << r.err;
  EXPECT_TRUE(t.child.running());
}

// What happens to a tracked process between dumps (README "Write tracking"): each chain's next
// --parent dump must be complete (the last link restores byte-exact, checked from inside, eager
// and lazy) and the tracking must go on where it still can.

std::vector<pid_t> children_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  std::vector<pid_t> out;
  for (pid_t c; in >> c;) out.push_back(c);
  return out;
}

// The chain's tree killed (reaped where it is this test's), then restored from `dir`.
void kill_and_restore(RewritingTarget& t, const std::vector<pid_t>& others, const std::string& dir,
                      const std::vector<std::string>& extra = {}) {
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  for (pid_t o : others) ::kill(o, SIGKILL);
  t.child.wait();
  for (pid_t o : others) ASSERT_TRUE(gone_within(o, 5)) << o;
  restore_and_verify(dir, pid, "track_target", extra);
}

// A fork between dumps: the child is new (its pages compared by content, as the parent image has
// none of it), the parent stays tracked (the fork must not block on a uffd event nobody reads:
// no EVENT_FORK), and the next --track arms the child too.
TEST(TrackLifecycle, ForkBetweenDumps) {
  TempDir images;
  RewritingTarget t = track_target("32", "10", "fork");  // 8192 pages
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const PageCounts base = dump_counts(full.err);
  const Link l2 = link_of(t, images, 2);  // round 1: forks; the child rewrites its copy
  ASSERT_EQ(l2.run.exit_code, 0);
  const std::vector<pid_t> kids = children_of(t.pid);
  ASSERT_EQ(kids.size(), 1u);
  const pid_t child = kids[0];
  EXPECT_NE(l2.run.err.find("(new since the parent image"), std::string::npos) << l2.run.err;
  // Compared by content (all but the pages it shares with the parent's written ones: REFs).
  EXPECT_GE(pages_read(l2.run.err, child), 6000u) << l2.run.err;
  EXPECT_LE(pages_read(l2.run.err, t.pid), l2.rewritten + 1024) << l2.run.err;
  EXPECT_GE(l2.counts.unread, base.stored - l2.rewritten - 1024) << l2.run.err;
  const Link l3 = link_of(t, images, 3);  // round 2: both rewrite
  ASSERT_EQ(l3.run.exit_code, 0);
  EXPECT_LE(pages_read(l3.run.err, t.pid), l3.rewritten + 1024) << l3.run.err;
  EXPECT_LE(pages_read(l3.run.err, child), 2048u) << "the child tracked too: " << l3.run.err;
  kill_and_restore(t, {child}, images / "3");
}

// A tracked child that exits between dumps (a zombie at the next dump, reaped before the one
// after): the holder drops its uffd and goes on keeping the parent's.
TEST(TrackLifecycle, TrackedChildExits) {
  TempDir images;
  RewritingTarget t = track_target("32", "10", "exit");
  const std::vector<pid_t> kids = children_of(t.pid);
  ASSERT_EQ(kids.size(), 1u);
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  EXPECT_NE(full.err.find("keeps 2 uffds"), std::string::npos) << full.err;
  const PageCounts base = dump_counts(full.err);
  for (int link = 2; link <= 3; link++) {  // round 1: the child exits; round 2: reaped
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = link_of(t, images, link);
    ASSERT_EQ(l.run.exit_code, 0);
    EXPECT_LE(pages_read(l.run.err, t.pid), l.rewritten + 1024) << l.run.err;
    EXPECT_GE(l.counts.unread, base.stored / 2 - l.rewritten - 1024) << l.run.err;
    EXPECT_NE(l.run.err.find("keeps 1 uffds"), std::string::npos) << l.run.err;
  }
  EXPECT_TRUE(children_of(t.pid).empty());
  kill_and_restore(t, {}, images / "3");
}

// An exec between dumps: the process is the same (pid, start time) but its address space is
// new: nothing registered in it, so its pages are compared by content, and the next --track
// arms it with a new uffd (the one taken over belongs to the address space that is gone).
TEST(TrackLifecycle, ExecBetweenDumps) {
  TempDir images;
  RewritingTarget t = track_target("32", "10", "exec");
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const Link l2 = link_of(t, images, 2);  // round 1: exec; every page written anew
  ASSERT_EQ(l2.run.exit_code, 0);
  EXPECT_EQ(l2.counts.unread, 0u) << l2.run.err;
  EXPECT_GE(pages_read(l2.run.err, t.pid), 8192u) << l2.run.err;
  EXPECT_NE(l2.run.err.find("(exec since the parent image): a new uffd"), std::string::npos)
      << l2.run.err;
  const Link l3 = link_of(t, images, 3);
  ASSERT_EQ(l3.run.exit_code, 0);
  EXPECT_LE(pages_read(l3.run.err, t.pid), l3.rewritten + 1024) << "tracked again: " << l3.run.err;
  EXPECT_GE(l3.counts.unread, 8192u - l3.rewritten - 1024) << l3.run.err;
  kill_and_restore(t, {}, images / "3");
}

// A program with a userfaultfd of its own (MISSING mode, served by its own thread): not tracked,
// so that its later UFFDIO_REGISTER of memory that existed at the dump still works (a tracker's
// registration there would make it fail with EBUSY); its pages are compared by content and the
// restored process finds every page its handler filled.
TEST(TrackLifecycle, OwnUserfaultfdKeepsWorking) {
  TempDir images;
  const std::vector<std::string> skip{"--skip-unsupported-fds"};
  RewritingTarget t = track_target("32", "10", "uffd");
  auto full = dump(t.pid, images / "1", "", true, skip);
  ASSERT_EQ(full.exit_code, 0) << full.err;
  EXPECT_NE(full.err.find("is not tracked: it holds a userfaultfd of its own"), std::string::npos)
      << full.err;
  EXPECT_EQ(dump_counts(full.err).holder, 0) << full.err;
  for (int link = 2; link <= 3; link++) {  // each round registers one more part and touches it
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = link_of(t, images, link, true, skip);
    ASSERT_EQ(l.run.exit_code, 0);
    ASSERT_GT(l.rewritten, 0u) << "the target's own uffd failed";
  }
  kill_and_restore(t, {}, images / "3", skip);
}

// A private mapping of a file (half its pages written: copies on write) is not tracked
// (README "Write tracking": the protection's markers would read as swapped pages): its pages
// are compared by content, and the chain restores it.
TEST(TrackLifecycle, PrivateFileMappingComparedByContent) {
  TempDir images;
  RewritingTarget t = track_target("32", "10", "file", images / "data");  // half written
  auto full = dump(t.pid, images / "1", "");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  ASSERT_GE(dump_counts(full.err).stored, 4096u) << full.err;
  for (int link = 2; link <= 3; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = link_of(t, images, link);
    ASSERT_EQ(l.run.exit_code, 0);
    EXPECT_GE(pages_read(l.run.err, t.pid), 4096u) << l.run.err;
  }
  kill_and_restore(t, {}, images / "3");
}

}  // namespace
}  // namespace lazycr::test
