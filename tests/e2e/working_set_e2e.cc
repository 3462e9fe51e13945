// Working-set prefetch (`lazycr restore --lazy --record-working-set`, uffd/working_set.h)
// against the real kernel: working_set_target touches a fixed scattered eighth of a 64 MiB
// area (one page per 64 KiB window, not in address order) right after a recording restore;
// - the record lands in the image, `lazycr show` lists it (text and JSON), and a later lazy
//   restore (prefetch off: only the working set is pushed) pushes those pages before the
//   process asks for them: once the server says it pushed them, touching them takes no fault
//   (the faults counted on working-set pages are the few the process took while starting,
//   before the push reached them), and every byte of the area is still right;
// - the recording also writes the record's pages (working-set-<pid>.lzp), which the push
//   reads instead of the page store; damaged ones are left for the store with one warning;
// - a damaged record, and another image's, are ignored with one warning; the restore still
//   verifies every byte.
// Nothing waits on timing: the server's progress is seen through its log line and the
// process's own verdicts.
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include "image-format/image_mac.h"
#include "image-format/page_store.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/lazy_helpers.h"

namespace lazycr::test {
namespace {

constexpr uint64_t kMib = 64;
constexpr uint64_t kTouched = kMib * 256 / 16;  // pages the "touch" command reads

// working_set_target, dumped (the original is killed by the dump).
struct WsTarget {
  TempDir work;
  std::string cmd_file = work / "cmd";
  std::unique_ptr<Child> child;
  TempDir images;
  std::string dir = images / "img";

  WsTarget() {
    child = std::make_unique<Child>(std::vector<std::string>{
        target_bin("working_set_target"), "--cmd-file", cmd_file, "--mib", std::to_string(kMib)});
    EXPECT_EQ(child->wait_for("ready").rfind("ready pid=", 0), 0u);
    auto r = lazycr({"dump", "-t", std::to_string(child->pid()), "-D", dir});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(child->wait(30), 128 + SIGKILL);
  }
  pid_t pid() const { return child->pid(); }
  void send(const std::string& word) {
    std::string tmp = cmd_file + ".tmp";
    std::ofstream(tmp) << word << "\n";
    fs::rename(tmp, cmd_file);
  }
  std::string record_path() const { return dir + "/working-set.lzw"; }
  std::string record_pages_path() const {
    return dir + "/working-set-" + std::to_string(pid()) + ".lzp";
  }
};

// Waits (a minute at most) until `path` exists and, when `needle` is given, holds it.
bool wait_for_file(const std::string& path, const std::string& needle = "") {
  for (int i = 0; i < 6000; i++) {
    if (fs::exists(path) && (needle.empty() || read_text(path).find(needle) != std::string::npos))
      return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

// The number after "key": inside the "working_set" object of a stats file.
int64_t ws_number(const std::string& stats, const std::string& key) {
  const size_t at = stats.find("\"working_set\":");
  return at == std::string::npos ? -1 : json_number(stats.substr(at), key);
}

// Damages the file at `path`: one bit of the byte at `offset` flipped in place.
void flip_byte(const std::string& path, std::streamoff offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x10);
  f.seekp(offset);
  f.write(&c, 1);
  ASSERT_TRUE(f.good()) << path;
}

// A lazy restore that records the working set: the target finds "touch" waiting for it as
// soon as it runs; the record is written once its faults have been quiet for a second.
void record(WsTarget& t) {
  TempDir work;
  t.send("touch");
  LazyDetached l;
  l.start(t.dir, work, {"--record-working-set"});
  ASSERT_EQ(l.rp.pid, t.pid());
  EXPECT_EQ(l.lz->read_line(), "touch ok");
  ASSERT_TRUE(wait_for_file(t.record_path())) << "no record written";
  t.send("all");
  EXPECT_EQ(l.lz->read_line(), "all ok");
  t.send("exit");
  EXPECT_EQ(l.rp.wait(), 0);
  EXPECT_EQ(l.wait_server(), 0);
  std::string s = read_text(l.stats);
  EXPECT_EQ(ws_number(s, "pages_prefetched"), 0) << s;
  // Recording serves the touched pages alone (not their windows): one fault each.
  EXPECT_GE(json_number(s, "faults"), static_cast<int64_t>(kTouched)) << s;
}

// A lazy restore with prefetch off (only a working set is pushed) whose server logs to
// `log`; the target then touches, checks everything and exits. Returns the stats.
std::string replay(WsTarget& t, const TempDir& work, const std::string& log, bool wait_for_push) {
  LazyDetached l;
  l.start(t.dir, work, {"--prefetch", "off"}, {"-v", "--log-file", log});
  EXPECT_EQ(l.rp.pid, t.pid());
  if (wait_for_push) {
    EXPECT_TRUE(wait_for_file(log, "working set pushed")) << read_text(log);
  }
  t.send("touch");
  EXPECT_EQ(l.lz->read_line(), "touch ok");
  t.send("all");
  EXPECT_EQ(l.lz->read_line(), "all ok");
  t.send("exit");
  EXPECT_EQ(l.rp.wait(), 0);
  EXPECT_EQ(l.wait_server(), 0);
  return read_text(l.stats);
}

TEST(WorkingSet, RecordedThenPushedFirstAndEveryByteRight) {
  WsTarget t;
  ASSERT_NO_FATAL_FAILURE(record(t));

  auto show = lazycr({"show", t.dir});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("used by lazy restores"), std::string::npos) << show.out;
  EXPECT_NE(show.out.find("record pages: " + t.record_pages_path()), std::string::npos) << show.out;
  auto json = lazycr({"show", t.dir, "--json"});
  EXPECT_EQ(json.exit_code, 0) << json.err;
  const size_t at = json.out.find("\"working_set\":");
  ASSERT_NE(at, std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"used\": true", at), std::string::npos) << json.out.substr(at);
  EXPECT_GE(json_number(json.out.substr(at), "pages"), static_cast<int64_t>(kTouched));
  const size_t rp = json.out.find("\"record_pages\":", at);
  ASSERT_NE(rp, std::string::npos) << json.out.substr(at);
  EXPECT_NE(json.out.find("\"used\": true", rp), std::string::npos) << json.out.substr(rp);
  EXPECT_GT(json_number(json.out.substr(rp), "bytes"), 0) << json.out.substr(rp);

