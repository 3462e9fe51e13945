// Images are untrusted input (README "Trust"): hostile images made here by editing an honest
// one are refused, by name, and nothing is left behind.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <fstream>
#include <functional>
#include <string>

#include "common/error.h"
#include "image-format/image_dir.h"
#include "image-format/page_store.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/lazy_helpers.h"
#include "tests/e2e/restore_helpers.h"

namespace lazycr::test {
namespace {

namespace fs = boost::filesystem;

// A state_target whose files any user may use (so that a uid-65534 copy of it can run), dumped.
struct Dumped {
  StateTarget t;
  TempDir images;
  std::string dir = images / "img";
  std::string path;  // its process file
  image::Process original;

  Dumped() {
    ::chmod(t.work.path().c_str(), 0777);
    for (auto& e : fs::directory_iterator(t.work.path())) ::chmod(e.path().c_str(), 0666);
    t.dump(dir);
    path = image::process_path(dir, t.pid());
    image::read_message_file(path, image::kProcessMagic, &original);
  }
  void write(const image::Process& p) const {
    image::write_message_file(path, image::kProcessMagic, p);
  }
};

// The original as an unprivileged process: uid and gid 65534, no groups, no capabilities.
image::Process as_nobody(const image::Process& p) {
  image::Process q = p;
  auto* c = q.mutable_creds();
  for (int i = 0; i < 4; i++) {
    c->set_uids(i, 65534);
    c->set_gids(i, 65534);
  }
  c->clear_groups();
  c->set_cap_effective(0);
  c->set_cap_permitted(0);
  c->set_cap_inheritable(0);
  c->set_cap_ambient(0);
  return q;
}

image::FileIdentity identity_of(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  image::FileIdentity id;
  id.set_path(path);
  id.set_dev(st.st_dev);
  id.set_inode(st.st_ino);
  id.set_size(static_cast<uint64_t>(st.st_size));
  id.set_mtime_ns(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000ll + st.st_mtim.tv_nsec);
  id.set_ctime_ns(static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000ll + st.st_ctim.tv_nsec);
  id.set_mode(st.st_mode);
  return id;
}

// Adds fd `num` (above the image's) open on `path` as the dump would have recorded it.
void add_fd(image::Process& p, int num, image::FileDescriptor::Kind kind, const std::string& path,
            uint32_t flags) {
  uint64_t id = 1;
  for (const auto& f : p.fds()) id = std::max<uint64_t>(id, f.file_id() + 1000);
  auto* f = p.add_fds();
  f->set_fd(num);
  f->set_kind(kind);
  f->set_target(path);
  f->set_flags(flags);
  f->set_restorable(true);
  f->set_file_id(id);
  *f->mutable_file() = identity_of(path);
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISCHR(st.st_mode)) f->set_rdev(st.st_rdev);
}

// Adds a private read-only mapping of `path` where nothing else is.
void add_area(image::Process& p, const std::string& path) {
  constexpr uint64_t kAt = 0x100000000000ull;
  image::MemoryArea a;
  a.set_start(kAt);
  a.set_end(kAt + 4096);
  a.set_prot(PROT_READ);
  a.set_kind(image::MemoryArea::PRIVATE_FILE);
  *a.mutable_file() = identity_of(path);
  a.set_name(path);
  a.set_vmflags("rd mr mw me");
  auto* areas = p.mutable_areas();
  auto pos = std::find_if(areas->begin(), areas->end(),
                          [&](const image::MemoryArea& m) { return m.start() > kAt; });
  int index = static_cast<int>(pos - areas->begin());
  *areas->Add() = a;
  for (int i = areas->size() - 1; i > index; i--) areas->SwapElements(i, i - 1);
}

// Restores `dir` in the foreground (the target verifies itself once told to go).
RunResult restore(Dumped& d, std::vector<std::string> extra = {}, int timeout_s = 60) {
  std::vector<std::string> args{"restore", "-D", d.dir, "--shell-job"};
  args.insert(args.end(), extra.begin(), extra.end());
  return lazycr(args, timeout_s);
}

void expect_refused(const RunResult& r, pid_t pid, const std::string& says) {
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("lazycr: restore: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(says), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  expect_nothing_left(pid);
}

// Issue 10 item 6: an unprivileged image edited to grant root, capabilities or group 0 is
// refused without this machine's MAC; the unprivileged one restores without it, and
// --trust-image restores an edited one.
TEST(Trust, AnEditedImageThatGrantsPrivilegesIsRefused) {
  Dumped d;
  const pid_t pid = d.t.pid();
  d.t.go();
  const image::Process nobody = as_nobody(d.original);
  d.write(nobody);
  auto r = restore(d);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");

  struct Case {
    std::string name, says;
    std::function<void(image::Credentials&)> edit;
  };
  const std::vector<Case> cases = {
      {"uid 0", "runs as uid 0 0 0 0",
       [](image::Credentials& c) {
         for (int i = 0; i < 4; i++) c.set_uids(i, 0);
       }},
      {"all capabilities", "holds capabilities (permitted 0x1ffffffffff",
       [](image::Credentials& c) {
         c.set_cap_permitted(0x1ffffffffffull);
         c.set_cap_effective(0x1fffeffffffull);
       }},
      {"ambient", "ambient 0x1ffffffffff",
       [](image::Credentials& c) {
         c.set_cap_permitted(0x1ffffffffffull);
         c.set_cap_inheritable(0x1ffffffffffull);
         c.set_cap_ambient(0x1ffffffffffull);
       }},
      {"group 0", "has supplementary group 0", [](image::Credentials& c) { c.add_groups(0); }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    image::Process edited = nobody;
    c.edit(*edited.mutable_creds());
    d.write(edited);
    r = restore(d);
    expect_refused(r, pid, "the image is not signed by this machine");
    EXPECT_NE(r.err.find(c.says), std::string::npos) << r.err;
  }
  image::Process root = nobody;
  for (int i = 0; i < 4; i++) root.mutable_creds()->set_uids(i, 0);
  d.write(root);
  r = restore(d, {"--trust-image"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
}

// Item 6: files are opened as the process they are for: an unprivileged image naming a file
// only root may read (as a descriptor, a mapping, its executable, its directory) is refused.
TEST(Trust, FilesAreOpenedWithTheProcessCredentials) {
  Dumped d;
  const pid_t pid = d.t.pid();
  TempDir secrets;
  ::chmod(secrets.path().c_str(), 0755);
  const std::string secret = secrets / "shadow";
  std::ofstream(secret) << "root:secret\n";
  ::chmod(secret.c_str(), 0600);
  const std::string closed = secrets / "closed";
  ::mkdir(closed.c_str(), 0700);
  const image::Process nobody = as_nobody(d.original);
  struct Case {
    std::string name, says;
    std::function<void(image::Process&)> edit;
  };
  const std::vector<Case> cases = {
      {"fd", "for fd 50: Permission denied",
       [&](image::Process& p) { add_fd(p, 50, image::FileDescriptor::REGULAR, secret, O_RDWR); }},
      {"mapping", "area 0x100000000000", [&](image::Process& p) { add_area(p, secret); }},
      {"cwd", "chdir(" + closed + "/x)",
       [&](image::Process& p) {
         ::mkdir((closed + "/x").c_str(), 0777);
         p.set_cwd(closed + "/x");
       }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    image::Process edited = nobody;
    c.edit(edited);
    d.write(edited);
    auto r = restore(d);
    expect_refused(r, pid, "Permission denied");
    EXPECT_NE(r.err.find(c.says), std::string::npos) << r.err;
  }
}

// Item 7: a relative path would be checked in lazycr's directory and opened in the process's.
TEST(Trust, RelativePathsAreRefused) {
  Dumped d;
  const pid_t pid = d.t.pid();
  TempDir checked, opened;
  for (const auto* dir : {&checked, &opened}) {
    ::mkdir((*dir / "etc").c_str(), 0755);
    std::ofstream(*dir / "etc/shadow") << (dir == &checked ? "harmless\n" : "the other one\n");
  }
  image::Process edited = d.original;
  add_fd(edited, 50, image::FileDescriptor::REGULAR, checked / "etc/shadow", O_RDONLY);
  edited.mutable_fds(edited.fds_size() - 1)->mutable_file()->set_path("etc/shadow");
  edited.mutable_fds(edited.fds_size() - 1)->set_target("etc/shadow");
  edited.set_cwd(opened.path());
  d.write(edited);
  sign_test_image(d.dir);
  char here[4096];
  ASSERT_NE(::getcwd(here, sizeof here), nullptr);
  ASSERT_EQ(::chdir(checked.path().c_str()), 0);
  d.t.go();
  auto r = restore(d);
  ASSERT_EQ(::chdir(here), 0);
  expect_refused(r, pid, "fd 50 etc/shadow is not an absolute path");
}

// Item 9: a FIFO in place of a file is never opened (an open would block for ever).
TEST(Trust, AFifoInPlaceOfAFileIsRefusedNotOpened) {
  Dumped d;
  const pid_t pid = d.t.pid();
  TempDir fifos;
  const std::string fifo = fifos / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0666), 0);
  struct Case {
    std::string name, says;
    std::function<void(image::Process&)> edit;
  };
  const std::vector<Case> cases = {
      {"fd", "fd 50 " + fifo + " is recorded as file type 10000",
       [&](image::Process& p) { add_fd(p, 50, image::FileDescriptor::REGULAR, fifo, O_RDONLY); }},
      {"mapping", "maps " + fifo + " is recorded as file type 10000",
       [&](image::Process& p) { add_area(p, fifo); }},
      {"executable", "executable " + fifo + " is recorded as file type 10000",
       [&](image::Process& p) { *p.mutable_exe() = identity_of(fifo); }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    image::Process edited = d.original;
    c.edit(edited);
    d.write(edited);
    sign_test_image(d.dir);
    auto r = restore(d, {}, 30);
    expect_refused(r, pid, c.says);
  }
}

// Item 14: a terminal that was closed after the dump, whose number a new one took, is not
// reconnected by its path; the same terminal still is.
TEST(Trust, AClosedTerminalsNumberIsNotReconnected) {
  Dumped d;
  const pid_t pid = d.t.pid();
  auto open_pty = [] {
    int m = ::posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    EXPECT_GE(m, 0);
    EXPECT_EQ(::grantpt(m), 0);
    EXPECT_EQ(::unlockpt(m), 0);
    return m;
  };
  int master = open_pty();
  const std::string pts = ::ptsname(master);
  image::Process edited = d.original;
  add_fd(edited, 50, image::FileDescriptor::CHARDEV, pts, O_RDWR);
  d.write(edited);
  sign_test_image(d.dir);
  // A pty is told from the one that took its number by its ctime, which the kernel takes from
  // its coarse clock (one tick is 1-10 ms): a new pty made within the same tick is the same
  // terminal to anyone (a limit of that check). Reopened once the coarse clock has moved on.
  struct stat old {};
  ASSERT_EQ(::stat(pts.c_str(), &old), 0);
  ::close(master);
  for (;;) {
    timespec now{};
    ::clock_gettime(CLOCK_REALTIME_COARSE, &now);
    if (now.tv_sec > old.st_ctim.tv_sec ||
        (now.tv_sec == old.st_ctim.tv_sec && now.tv_nsec > old.st_ctim.tv_nsec))
      break;
    ::usleep(500);
  }
  master = open_pty();
  ASSERT_EQ(std::string(::ptsname(master)), pts) << "the new pty did not take the old number";
  auto r = restore(d);
  expect_refused(r, pid, "fd 50 " + pts + " is another terminal than the process had");
  EXPECT_NE(r.err.find("--shell-job"), std::string::npos) << r.err;
  // The same terminal, still open, is the process's again.
  edited = d.original;
  add_fd(edited, 50, image::FileDescriptor::CHARDEV, pts, O_RDWR);
  d.write(edited);
  sign_test_image(d.dir);
  d.t.go();
  r = restore(d);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n");
  ::close(master);
}

// A signed root image whose page store was changed after signing: frames of random pages are
// stored raw, so two frames of the same size swapped are valid zstd frames with valid
// checksums. image.mac covers the index, not the frames, so the restore starts; each frame is
// checked against its digest in the (signed) index as it is read. Lazy: the page server kills
// the process rather than serve it, and says which store and frame; eager: the fill fails by
// name and nothing is left. Never "verified ok", nor a verdict of wrong memory.
TEST(Trust, ASignedImageWithChangedFramesNeverRunsOnThem) {
  StateTarget t({"--mib", "8", "--pattern", "random"});
  TempDir images;
  const std::string dir = images / "img";
  t.dump(dir);
  t.go();
  const std::string store_path = image::pages_path(dir, t.pid());
  uint64_t frame = 0, at = 0, size = 0;
  {
    auto store = image::PageStoreReader::open(store_path);
    ASSERT_TRUE(store->has_frame_digests());
    for (uint64_t i = store->frame_count() / 2; i + 1 < store->frame_count(); ++i)
      if (store->frame(i).size == store->frame(i + 1).size) {
        frame = i;
        at = store->frame(i).offset;
        size = store->frame(i).size;
        break;
      }
  }
  ASSERT_GT(size, 0u) << "no two neighbouring frames of the same size";
  {
    std::string bytes = read_text(store_path);
    std::string a = bytes.substr(at, size), b = bytes.substr(at + size, size);
    ASSERT_NE(a, b);
    bytes.replace(at, size, b);
    bytes.replace(at + size, size, a);
    std::ofstream(store_path, std::ios::binary | std::ios::trunc) << bytes;
  }
  const std::string names_frame = cat(store_path, ": frame ");
  const std::string mismatch = "do not match their SHA-256 in the index";

  TempDir logs;
  const std::string log = logs / "lazycr.log";
  auto r = lazycr({"--log-file", log, "restore", "--lazy", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 128 + SIGKILL) << r.out << r.err;
  EXPECT_EQ(r.out, "") << "the process ran on memory it was not served";
  const std::string text = read_text(log);
  EXPECT_NE(text.find(cat("page server: pid ", t.pid())), std::string::npos) << text;
  EXPECT_NE(text.find(names_frame), std::string::npos) << text;
  EXPECT_NE(text.find(mismatch), std::string::npos) << text;
  EXPECT_NE(text.find("killed the process rather than serve wrong memory"), std::string::npos)
      << text;
  for (pid_t g : children_named("lazycr-guardian")) reap(g);
  expect_nothing_left(t.pid());

  r = lazycr({"restore", "-D", dir, "--shell-job"});
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_EQ(r.out, "");
  EXPECT_NE(r.err.find(cat("lazycr: restore: fill for pid ", t.pid())), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(cat(names_frame, frame)), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(mismatch), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  expect_nothing_left(t.pid());
}

}  // namespace
}  // namespace lazycr::test
