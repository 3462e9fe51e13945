// `lazycr dump --parent`: a chain of incremental dumps of a process that rewrites 1% of its
// memory between dumps stores about 1% per link, `show` names the chain, and the last link
// restores (eager and lazy) to a process whose every byte is checked. Parents that are
// missing, damaged, changed or from another process are refused by name, leaving nothing.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/signals.h"
#include "image-format/image_dir.h"
#include "tests/e2e/chain_helpers.h"
#include "tests/e2e/harness.h"

namespace lazycr::test {
namespace {

namespace fs = std::filesystem;

RunResult dump(pid_t pid, const std::string& dir, const std::string& parent = "") {
  std::vector<std::string> args{"dump", "-t", std::to_string(pid), "-D", dir, "--leave-running"};
  if (!parent.empty()) args.insert(args.end(), {"--parent", parent});
  return lazycr(args);
}

std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// The base dumped with --hash-pages (pages compared by digest), and without (the chain compares
// the pages left to the base by reading them back).
void chain_of_five(bool hashed_base) {
  TempDir images;
  RewritingTarget t({target_bin("incr_target"), "64", "10"});  // 16384 pages, ~1% per round
  auto full = hashed_base ? lazycr({"dump", "-t", std::to_string(t.pid), "-D", images / "1",
                                    "--leave-running", "--hash-pages"})
                          : dump(t.pid, images / "1");
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const PageCounts base = dump_counts(full.err);
  ASSERT_GT(base.stored, 16384u);
  for (int link = 2; link <= 5; link++) {
    SCOPED_TRACE("link " + std::to_string(link));
    const Link l = next_link(t, [&] {
      return dump(t.pid, images / std::to_string(link), images / std::to_string(link - 1));
    });
    ASSERT_GT(l.rewritten, 16384u / 200) << "about 1% of the pages";
    ASSERT_EQ(l.run.exit_code, 0);
    const PageCounts& c = l.counts;
    // Every rewritten page differs from the parent's; the rest of what is stored is the
    // target's bookkeeping, stack and libc data: together well under 2% of the full image.
    EXPECT_GE(c.stored, l.rewritten) << l.run.err;
    EXPECT_LE(c.stored * 100, base.stored * 2) << l.run.err;
    EXPECT_GE(c.parent + c.stored + c.zero, base.stored) << l.run.err;
    EXPECT_NE(l.run.err.find("link " + std::to_string(link - 1) + " of its chain"),
              std::string::npos)
        << l.run.err;
  }
  auto show = lazycr({"show", images / "5"});
  ASSERT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("Chain: link 4"), std::string::npos) << show.out;
  for (int link = 1; link <= 5; link++)
    EXPECT_NE(show.out.find(images / std::to_string(link)), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("(full dump)"), std::string::npos) << show.out;

  // The original goes; the last link restores it, eager and then lazy.
  const pid_t pid = t.pid;
  ASSERT_TRUE(send_signal(pid, SIGKILL));
  t.child.wait();
  restore_and_verify(images / "5", pid, "incr_target");
}

TEST(Incremental, ChainOfFiveStoresTheChangesAndRestoresEagerAndLazy) {
  for (bool hashed_base : {true, false}) {
    SCOPED_TRACE(hashed_base ? "base with page digests" : "base without page digests");
    chain_of_five(hashed_base);
    if (HasFatalFailure()) return;
  }
}

TEST(Incremental, BadParentsAreRefusedByNameLeavingNothing) {
  TempDir images;
  RewritingTarget t({target_bin("incr_target"), "8", "10"});
  auto r1 = dump(t.pid, images / "1");
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  t.rewrite();
  auto r2 = dump(t.pid, images / "2", images / "1");
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  const std::vector<std::string> before = entries(images.path());
  auto refused = [&](const RunResult& r, const std::string& what) {
    EXPECT_NE(r.exit_code, 0) << r.err;
    EXPECT_NE(r.err.find(what), std::string::npos) << r.err;
    EXPECT_EQ(entries(images.path()), before) << "nothing left behind";
  };

  // Missing.
  refused(dump(t.pid, images / "x", images / "nope"),
          "parent image " + images / "nope" + ": missing");
  // Another process (same program, same size): another tree.
  {
    RewritingTarget other({target_bin("incr_target"), "8", "10"});
    refused(dump(other.pid, images / "x", images / "1"), "a dump of another tree");
  }
  // Changed: link 1's inventory rewritten (still a valid image): link 2 no longer matches it.
  {
    image::Inventory inv;
    image::read_message_file(images / "1/inventory.pb", image::kInventoryMagic, &inv);
    inv.set_created_unix_ns(inv.created_unix_ns() + 1);
    image::write_message_file(images / "1/inventory.pb", image::kInventoryMagic, inv);
    sign_test_image(images / "1");
    const std::string why = "parent image " + images / "1" + " of " + images / "2" +
                            ": changed since this image was dumped";
    refused(dump(t.pid, images / "x", images / "2"), why);
    refused(run(restore_argv(images / "2", false)), why);
  }
  // Damaged: a page store of link 1 cut short.
  {
    const std::string store = images / ("1/pages-" + std::to_string(t.pid) + ".lzp");
    ASSERT_EQ(::truncate(store.c_str(), static_cast<off_t>(fs::file_size(store) - 1)), 0);
    refused(dump(t.pid, images / "x", images / "1"), "parent image " + images / "1" + ": " + store);
    refused(run(restore_argv(images / "2", false)), store);
    refused(run(restore_argv(images / "2", true)), store);
  }
  EXPECT_TRUE(t.child.running()) << "the dumped process runs on";
}

}  // namespace
}  // namespace lazycr::test