  TempDir work;
  const std::string s = replay(t, work, work / "server.log", true);
  EXPECT_EQ(json_number(s, "killed"), 0) << s;
  // Every touched page was pushed, before the process asked for it: the only faults on
  // working-set pages are the process's own while it started (before the push got there).
  EXPECT_GE(ws_number(s, "pages_prefetched"), static_cast<int64_t>(kTouched)) << s;
  EXPECT_LE(ws_number(s, "faults"), 64) << s;
  EXPECT_GE(ws_number(s, "done_ns"), 0) << s;
  // Read from the record pages (the recording wrote them beside the record), not the store.
  EXPECT_TRUE(fs::exists(t.record_pages_path()));
  // The dump's signature still holds: the record and its pages are outside image.mac.
  auto key = image::load_image_key(false);
  ASSERT_TRUE(key.has_value());
  std::string why;
  EXPECT_EQ(image::verify_image(t.dir, *key, &why), image::MacCheck::kValid) << why;
  EXPECT_GE(ws_number(s, "pages_from_record_pages"), static_cast<int64_t>(kTouched)) << s;
  // The rest came on faults ("all"), prefetch being off.
  EXPECT_EQ(json_number(s, "by_prefetch"), ws_number(s, "pages_prefetched")) << s;
}

// Record pages whose frames are all damaged (whichever the push reads first: the process may
// have faulted the first pages in itself): the push notices at its first read, says so once,
// and the store serves the working set instead; every byte is still right.
TEST(WorkingSet, DamagedRecordPagesAreLeftForTheStoreWithOneWarning) {
  WsTarget t;
  ASSERT_NO_FATAL_FAILURE(record(t));
  {
    auto pages = image::PageStoreReader::open(t.record_pages_path());
    ASSERT_GT(pages->frame_count(), 0u);
    for (uint64_t i = 0; i < pages->frame_count(); i++)
      flip_byte(t.record_pages_path(), static_cast<std::streamoff>(pages->frame(i).offset + 1));
  }
  auto show = lazycr({"show", t.dir});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("used by lazy restores"), std::string::npos) << show.out;
  TempDir work;
  const std::string log = work / "server.log";
  const std::string s = replay(t, work, log, true);
  const std::string text = read_text(log);
  const size_t w = text.find("record pages ignored");
  ASSERT_NE(w, std::string::npos) << text;
  EXPECT_EQ(text.find("record pages ignored", w + 1), std::string::npos) << text;
  EXPECT_EQ(json_number(s, "killed"), 0) << s;
  EXPECT_EQ(ws_number(s, "pages_from_record_pages"), 0) << s;
  EXPECT_GE(ws_number(s, "pages_prefetched"), static_cast<int64_t>(kTouched)) << s;
}

TEST(WorkingSet, DamagedRecordIsIgnoredWithOneWarning) {
  WsTarget t;
  ASSERT_NO_FATAL_FAILURE(record(t));
  flip_byte(t.record_path(), 70);  // in the payload
  auto show = lazycr({"show", t.dir});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("Working set: damaged"), std::string::npos) << show.out;

  TempDir work;
  const std::string log = work / "server.log";
  const std::string s = replay(t, work, log, false);
  const std::string text = read_text(log);
  const size_t w = text.find("working set ignored");
  ASSERT_NE(w, std::string::npos) << text;
  EXPECT_EQ(text.find("working set ignored", w + 1), std::string::npos) << text;
  EXPECT_NE(text.find("checksum mismatch"), std::string::npos) << text;
  EXPECT_EQ(ws_number(s, "pages_prefetched"), 0) << s;
  EXPECT_EQ(json_number(s, "by_prefetch"), 0) << s;
}

TEST(WorkingSet, AnotherImagesRecordIsIgnoredWithOneWarning) {
  WsTarget a;
  ASSERT_NO_FATAL_FAILURE(record(a));
  WsTarget b;
  fs::copy_file(a.record_path(), b.record_path());
  TempDir work;
  const std::string log = work / "server.log";
  const std::string s = replay(b, work, log, false);
  const std::string text = read_text(log);
  EXPECT_NE(text.find("working set ignored"), std::string::npos) << text;
  EXPECT_NE(text.find("is not a process this restore serves"), std::string::npos) << text;
  EXPECT_EQ(ws_number(s, "pages_prefetched"), 0) << s;
}

}  // namespace
}  // namespace lazycr::test
