// Chains of incremental dumps (`dump --parent`, `--track`) of a target that rewrites part of
// its memory on SIGUSR2 and checks every byte on SIGUSR1 (tests/targets/rewrite_pages.h:
// incr_target, track_target): the target, the page counts of a dump's summary, one link of a
// chain, and the restore (eager, then lazy) of the last link.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>

#include <cstdint>
#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "common/signals.h"
#include "tests/e2e/harness.h"

namespace lazycr::test {

// The page counts of a dump's summary line (and of its -v lines, when -v was given).
struct PageCounts {
  uint64_t stored = 0, zero = 0, parent = 0;
  uint64_t unread = 0;  // in the parent: not written since (write tracking), left unread
  uint64_t read = 0;    // -v: the pages read from the (first) process
  pid_t holder = 0;     // -v: the write tracking holder this dump started
};

inline PageCounts dump_counts(const std::string& err) {
  PageCounts c;
  std::smatch m;
  static const std::regex sum(
      "([0-9]+) stored, ([0-9]+) zero, [0-9]+ deduped(, ([0-9]+) in the parent image( \\(link "
      "[0-9]+ of its chain; ([0-9]+) not written)?)?");
  if (!std::regex_search(err, m, sum)) {
    ADD_FAILURE() << "no page counts in: " << err;
    return c;
  }
  c.stored = std::stoull(m[1]);
  c.zero = std::stoull(m[2]);
  if (m[4].matched) c.parent = std::stoull(m[4]);
  if (m[6].matched) c.unread = std::stoull(m[6]);
  static const std::regex read("pid [0-9]+: read ([0-9]+) pages");
  if (std::regex_search(err, m, read)) c.read = std::stoull(m[1]);
  static const std::regex holder("holder process ([0-9]+) keeps");
  if (std::regex_search(err, m, holder)) c.holder = std::stoi(m[1]);
  return c;
}

// -v: the pages the dump read from process `pid` (0, and a test failure, if not said).
inline uint64_t pages_read(const std::string& err, pid_t pid) {
  std::smatch m;
  if (!std::regex_search(err, m,
                         std::regex("pid " + std::to_string(pid) + ": read ([0-9]+) pages"))) {
    ADD_FAILURE() << "no pages read for pid " << pid << " in: " << err;
    return 0;
  }
  return std::stoull(m[1]);
}

// A target of rewrite_pages.h, running until it prints "ready ".
struct RewritingTarget {
  explicit RewritingTarget(const std::vector<std::string>& argv) : child(argv) {
    child.wait_for("ready ");
    pid = child.pid();
  }
  // One round of rewrites; how many pages it rewrote (0, and a test failure, if none came).
  uint64_t rewrite() {
    EXPECT_TRUE(send_signal(pid, SIGUSR2));
    const std::string line = child.wait_for("round ");
    if (line.empty()) return 0;
    return std::stoull(line.substr(line.rfind(' ') + 1));
  }
  Child child;
  pid_t pid = 0;
};

// One link of a chain: a round of rewrites in `t`, then `dump` (which must succeed).
struct Link {
  uint64_t rewritten = 0;
  RunResult run;
  PageCounts counts;
};
inline Link next_link(RewritingTarget& t, const std::function<RunResult()>& dump) {
  Link l;
  l.rewritten = t.rewrite();
  l.run = dump();
  EXPECT_EQ(l.run.exit_code, 0) << l.run.err;
  if (l.run.exit_code == 0) l.counts = dump_counts(l.run.err);
  return l;
}

// Restores `dir` (the original `pid` gone), eager and then lazy, and has the restored process
// check every byte of its memory.
inline void restore_and_verify(const std::string& dir, pid_t pid, const std::string& comm,
                               const std::vector<std::string>& extra = {}) {
  for (bool lazy : {false, true}) {
    SCOPED_TRACE(lazy ? "lazy" : "eager");
    Child restore(restore_argv(dir, lazy, extra));
    ASSERT_NO_FATAL_FAILURE(wait_restored(restore, {pid}, comm));
    expect_verified(restore, pid);
  }
}

}  // namespace lazycr::test
