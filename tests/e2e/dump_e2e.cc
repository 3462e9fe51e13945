// `lazycr dump` against real running processes: the image must describe what the target
// reported about itself; failures must leave the target running as it was.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "common/signals.h"
#include "image-format/image_dir.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

using image::FileDescriptor;
using image::MemoryArea;

struct StateTarget {
  TempDir work;
  std::string verify_file = work / "verify";
  Child child;
  TargetInfo info;

  explicit StateTarget(std::vector<std::string> extra = {})
      : child([&] {
          std::vector<std::string> argv{target_bin("state_target"), "--verify-file",
                                        work / "verify", "--workdir", work.path()};
          argv.insert(argv.end(), extra.begin(), extra.end());
          return argv;
        }()) {
    info = TargetInfo::parse(child.wait_for("ready"));
  }

  // Asks the target to verify itself; returns its verdict line and exit code.
  std::pair<std::string, int> verify() {
    std::ofstream(verify_file) << "go";
    std::string line = child.read_line(120);
    return {line, child.wait(120)};
  }
};

void expect_unharmed(StateTarget& t) {
  auto [line, code] = t.verify();
  EXPECT_EQ(line, "verified ok");
  EXPECT_EQ(code, 0);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), {}};
}

template <typename... Args>
std::string cat_path(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// The targets inherit the test's resource limits.
void expect_our_rlimits(const image::Process& p) {
  ASSERT_EQ(p.rlimits_size(), RLIMIT_NLIMITS);
  for (const auto& l : p.rlimits()) {
    struct rlimit64 ours;
    ASSERT_EQ(prlimit64(0, static_cast<__rlimit_resource>(l.resource()), nullptr, &ours), 0);
    EXPECT_EQ(l.cur(), ours.rlim_cur) << "resource " << l.resource();
    EXPECT_EQ(l.max(), ours.rlim_max) << "resource " << l.resource();
  }
}

const MemoryArea* area_at(const image::Process& p, uint64_t addr) {
  for (const auto& a : p.areas())
    if (a.start() <= addr && addr < a.end()) return &a;
  return nullptr;
}

TEST(Dump, ImageDescribesTheTargetAndTheTargetIsKilled) {
  StateTarget t({"--mib", "16"});
  TempDir images;
  std::string dir = images / "img";
  auto r = lazycr({"dump", "-t", std::to_string(t.child.pid()), "-D", dir});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("dumped pid"), std::string::npos) << r.err;
  EXPECT_EQ(t.child.wait(30), 128 + SIGKILL);

  image::ImageReader img(dir);
  const auto& p = img.process(t.child.pid());
  EXPECT_EQ(img.inventory().root_pid(), t.child.pid());
  EXPECT_FALSE(img.inventory().kernel().release().empty());
  EXPECT_GT(img.inventory().cpu().xsave_size(), 512u);

  // Threads: the three the target reported, the leader first, one inside nanosleep.
  auto tids = t.info.list("tids");
  ASSERT_EQ(p.threads_size(), 3);
  EXPECT_EQ(p.threads(0).tid(), tids[0]);
  std::set<int> got;
  for (const auto& th : p.threads()) got.insert(th.tid());
  EXPECT_EQ(got, std::set<int>(tids.begin(), tids.end()));
  for (const auto& th : p.threads()) {
    EXPECT_EQ(th.xsave().size(), img.inventory().cpu().xsave_size());
    EXPECT_NE(th.rseq().rseq_abi_pointer(), 0u) << "glibc registers rseq for every thread";
    EXPECT_NE(th.clear_child_tid(), 0u);
    EXPECT_NE(th.robust_list(), 0u);
    EXPECT_TRUE(th.blocked() & (1ull << (SIGUSR2 - 1)));
    if (th.tid() == tids[1]) {
      EXPECT_TRUE(th.interrupted_syscall()) << "sleeper is in nanosleep";
    }
  }

  // Memory: the patterned buffer is stored whole; the touched-zero area stores no data.
  uint64_t buf = t.info.first("buf"), buf_bytes = t.info.second("buf");
  const MemoryArea* a = area_at(p, buf);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->kind(), MemoryArea::ANON);
  EXPECT_GE(a->stored_pages(), buf_bytes / 4096);
  const auto& store = img.pages(p.pid());
  std::vector<char> page(4096);
  store.read(buf, 1, page.data());
  uint64_t zero = t.info.first("zero");
  auto loc = store.find(zero);
  ASSERT_TRUE(loc.has_value()) << "written zero pages are recorded";
  EXPECT_EQ(loc->kind, image::PageRun::ZERO);
  // A page only read is the shared zero page on some machines and a fresh zeroed page on
  // others (pvm_no_zero_page=1): either way it costs no data in the image.
  auto read_only = store.find(zero + 4096);
  EXPECT_TRUE(!read_only || read_only->kind == image::PageRun::ZERO)
      << "a page only read was stored as data";
  bool heap = false, stack = false, vdso = false;
  for (const auto& ar : p.areas()) {
    heap |= ar.kind() == MemoryArea::HEAP;
    stack |= ar.kind() == MemoryArea::STACK;
    vdso |= ar.kind() == MemoryArea::VDSO;
    if (ar.kind() == MemoryArea::PRIVATE_FILE) {
      EXPECT_FALSE(ar.file().path().empty());
    }
  }
  EXPECT_TRUE(heap && stack && vdso);

  // Files at their positions and flags.
  std::map<int, const FileDescriptor*> fds;
  for (const auto& f : p.fds()) fds[f.fd()] = &f;
  int file = static_cast<int>(t.info.first("file"));
  ASSERT_TRUE(fds.count(file));
  EXPECT_EQ(fds[file]->kind(), FileDescriptor::REGULAR);
  EXPECT_EQ(fds[file]->pos(), 123u);
  EXPECT_TRUE(fds[file]->cloexec());
  EXPECT_EQ(fds[file]->file().size(), 1000u);
  int append = static_cast<int>(t.info.first("append"));
  ASSERT_TRUE(fds.count(append));
  EXPECT_TRUE(fds[append]->flags() & O_APPEND);
  int null = static_cast<int>(t.info.first("null"));
  ASSERT_TRUE(fds.count(null));
  EXPECT_EQ(fds[null]->kind(), FileDescriptor::CHARDEV);
  EXPECT_EQ(fds[null]->target(), "/dev/null");

  // Signal handlers and pending signals.
  std::map<int, const image::SigAction*> acts;
  for (const auto& s : p.sigactions()) acts[s.signo()] = &s;
  EXPECT_EQ(acts[SIGUSR1]->handler(), t.info.first("usr1"));
  EXPECT_TRUE(acts[SIGUSR1]->mask() & (1ull << (SIGHUP - 1)));
  EXPECT_EQ(acts[SIGTERM]->handler(), 1u);  // SIG_IGN
  int rt = static_cast<int>(t.info.first("rt"));
  EXPECT_NE(acts[rt]->handler(), 0u);
  bool shared_usr2 = false;
  for (const auto& s : p.shared_pending()) shared_usr2 |= s.signo() == SIGUSR2;
  EXPECT_TRUE(shared_usr2);
  bool thread_rt = false;
  for (const auto& s : p.threads(0).pending()) thread_rt |= s.signo() == rt;
  EXPECT_TRUE(thread_rt);

  // `show` lists the same facts for people and scripts.
  auto text = lazycr({"show", dir});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("Process " + std::to_string(p.pid())), std::string::npos);
  EXPECT_NE(text.out.find("/dev/null"), std::string::npos);
  auto json = lazycr({"show", "--json", "--verify", dir});
  ASSERT_EQ(json.exit_code, 0) << json.err;
  for (int tid : tids)
    EXPECT_NE(json.out.find("\"tid\": " + std::to_string(tid)), std::string::npos);
  EXPECT_NE(json.out.find("\"pos\": 123"), std::string::npos);
}

