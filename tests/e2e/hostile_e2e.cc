// Hostile images (tests/fuzz/hostile_images.h) made from a real dump: `show` and `restore`
// refuse each with one line naming the file, exit 1, never hang, and leave no process.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <boost/filesystem.hpp>

#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/fuzz/hostile_images.h"

namespace lazycr::test {
namespace {

namespace fs = boost::filesystem;

// One real dump of a state_target (with a pipe, so shared.pb holds something), copied afresh
// for each hostile variant.
class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    images_ = new TempDir;
    // Kept until the end: its work directory holds files the image refers to.
    target_ = new StateTarget({"--mib", "4", "--pipe"});
    pid_ = target_->pid();
    target_->dump(*images_ / "good");
  }
  static void TearDownTestSuite() {
    delete images_;
    delete target_;
    images_ = nullptr;
    target_ = nullptr;
  }

  // A fresh copy of the good image.
  std::string copy(const std::string& name) {
    std::string dir = *images_ / name;
    fs::remove_all(dir);
    fs::create_directory(dir);
    for (const auto& e : fs::directory_iterator(*images_ / "good"))
      fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
    return dir;
  }

  // show, show --json and restore each exit 1 with one line that contains every one of `says`.
  void expect_refused(const std::string& dir, const std::vector<std::string>& says) {
    auto kids = proc::list_children(getpid());
    std::set<pid_t> ours(kids.begin(), kids.end());
    for (const std::vector<std::string>& args :
         {std::vector<std::string>{"show", dir}, {"show", "--json", dir}, {"restore", "-D", dir}}) {
      SCOPED_TRACE(args.front());
      auto r = lazycr(args, 60);  // killed, and the test failed, if it hangs
      EXPECT_EQ(r.exit_code, 1) << r.err;
      EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
      EXPECT_EQ(r.err.rfind("lazycr: ", 0), 0u) << r.err;
      for (const auto& s : says) EXPECT_NE(r.err.find(s), std::string::npos) << r.err;
      expect_nothing_left(pid_, ours);
    }
  }

  static TempDir* images_;
  static StateTarget* target_;
  static pid_t pid_;
};

TempDir* Hostile::images_ = nullptr;
StateTarget* Hostile::target_ = nullptr;
pid_t Hostile::pid_ = 0;

TEST_F(Hostile, TheGoodImageIsShown) {
  auto r = lazycr({"show", *images_ / "good"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

// Opening a FIFO for reading blocks until a writer comes: show and restore hung for ever.
TEST_F(Hostile, FifoInPlaceOfAnImageFile) {
  std::string pid = std::to_string(pid_);
  for (std::string file : std::vector<std::string>{"inventory.pb", "process-" + pid + ".pb",
                                                   "pages-" + pid + ".lzp", "shared.pb"}) {
    SCOPED_TRACE(file);
    std::string dir = copy("fifo");
    hostile::replace_with_fifo(dir + "/" + file);
    expect_refused(dir, {dir + "/" + file, "not a regular file (a FIFO)"});
  }
}

// Issue 10, item 8: 40 process files of ~10 KiB that decode to 255 MiB each (an unknown
// field) made show allocate until std::bad_alloc. Refused from the first file's frame header.
TEST_F(Hostile, MetadataBombOverTheFileBound) {
  std::string dir = copy("bomb");
  hostile::add_bomb_processes(dir, 4000000, 40, 255ull << 20);
  EXPECT_LT(fs::file_size(image::process_path(dir, 4000000)), 64u << 10);
  expect_refused(dir, {image::process_path(dir, 4000000), "exceeds the bound of 67108864"});
}

// Each file within its own bound (60 MiB, mostly an unknown field), the image over its
// whole-image bound (512 MiB) at the ninth.
TEST_F(Hostile, MetadataBombsWithinTheFileBoundOverTheImageBound) {
  std::string dir = copy("bombs");
  hostile::add_bomb_processes(dir, 4000000, 10, 60ull << 20);
  expect_refused(dir, {image::process_path(dir, 4000008), "past its bound of 536870912"});
}

// 20 M empty memory areas: 40 MB decoded (within the file bound), 2-3 GB once parsed.
TEST_F(Hostile, EmptyRecordsThatWouldTakeGigabytesParsed) {
  std::string dir = copy("records");
  std::string path = image::process_path(dir, pid_);
  image::Process p;
  image::read_message_file(path, image::kProcessMagic, &p);
  std::string file = hostile::empty_records(image::kProcessMagic, p, 19, 20u << 20);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << file;
  expect_refused(dir, {path, "bytes of memory once parsed, more than the bound"});
}

// Issue 10, item 6: an area the kernel will not map (below vm.mmap_min_addr, here address 0)
// is refused by name at validation, before anything is created.
TEST_F(Hostile, AreaBelowMmapMinAddr) {
  std::string dir = copy("zero-page");
  std::string path = image::process_path(dir, pid_);
  image::Process p;
  image::read_message_file(path, image::kProcessMagic, &p);
  image::MemoryArea* a = p.mutable_areas()->Add();
  a->set_start(0);
  a->set_end(0x1000);
  a->set_prot(3);
  a->set_kind(image::MemoryArea::ANON);
  std::rotate(p.mutable_areas()->rbegin(), p.mutable_areas()->rbegin() + 1,
              p.mutable_areas()->rend());
  image::write_message_file(path, image::kProcessMagic, p);
  ASSERT_EQ(lazycr({"show", dir}).exit_code, 0) << "the image itself is well formed";
  auto kids = proc::list_children(getpid());
  std::set<pid_t> ours(kids.begin(), kids.end());
  auto r = lazycr({"restore", "-D", dir, "--shell-job", "-d"}, 60);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("area 0x0-0x1000"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("vm.mmap_min_addr"), std::string::npos) << r.err;
  expect_nothing_left(pid_, ours);
}

}  // namespace
}  // namespace lazycr::test
