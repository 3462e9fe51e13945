// `lazycr dump --compress`: each choice is recorded in the image (`show` says it), stores
// frames as it says (zstd or LZ4 frames, raw frames where they save nothing, every frame raw
// with none), and the image restores eager and lazy to a process that verifies its own memory.
#include <gtest/gtest.h>
#include <signal.h>

#include <string>
#include <vector>

#include "common/proc.h"
#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

struct Choice {
  std::vector<std::string> args;  // given to dump
  std::string recorded;           // what the image says
  std::string pattern;            // state_target --pattern
  bool lz4 = false;               // the stores' codec is LZ4
};

// Raw and zstd frames of one store, summed over the image's processes.
std::pair<uint64_t, uint64_t> raw_and_zstd_frames(const std::string& dir) {
  image::ImageReader img(dir);
  uint64_t raw = 0, all = 0;
  for (int pid : img.inventory().pids()) {
    raw += img.pages(pid).raw_frame_count();
    all += img.pages(pid).frame_count();
  }
  return {raw, all - raw};
}

TEST(Compress, EveryChoiceIsRecordedAndRestoresEagerAndLazy) {
  const std::vector<Choice> choices{
      {{}, "auto", "semi", true},  // the default: LZ4 where it does well
      // LZ4 keeps ~0.8 of a key-value heap, zstd with its literals ~0.7: auto takes zstd.
      {{"--compress", "auto"}, "auto", "records", false},
      {{"--compress", "auto"}, "auto", "random", true},  // nothing compresses: LZ4, all raw
      {{"--level", "-3"}, "zstd:-3", "semi"},            // --level alone is zstd
      {{"--compress", "zstd:-5"}, "zstd:-5", "semi"},
      {{"--compress", "zstd:3"}, "zstd:3", "text"},
      {{"--compress", "zstd"}, "zstd:-3", "random"},
      {{"--compress", "none"}, "none", "semi"},
      {{"--compress", "lz4"}, "lz4", "semi", true},
      {{"--compress", "lz4"}, "lz4", "text", true},
      {{"--compress", "lz4"}, "lz4", "random", true},
      {{"--compress", "lz4:8"}, "lz4:8", "text", true},
  };
  for (const Choice& c : choices) {
    for (bool lazy : {false, true}) {
      SCOPED_TRACE(c.recorded + " " + c.pattern + (lazy ? " lazy" : " eager"));
      StateTarget t({"--mib", "8", "--pattern", c.pattern});
      TempDir images;
      const std::string dir = images / "img";
      t.dump(dir, false, c.args);
      if (HasFatalFailure()) return;

      auto show = lazycr({"show", dir});
      ASSERT_EQ(show.exit_code, 0) << show.err;
      EXPECT_NE(show.out.find("compression " + c.recorded + ","), std::string::npos) << show.out;
      auto json = lazycr({"show", "--json", "--verify", dir});
      ASSERT_EQ(json.exit_code, 0) << json.err;
      EXPECT_NE(json.out.find("\"compression\": \"" + c.recorded + "\""), std::string::npos);

      auto [raw, zstd] = raw_and_zstd_frames(dir);
      {
        // The codec of the frames that are not raw is the store's, and its version says so.
        image::ImageReader img(dir);
        for (int pid : img.inventory().pids()) {
          const bool lz4 = img.pages(pid).index().compression() == image::PageIndex::LZ4;
          EXPECT_EQ(lz4, c.lz4) << pid;
        }
      }
      if (c.recorded == "none") {
        EXPECT_GT(raw, 0u);
        EXPECT_EQ(zstd, 0u) << "compression none stores every frame raw";
      } else if (c.pattern == "random") {
        // Random pages do not compress: their frames are raw; the few frames of libraries,
        // heap and stacks do.
        EXPECT_GE(raw, 128u) << "8 MiB of random pages fill 128 frames of 64 KiB, all raw";
      } else {
        EXPECT_GT(zstd, raw) << "compressible pages are stored compressed";
      }

      std::vector<std::string> args{lazycr_bin(), "restore", "-D", dir, "--shell-job", "--detach"};
      const std::string server_pidfile = images / "server.pid";
      if (lazy) args.insert(args.end(), {"--lazy", "--server-pidfile", server_pidfile});
      Child lz(args);
      Restored rp;
      rp.pid = std::atoi(lz.read_line().c_str());
      EXPECT_EQ(lz.wait(), 0);
      ASSERT_EQ(rp.pid, t.pid());
      t.go();
      EXPECT_EQ(lz.read_line(), "verified ok");
      EXPECT_EQ(rp.wait(), 0);
      if (lazy) reap(std::atoi(proc::read_file(server_pidfile).c_str()));
    }
  }
}

TEST(Compress, BadChoicesAreUsageErrors) {
  for (const char* bad : {"zstd:0", "zstd:99", "lz4:0", "lz4:65", "lz5", "zstd:fast"}) {
    auto r = lazycr({"dump", "-t", "1", "-D", "/nonexistent/x", "--compress", bad});
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.err;
    EXPECT_NE(r.err.find(std::string("--compress ") + bad), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace lazycr::test