// Shared memory has no file to come back from: its contents are in the image, holes not.
TEST(Dump, SharedAnonymousAndMemfdContentsAreStored) {
  StateTarget t({"--mib", "1", "--shared"});
  TempDir images;
  auto r = lazycr(
      {"dump", "--leave-running", "-t", std::to_string(t.child.pid()), "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  image::ImageReader img(images / "img");
  const auto& p = img.process(t.child.pid());
  const MemoryArea* shared = area_at(p, t.info.first("shared"));
  const MemoryArea* memfd = area_at(p, t.info.first("memfd"));
  ASSERT_TRUE(shared && memfd);
  EXPECT_EQ(shared->kind(), MemoryArea::SHARED_ANON);
  EXPECT_TRUE(shared->shared());
  EXPECT_EQ(shared->stored_pages(), 64u);
  EXPECT_EQ(memfd->kind(), MemoryArea::SHARED_ANON);
  EXPECT_NE(memfd->name().find("memfd:lazycr-target"), std::string::npos) << memfd->name();
  EXPECT_EQ(memfd->stored_pages(), 32u) << "only the written half; holes are not stored";
  const auto& store = img.pages(p.pid());
  EXPECT_TRUE(store.find(memfd->start()).has_value());
  EXPECT_FALSE(store.find(memfd->start() + 4096).has_value());
  std::vector<unsigned char> a(4096), b(4096);
  store.read(shared->start(), 1, a.data());
  EXPECT_NE(a, std::vector<unsigned char>(4096, 0));
  expect_unharmed(t);
}

// A process of another user, with capabilities of its own: everything read from inside.
TEST(Dump, ProcessOfAnotherUserWithItsCredentials) {
  Child c({target_bin("creds_target")});
  TargetInfo info = TargetInfo::parse(c.wait_for("ready"));
  TempDir images;
  auto r = lazycr({"dump", "--leave-running", "-t", std::to_string(c.pid()), "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  image::ImageReader img(images / "img");
  const auto& cr = img.process(c.pid()).creds();
  EXPECT_EQ(std::vector<uint32_t>(cr.uids().begin(), cr.uids().end()),
            (std::vector<uint32_t>{1000, 1001, 1002, 1001}));
  EXPECT_EQ(std::vector<uint32_t>(cr.gids().begin(), cr.gids().end()),
            (std::vector<uint32_t>{1001, 1002, 1003, 1002}));
  EXPECT_EQ(std::vector<uint32_t>(cr.groups().begin(), cr.groups().end()),
            (std::vector<uint32_t>{1001, 1002}));
  EXPECT_EQ(cr.cap_effective(), 1u << 10);
  EXPECT_EQ(cr.cap_permitted(), (1u << 10) | 1u);
  EXPECT_EQ(cr.cap_inheritable(), 1u);
  EXPECT_EQ(cr.cap_ambient(), 1u);
  EXPECT_EQ(cr.cap_bounding() & (1ull << 21), 0u) << "CAP_SYS_ADMIN was dropped";
  expect_our_rlimits(img.process(c.pid()));  // read inside: lazycr may not prlimit() it
  send_signal(c.pid(), SIGUSR1);
  EXPECT_EQ(c.read_line(), "verified ok");
  EXPECT_EQ(c.wait(), 0);
}

TEST(Dump, LeaveRunningKeepsTheTargetIntact) {
  StateTarget t({"--mib", "8", "--pattern", "random"});
  TempDir images;
  auto r = lazycr(
      {"dump", "--leave-running", "-t", std::to_string(t.child.pid()), "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("frozen"), std::string::npos);
  image::ImageReader img(images / "img");
  EXPECT_TRUE(img.inventory().options().leave_running());
  EXPECT_GT(img.inventory().frozen_ns(), 0u);
  expect_our_rlimits(img.process(t.child.pid()));  // read from outside
  // No scratch page or other trace left in the target: its own checks all pass.
  expect_unharmed(t);
}

TEST(Dump, TwiceInARowWithLeaveRunningGivesTheSameMemory) {
  StateTarget t({"--mib", "4"});
  TempDir images;
  std::string pid = std::to_string(t.child.pid());
  ASSERT_EQ(lazycr({"dump", "--leave-running", "-t", pid, "-D", images / "a"}).exit_code, 0);
  ASSERT_EQ(lazycr({"dump", "--leave-running", "-t", pid, "-D", images / "b"}).exit_code, 0);
  image::ImageReader a(images / "a"), b(images / "b");
  uint64_t buf = t.info.first("buf"), pages = t.info.second("buf") / 4096;
  std::vector<char> pa(pages * 4096), pb(pages * 4096);
  a.pages(t.child.pid()).read(buf, pages, pa.data());
  b.pages(t.child.pid()).read(buf, pages, pb.data());
  EXPECT_EQ(pa, pb);
  expect_unharmed(t);
}

// A pipe with both ends in the process is restorable (format 2): recorded with its object
// and its (empty) buffer. Descriptors leading outside the tree are refused unless
// --skip-unsupported-fds: tree_dump_e2e.cc.
TEST(Dump, OwnPipeIsRecordedRestorable) {
  StateTarget t({"--pipe"});
  TempDir images;
  auto r = lazycr(
      {"dump", "--leave-running", "-t", std::to_string(t.child.pid()), "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  image::ImageReader img(images / "img");
  std::vector<const FileDescriptor*> pipes;
  for (const auto& f : img.process(t.child.pid()).fds())
    if (f.kind() == FileDescriptor::PIPE && f.fd() > 2) pipes.push_back(&f);
  ASSERT_EQ(pipes.size(), 2u);
  EXPECT_TRUE(pipes[0]->restorable() && pipes[1]->restorable());
  EXPECT_EQ(pipes[0]->object_inode(), pipes[1]->object_inode());
  EXPECT_NE(pipes[0]->file_id(), pipes[1]->file_id());
  ASSERT_EQ(img.shared().pipes_size(), 1);
  EXPECT_EQ(img.shared().pipes(0).inode(), pipes[0]->object_inode());
  EXPECT_TRUE(img.shared().pipes(0).data().empty());
  expect_unharmed(t);
}

TEST(Dump, RefusesMissingPidKernelThreadAndItself) {
  TempDir images;
  auto r = lazycr({"dump", "-t", "999999999", "-D", images / "x"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no such process"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;

  r = lazycr({"dump", "-t", "2", "-D", images / "x"});  // kthreadd
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("kernel thread"), std::string::npos) << r.err;

  r = run({"/bin/sh", "-c", "exec \"$0\" dump -t $$ -D \"$1\"", lazycr_bin(), images / "x"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("lazycr itself"), std::string::npos) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
}

TEST(Dump, RefusesAnAlreadyTracedTargetAndLeavesItAlone) {
  StateTarget t;
  ASSERT_EQ(ptrace(PTRACE_SEIZE, t.child.pid(), nullptr, nullptr), 0);
  TempDir images;
  auto r = lazycr({"dump", "-t", std::to_string(t.child.pid()), "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("already traced by pid " + std::to_string(getpid())), std::string::npos)
      << r.err;
  // The kernel detaches only a stopped tracee.
  ASSERT_EQ(ptrace(PTRACE_INTERRUPT, t.child.pid(), nullptr, nullptr), 0);
  int status = 0;
  ASSERT_EQ(waitpid(t.child.pid(), &status, __WALL), t.child.pid());
  ASSERT_EQ(ptrace(PTRACE_DETACH, t.child.pid(), nullptr, nullptr), 0);
  expect_unharmed(t);
}

TEST(Dump, RefusesAnExistingImageAndLeavesTheTargetAlone) {
  StateTarget t;
  TempDir images;
  boost::filesystem::create_directories(images / "img");
  std::ofstream(images / "img" + "/keep") << "x";
  auto r = lazycr({"dump", "-t", std::to_string(t.child.pid()), "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("not empty"), std::string::npos) << r.err;
  EXPECT_TRUE(boost::filesystem::exists(images / "img" + "/keep"));
  expect_unharmed(t);
}

// Issue 10, item 3: two dumps into one new directory both reported success and the later
// one deleted the earlier image. Dump A stops itself with its image staged; dump B commits to
// the directory meanwhile; A, resumed, must fail naming the directory, leave B's image and
// leave its own target running as it was.
TEST(Dump, TwoDumpsIntoOneNewDirectoryOneWinsTheOtherFailsByName) {
  StateTarget a({"--mib", "4"}), b({"--mib", "4"});
  TempDir images, logs;
  std::string dir = images / "img";
  std::string a_err = logs / "a.err";
  pid_t dumper = fork();
  ASSERT_GE(dumper, 0);
  if (dumper == 0) {
    int err = ::open(a_err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int null = ::open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(err, 2);
    std::string pid = std::to_string(a.child.pid());
    execl(lazycr_bin().c_str(), "lazycr", "dump", "--fault-inject", "stop-before-commit", "-t",
          pid.c_str(), "-D", dir.c_str(), nullptr);
    _exit(127);
  }
  int status = 0;
  ASSERT_EQ(waitpid(dumper, &status, WUNTRACED), dumper);
  ASSERT_TRUE(WIFSTOPPED(status)) << "dump A ended before its commit: " << slurp(a_err);

  auto r = lazycr({"dump", "-t", std::to_string(b.child.pid()), "-D", dir});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(b.child.wait(30), 128 + SIGKILL);

  ASSERT_EQ(kill(dumper, SIGCONT), 0);
  ASSERT_EQ(waitpid(dumper, &status, 0), dumper);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  std::string err = slurp(a_err);
  EXPECT_NE(err.find(dir + ": appeared during the dump"), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

  EXPECT_EQ(image::ImageReader(dir).inventory().root_pid(), b.child.pid()) << "B's image stays";
  std::vector<std::string> left;
  for (const auto& e : boost::filesystem::directory_iterator(images.path()))
    left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"img"}) << "no staging directory left";
  expect_unharmed(a);
}

// With -f the image replaces the old one in one rename (RENAME_EXCHANGE), and says what it
// replaced.
TEST(Dump, ForceSaysWhatItReplaced) {
  StateTarget a({"--mib", "4"}), b({"--mib", "4"});
  TempDir images;
  std::string dir = images / "img";
  auto r = lazycr({"dump", "--leave-running", "-t", std::to_string(a.child.pid()), "-D", dir});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("replaced"), std::string::npos) << r.err;
  r = lazycr({"dump", "-f", "--leave-running", "-t", std::to_string(b.child.pid()), "-D", dir});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find(cat_path("replaced an image of pid ", a.child.pid(), " (1 process(es))")),
            std::string::npos)
      << r.err;
  EXPECT_EQ(image::ImageReader(dir).inventory().root_pid(), b.child.pid());
  std::vector<std::string> left;
  for (const auto& e : boost::filesystem::directory_iterator(images.path()))
    left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"img"}) << "the old image is removed";
  expect_unharmed(a);
  expect_unharmed(b);
}

// A failure at any step leaves the target running exactly as it was, and no image behind.
TEST(Dump, FailureAtEachStepLeavesTheTargetIntact) {
  for (const char* step : {"freeze", "threads", "memory", "commit"}) {
    SCOPED_TRACE(step);
    StateTarget t({"--mib", "16"});
    TempDir images;
    std::string maps_before = slurp(cat_path("/proc/", t.child.pid(), "/maps"));
    auto r = lazycr({"dump", "--fault-inject", step, "-t", std::to_string(t.child.pid()), "-D",
                     images / "img"});
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find(std::string("injected fault at step ") + step), std::string::npos)
        << r.err;
    EXPECT_TRUE(boost::filesystem::is_empty(images.path())) << "no image, no staging directory";
    // No scratch page left, not traced any more, and its own checks all pass.
    EXPECT_EQ(slurp(cat_path("/proc/", t.child.pid(), "/maps")), maps_before);
    // One read: the State line's length changes between reads (sleeping/running).
    const std::string status = slurp(cat_path("/proc/", t.child.pid(), "/status"));
    EXPECT_EQ(status.find("TracerPid:\t0\n"), status.find("TracerPid:")) << status;
    expect_unharmed(t);
  }
}

TEST(Dump, TargetKilledDuringTheDumpIsACleanError) {
  StateTarget t({"--mib", "64"});
  TempDir images;
  auto r = lazycr({"dump", "--fault-inject", "kill-target", "-t", std::to_string(t.child.pid()),
                   "-D", images / "img"},
                  60);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("exited or was killed during the dump"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  EXPECT_EQ(t.child.wait(30), 128 + SIGKILL);
}

// `show` on a damaged image names the damaged file and exits non-zero with one line.
TEST(Show, NamesTheDamagedFile) {
  StateTarget t({"--mib", "4", "--pattern", "random"});
  TempDir images;
  std::string dir = images / "img";
  ASSERT_EQ(
      lazycr({"dump", "--leave-running", "-t", std::to_string(t.child.pid()), "-D", dir}).exit_code,
      0);
  expect_unharmed(t);
  std::string pid = std::to_string(t.child.pid());
  std::string pages = dir + "/pages-" + pid + ".lzp";
  std::string proc = dir + "/process-" + pid + ".pb";
  auto one_line_naming = [&](const std::vector<std::string>& args, const std::string& file) {
    auto r = lazycr(args);
    EXPECT_EQ(r.exit_code, 1) << r.out;
    EXPECT_NE(r.err.find(file), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  };
  // A flipped byte in the middle of the first data frame: found when frames are checked.
  std::string good = slurp(pages);
  std::string bad = good;
  bad[64 + 1000] = static_cast<char>(bad[64 + 1000] ^ 0x55);
  std::ofstream(pages, std::ios::binary | std::ios::trunc) << bad;
  EXPECT_EQ(lazycr({"show", dir}).exit_code, 0) << "frames are not read without --verify";
  one_line_naming({"show", "--verify", dir}, pages);
  // Truncated page store, truncated process file, missing inventory.
  std::ofstream(pages, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 2);
  one_line_naming({"show", dir}, pages);
  std::ofstream(pages, std::ios::binary | std::ios::trunc) << good;
  std::string p = slurp(proc);
  std::ofstream(proc, std::ios::binary | std::ios::trunc) << p.substr(0, p.size() - 3);
  one_line_naming({"show", "--json", dir}, proc);
  boost::filesystem::remove(dir + "/inventory.pb");
  one_line_naming({"show", dir}, dir + "/inventory.pb");
}

// Option values are checked before anything is touched: a usage error (exit 2), one line
// naming the option, and the target (here pid 1, which must never be frozen) left alone.
TEST(Dump, BadOptionsAreUsageErrors) {
  EXPECT_EQ(lazycr({"dump"}).exit_code, 2);
  EXPECT_EQ(lazycr({"dump", "--help"}).exit_code, 0);
  TempDir images;
  for (const char* size : {"5000", "5M", "8K", "5G"}) {
    auto r = lazycr({"dump", "-t", "1", "-D", images / "x", "--frame-size", size});
    EXPECT_EQ(r.exit_code, 2) << size << ": " << r.err;
    EXPECT_NE(r.err.find("lazycr: dump --frame-size"), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("must be 16K..4M and a multiple of 4K"), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  auto r = lazycr({"dump", "-t", "1", "-D", ""});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(r.err, "lazycr: dump -D: the image directory is an empty path (see --help)\n");
  r = lazycr({"restore", "-D", ""});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(r.err, "lazycr: restore -D: the image directory is an empty path (see --help)\n");
  r = lazycr({"show", ""});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
}

// pid 1: refused by what stands in the way (not permitted here, or being the init of the
// namespace), never by which /proc file could not be read.
TEST(Dump, RefusesPidOneSayingWhy) {
  TempDir images;
  auto r = lazycr({"dump", "-t", "1", "-D", images / "x"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err.find("readlink"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("Permission denied"), std::string::npos) << r.err;
  bool not_permitted = r.err.find("not permitted to dump pid 1 (") != std::string::npos;
  bool init =
      r.err.find("pid 1 is the init process of lazycr's PID namespace") != std::string::npos;
  EXPECT_TRUE(not_permitted || init) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
}

// Ctrl-C, SIGTERM, SIGHUP or SIGQUIT at any step, including while a thread of the target runs
// an injected call (a dying lazycr would leave it parked in that call's trap, and the SIGTRAP
// would kill it): the dump rolls back, exits 128+N with one line, and leaves no staging
// directory; the target runs on exactly as before.
TEST(Dump, InterruptAtEachStepLeavesTheTargetIntact) {
  const std::pair<const char*, int> cases[] = {
      {"freeze", SIGINT},   {"injected", SIGINT}, {"injected", SIGTERM},
      {"injected", SIGHUP}, {"threads", SIGTERM}, {"files", SIGHUP},
      {"memory", SIGINT},   {"memory", SIGQUIT},  {"commit", SIGTERM}};
  for (const auto& [step, sig] : cases) {
    std::string fault = cat_path(step, ":SIG", sigabbrev_np(sig));
    SCOPED_TRACE(fault);
    StateTarget t({"--mib", "16"});
    TempDir images;
    std::string maps_before = slurp(cat_path("/proc/", t.child.pid(), "/maps"));
    auto r = lazycr({"dump", "--fault-inject", fault, "-t", std::to_string(t.child.pid()), "-D",
                     images / "img"});
    EXPECT_EQ(r.exit_code, 128 + sig) << r.err;
    EXPECT_EQ(r.err, cat_path("lazycr: dump interrupted by SIG", sigabbrev_np(sig), "; pid ",
                              t.child.pid(), " left running as it was\n"));
    EXPECT_TRUE(boost::filesystem::is_empty(images.path())) << "no image, no staging directory";
    ASSERT_TRUE(t.child.running()) << "the target was killed";
    EXPECT_EQ(slurp(cat_path("/proc/", t.child.pid(), "/maps")), maps_before);
    EXPECT_NE(slurp(cat_path("/proc/", t.child.pid(), "/status")).find("TracerPid:\t0\n"),
              std::string::npos);
    expect_unharmed(t);
  }
}

// Issue 10 item 13, beyond descriptors: a dump that kills its target refuses first when the
// restore would refuse the image (here a SysV shared memory segment attached read-only; a
// mapped file deleted since is stored as a ghost and does not stop it), and the target runs
// on; with --leave-running the image is written with a warning, and the restore refuses it
// with the same reason.
TEST(Dump, NeverKillsIntoAnImageTheRestoreRefuses) {
  TempDir work;
  Child py({"/usr/bin/python3", "-c",
            "import ctypes, mmap, os, sys, time\n"
            "path = sys.argv[1] + '/mapped'\n"
            "with open(path, 'wb') as f: f.write(b'x' * 4096)\n"
            "f = open(path, 'rb')\n"
            "m = mmap.mmap(f.fileno(), 4096, mmap.MAP_PRIVATE, mmap.PROT_READ)\n"
            "f.close(); os.unlink(path)\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.shmat.restype = ctypes.c_void_p\n"
            "shm = libc.shmget(0, 4096, 0o1600)\n"
            "addr = libc.shmat(shm, None, 0o10000)\n"  // SHM_RDONLY
            "libc.shmctl(shm, 0, None)\n"              // IPC_RMID: gone once detached
            "print('ready', flush=True)\n"
            "time.sleep(100000)\n",
            work.path()});
  py.wait_for("ready");
  std::string pid = std::to_string(py.pid());
  TempDir images;
  auto r = lazycr({"dump", "--skip-unsupported-fds", "-t", pid, "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("the restore would refuse this image, so the tree is left running: pid " +
                       pid + " (python3): "),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find(work / "mapped"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("attached read-only (SHM_RDONLY)"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  ASSERT_TRUE(py.running()) << "killed into an image the restore refuses";

  r = lazycr(
      {"dump", "--leave-running", "--skip-unsupported-fds", "-t", pid, "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("lazycr: warning: the restore will refuse this image: pid " + pid),
            std::string::npos)
      << r.err;
  std::string refused_by_dump = r.err;
  r = lazycr({"restore", "--pidns", "--shell-job", "--skip-unsupported-fds", "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  // The restore names the first reason; the dump had named it too.
  std::string prefix = "lazycr: restore: validate for pid " + pid + ": ";
  ASSERT_NE(r.err.find(prefix), std::string::npos) << r.err;
  std::string reason = r.err.substr(r.err.find(prefix) + prefix.size());
  reason.pop_back();  // '\n'
  EXPECT_NE(refused_by_dump.find(reason), std::string::npos) << reason << " vs " << refused_by_dump;
}

// A program holding one descriptor of each kind lazycr cannot restore yet. Once it finds the
// go file it checks that each of them is /dev/null with the access mode, status flags and
// close-on-exec flag it had, and that the dup is still a dup.
constexpr const char kUnsupportedFdsScript[] = R"(
import ctypes, fcntl, os, select, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
go = sys.argv[1]
fds = {}
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()
tcp = socket.create_connection(srv.getsockname()); tcp_peer, _ = srv.accept()
tcp_port = srv.getsockname()[1]; srv.close()
fds['tcp'] = tcp.fileno()
fds['tcp_peer'] = tcp_peer.fileno()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(('127.0.0.1', 0))
udp.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
fds['udp'] = udp.fileno()
fds['udp_dup'] = os.dup(udp.fileno())
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE); nl.bind((0, 0))
fds['netlink'] = nl.fileno()
ul = socket.socket(socket.AF_UNIX); ul.bind('\0lazycr-unsupported-%d' % os.getpid()); ul.listen()
gone = socket.socket(socket.AF_UNIX); gone.connect('\0lazycr-unsupported-%d' % os.getpid())
gone.close()  # a connection not accepted yet whose client end is gone: not restorable
fds['unix_listen'] = ul.fileno()
keep = [tcp, tcp_peer, udp, nl, ul]
want = {}
for k, fd in fds.items():
    assert fd > 2, (k, fd)
    want[k] = (fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND),
               fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
print('ready', ' '.join('%s=%d' % kv for kv in fds.items()),
      'tcp_port=%d' % tcp_port, 'udp_port=%d' % udp.getsockname()[1], flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
bad = []
for k, fd in fds.items():
    try:
        target = os.readlink('/proc/self/fd/%d' % fd)
        got = (fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND),
               fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    except OSError as e:
        bad.append('%s: %s' % (k, e)); continue
    if target != '/dev/null' or got != want[k]:
        bad.append('%s: %s %s, wanted /dev/null %s' % (k, target, got, want[k]))
fcntl.fcntl(fds['udp'], fcntl.F_SETFL, os.O_NONBLOCK)
if not fcntl.fcntl(fds['udp_dup'], fcntl.F_GETFL) & os.O_NONBLOCK:
    bad.append('udp_dup is not a dup of udp')
print('verified ok' if not bad else 'BAD ' + '; '.join(bad), flush=True)
)";

// Issue 10 items 13 and 15: every descriptor lazycr cannot restore is named in one refusal,
// sockets by family, type and address; with --skip-unsupported-fds the dump (which kills the
// program) makes an image that `restore --skip-unsupported-fds` brings back, /dev/null standing
// in for each of them; without that flag the restore names them all and the way out.
TEST(Dump, UnsupportedDescriptorsAreAllNamedAndComeBackAsDevNull) {
  TempDir work;
  std::string go = work / "go";
  Child py({"/usr/bin/python3", "-c", kUnsupportedFdsScript, go});
  TargetInfo info = TargetInfo::parse(py.wait_for("ready"));
  std::string pid = std::to_string(py.pid());
  TempDir images;
  auto r = lazycr({"dump", "-t", pid, "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const auto& [key, value] : info.kv)
    if (key.find("port") == std::string::npos) {
      EXPECT_NE(r.err.find("fd " + value + " is "), std::string::npos) << key << ": " << r.err;
    }
  EXPECT_NE(r.err.find("cannot dump 6 descriptors lazycr cannot restore: pid " + pid),
            std::string::npos)
      << r.err;
  // TCP listeners and UDP sockets are restorable (objects/inet_socket.h); an established
  // connection and an option lazycr does not restore yet are not.
  EXPECT_NE(r.err.find("TCP/IPv4 connection 127.0.0.1:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(" <-> 127.0.0.1:" + info.str("tcp_port") + " (socket:["), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("is established: checkpointing it needs --tcp-established"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("UDP/IPv4 socket 127.0.0.1:" + info.str("udp_port") +
                       " has IP_PKTINFO set, which lazycr does not restore yet"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("is a netlink socket (NETLINK_ROUTE"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("not an AF_UNIX socket"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("'lazycr restore --skip-unsupported-fds' opens /dev/null"),
            std::string::npos)
      << r.err;
  EXPECT_TRUE(boost::filesystem::is_empty(images.path()));
  ASSERT_TRUE(py.running());

  // Killed into the image: the image must come back.
  r = lazycr({"dump", "--skip-unsupported-fds", "-t", pid, "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(py.wait(30), 128 + SIGKILL);
  std::ofstream(go) << "go";

  r = lazycr({"restore", "--shell-job", "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const auto& [key, value] : info.kv)
    if (key.find("port") == std::string::npos) {
      EXPECT_NE(r.err.find("fd " + value + " is "), std::string::npos) << key << ": " << r.err;
    }
  EXPECT_NE(r.err.find("--skip-unsupported-fds opens /dev/null in their places"), std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("pid " + pid + ": pid " + pid), std::string::npos) << r.err;

  r = lazycr({"restore", "--shell-job", "--skip-unsupported-fds", "-D", images / "img"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "verified ok\n") << r.err;
  EXPECT_NE(r.err.find("lazycr: warning: --skip-unsupported-fds: /dev/null stands in for fd "),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("fd " + info.str("tcp") + " (SOCKET socket:["), std::string::npos) << r.err;
}

TEST(Dump, Python3HoldingALargeList) {
  Child py({"/usr/bin/python3", "-c",
            "import sys, time\n"
            "data = [i * 7 for i in range(3_000_000)]\n"
            "print('ready', len(data), flush=True)\n"
            "time.sleep(100000)\n"});
  std::string ready = py.wait_for("ready");
  ASSERT_EQ(ready, "ready 3000000");
  TempDir images;
  auto r = lazycr({"dump", "-t", std::to_string(py.pid()), "-D", images / "img"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(py.wait(30), 128 + SIGKILL);
  image::ImageReader img(images / "img");
  const auto& p = img.process(py.pid());
  EXPECT_EQ(p.comm(), "python3");
  // 3 M ints (28-32 bytes each) plus the list's 24 MB of pointers: well over 100 MB.
  EXPECT_GT(img.pages(py.pid()).index().data_pages() * 4096, 100ull << 20);
  auto show = lazycr({"show", images / "img"});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_NE(show.out.find("python3"), std::string::npos);
}

}  // namespace
}  // namespace lazycr::test
