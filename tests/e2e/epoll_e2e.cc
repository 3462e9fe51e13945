// epoll instances (objects/epoll), eager and lazy: an interest list of every flag kind,
// nested, dup'ed and shared with a child comes back and the target checks it from inside;
// registrations the kernel keeps for a closed or reused descriptor are refused at dump by
// name, leaving the target as it was; an unmodified node keeps its setInterval counter going.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

void epoll_round_trip(bool lazy) {
  Child target({target_bin("epoll_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const pid_t pid = target.pid();
  const pid_t child = static_cast<pid_t>(info.first("child"));
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  EXPECT_EQ(reap(child), 128 + SIGKILL);  // re-parented to us (child subreaper)

  auto show = lazycr({"show", images / "img"});
  for (const char* what : {"EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLET", "EPOLLEXCLUSIVE",
                           "data 0xb2b2b2b2000000b2", "epoll made at fd"})
    EXPECT_NE(show.out.find(what), std::string::npos) << what << " missing in\n" << show.out;

  Child restore(restore_argv(images / "img", lazy));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, "epoll_target"));
  ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {child}, "epoll_target"));
  expect_verified(restore, pid);
}

TEST(Epoll, InterestListOfEveryKindComesBackEager) {
  epoll_round_trip(false);
}

TEST(Epoll, InterestListOfEveryKindComesBackLazy) {
  epoll_round_trip(true);
}

// The kernel keeps a registration while its file lives on elsewhere, under a number the
// process closed (or gave to another file): the dump names it and leaves the tree running.
void refuses_stale(const std::string& how, const std::string& why) {
  Child target({target_bin("epoll_target"), "--stale", how});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  const pid_t pid = target.pid();
  TempDir images;
  auto d = lazycr({"dump", "-t", std::to_string(pid), "-D", images / "img"});
  EXPECT_EQ(d.exit_code, 1) << d.err;
  const std::string name = "pid " + std::to_string(pid) + ": epoll: epoll fd " + info.str("ep") +
                           " registration of fd " + info.str("stale") + ": fd " +
                           info.str("stale") + " " + why;
  EXPECT_NE(d.err.find(name), std::string::npos) << "want '" << name << "' in " << d.err;
  EXPECT_EQ(access((images / "img").c_str(), F_OK), -1) << "an image was left";
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(target.read_line(), "verified ok");
  EXPECT_EQ(target.wait(60), 0);
}

TEST(Epoll, DumpRefusesARegistrationOfAClosedDescriptor) {
  refuses_stale("closed", "is not open in this process (closed since");
}

TEST(Epoll, DumpRefusesARegistrationWhoseNumberHoldsAnotherFile) {
  refuses_stale("reused", "now holds another file (/dev/null)");
}

// The numbers the counter script appended, one a line.
std::vector<long> counts(const std::string& path) {
  std::vector<long> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(std::stol(line));
  return out;
}

// Waits (polling, no assertion on time) until the file holds at least `n` numbers.
bool wait_counts(const std::string& path, size_t n, const std::function<bool()>& alive) {
  for (int i = 0; i < 60000; i++) {
    if (counts(path).size() >= n) return true;
    if (!alive()) return false;
    usleep(2000);
  }
  return false;
}

void expect_consecutive(const std::vector<long>& v) {
  for (size_t i = 0; i < v.size(); i++)
    if (v[i] != static_cast<long>(i) + 1) {
      ADD_FAILURE() << "line " << i + 1 << " is " << v[i] << " (a gap or a repeat)";
      return;
    }
}

// An unmodified node (libuv: epoll, eventfd, self-pipes, worker threads) appending a counter
// every 50 ms: after the restore it goes on with the next number, no gap, no repeat.
void node_counter(bool lazy) {
  const std::string node = "/usr/bin/node";
  if (access(node.c_str(), X_OK) != 0) GTEST_SKIP() << "node is not installed (tools/setup.sh)";
  TempDir work;
  const std::string script = work / "counter.js", file = work / "count";
  std::ofstream(script)
      << "const fs = require('fs');\n"
         "let n = 0;\n"
         "setInterval(() => { n++; fs.appendFileSync(process.argv[2], n + '\\n'); }, 50);\n";
  Child target({node, script, file});
  ASSERT_TRUE(wait_counts(file, 5, [&] { return target.running(); })) << "node did not count";
  TempDir images;
  ASSERT_NO_FATAL_FAILURE(dump_killing(target, images / "img"));
  const size_t at_dump = counts(file).size();
  expect_consecutive(counts(file));

  Child restore(restore_argv(images / "img", lazy));
  EXPECT_TRUE(wait_counts(file, at_dump + 5, [&] { return restore.running(); }))
      << "the restored node did not go on counting";
  ASSERT_TRUE(send_signal(target.pid(), SIGKILL));
  EXPECT_EQ(restore.wait(60), 128 + SIGKILL);
  auto after = counts(file);
  EXPECT_GE(after.size(), at_dump + 5);
  expect_consecutive(after);
}

TEST(Epoll, NodeKeepsCountingEager) {
  node_counter(false);
}

TEST(Epoll, NodeKeepsCountingLazy) {
  node_counter(true);
}

}  // namespace
}  // namespace lazycr::test
