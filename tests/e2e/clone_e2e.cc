// Clones of a held template (issue 13) against the real kernel: a multi-threaded target with a
// large memory pattern is dumped once, held by `lazycr template`, and cloned many times; every
// clone verifies every byte, its PID and its TIDs from inside, on its own (clone_target.c).
// - the clones share the template's memory: total PSS of template + clones stays within 1.3x
//   of one copy while they only read;
// - one clone rewriting all its memory changes nothing the others see;
// - the template's memory is collapsed into huge pages without changing its VmFlags, and a
//   clone's first write to one copies 4 KiB, not 2 MiB;
// - files, pipes, eventfds, epoll sets, timerfds, signalfds, socket pairs and TCP listeners
//   are made afresh per clone (own position, own buffered data, own count), each clone in its
//   own network namespace with --netns; MADV_WIPEONFORK memory reads zero in a clone;
// - python3 with a large dict, and node's http server (MADV_DONTFORK memory) cloned 10 times
//   with --netns;
// - nginx (master and nobody's workers sharing shared anonymous memory) with --netns;
// - clone --shell-job gives the clone the command's stdout;
// - a clone killed leaves the others running; the template's exit leaves the clones running;
// - a foreground clone exits with the clone's status;
// - a deleted file is each clone's own copy, recreated from the image's contents;
// - template --netns: the template and the clones without clone --netns in one fresh network
//   namespace, clone --netns in one of its own;
// - bad requests (no template, damaged image, a socket path owned by another user, a port
//   taken without --netns) fail with one line and leave nothing behind;
// - another user's process (uids, gids, groups, capabilities in two threads) is cloned with its
//   credentials, though the template must keep lazycr's to make clones;
// - a tree with zombies and a process of another user: each clone has the zombies (their
//   parents reap them with their status) and that process's credentials;
// - a tree (root + 2 children, one sharing the root's pages, a pipe between them) cloned
//   several times: every process of every clone checks its pids and bytes from inside, the
//   pipe is each clone's own, the shared pages stay shared, shared anonymous memory is one
//   object in each clone and another in the next, killing one clone leaves the others and the
//   template running (clone_tree_target.c).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/nginx_setup.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {
namespace {

constexpr int kMiB = 256;

int clone_count() {
  const char* n = std::getenv("LAZYCR_CLONE_E2E_CLONES");
  return n ? std::atoi(n) : 20;
}

std::string ns_id(pid_t pid) {
  auto link = std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/ns/pid").string();
  auto lb = link.find('['), rb = link.find(']');
  return link.substr(lb + 1, rb - lb - 1);
}

// NSpid of /proc/PID/status without its leading whitespace ("outer\tinner").
std::string nspid(pid_t pid) {
  std::string v = status_field(pid, "NSpid");
  return v.substr(std::min(v.size(), v.find_first_not_of(" \t")));
}

uint64_t rollup_kb(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return std::stoull(line.substr(key.size() + 1));
  ADD_FAILURE() << "no " << key << " in smaps_rollup of pid " << pid;
  return 0;
}

// The image, made once for the whole suite.
class CloneE2E : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    work_ = new TempDir();
    image_ = *work_ / "image";
    std::filesystem::create_directory(image_);
    files_ = *work_ / "files";
    std::filesystem::create_directory(files_);
    Child target({target_bin("clone_target"), files_, std::to_string(kMiB)});
    std::string ready = target.wait_for("ready", 600);
    ASSERT_FALSE(ready.empty());
    info_ = new TargetInfo(TargetInfo::parse(ready));
    auto r = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", image_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(target.wait(60), 128 + SIGKILL);
  }
  static void TearDownTestSuite() {
    delete info_;
    delete work_;
  }

  void SetUp() override { socket_ = "/tmp/clone-e2e-" + std::to_string(getpid()) + ".sock"; }
  void TearDown() override {
    if (template_ > 0 && proc::exists(template_)) {
      send_signal(template_, SIGTERM);
      reap(template_);
    }
    for (pid_t p : clones_)
      if (proc::exists(p)) send_signal(p, SIGKILL);
    for (pid_t p : clones_) {
      int status;
      waitpid(p, &status, 0);  // ours once the template has exited (subreaper)
    }
    // The namespaces' reapers end with their clones.
    for (pid_t c : proc::list_children(getpid())) {
      int status;
      waitpid(c, &status, 0);
    }
    unlink(socket_.c_str());
  }

  // `lazycr template -D image -d` and `extra` (the suite's image by default); its pid in
  // template_. Call it inside ASSERT_NO_FATAL_FAILURE.
  void start_template(const std::string& image = "", const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args{"template", "-D",    image.empty() ? image_ : image,
                                  "--socket", socket_, "-d"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = lazycr(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    template_ = std::atoi(r.out.c_str());
    ASSERT_GT(template_, 0) << r.out;
    struct stat st;
    ASSERT_EQ(stat(socket_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }
  pid_t start_clone(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args{"clone", "--socket", socket_, "-d"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = lazycr(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    pid_t pid = std::atoi(r.out.c_str());
    EXPECT_GT(pid, 0) << r.out;
    if (pid > 0) clones_.push_back(pid);
    return pid;
  }
  // Sends a command to the clone `pid` and returns its answer.
  std::string ask(pid_t pid, const std::string& cmd) {
    if (!proc::exists(pid)) return "pid " + std::to_string(pid) + " is gone";
    const std::string id = ns_id(pid);
    { std::ofstream(files_ + "/cmd-" + id + ".tmp") << cmd; }
    std::filesystem::rename(files_ + "/cmd-" + id + ".tmp", files_ + "/cmd-" + id);
    const std::string res = files_ + "/res-" + id;
    for (int i = 0; i < 24000; i++) {
      const bool gone = !proc::exists(pid);  // its answer may be there all the same
      std::ifstream in(res);
      std::string line;
      if (in && std::getline(in, line)) {
        std::filesystem::remove(res);
        return line;
      }
      if (gone) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return "no answer from pid " + std::to_string(pid) +
           (proc::exists(pid) ? " within 120 s" : ": it is gone");
  }
  pid_t image_pid() const { return static_cast<pid_t>(info_->first("pid")); }

  static TempDir* work_;
  static std::string image_, files_;
  static TargetInfo* info_;
  std::string socket_;
  pid_t template_ = 0;
  std::vector<pid_t> clones_;
};
TempDir* CloneE2E::work_ = nullptr;
std::string CloneE2E::image_, CloneE2E::files_;
TargetInfo* CloneE2E::info_ = nullptr;

TEST_F(CloneE2E, ManyClonesShareMemoryAndStayApart) {
  ASSERT_NO_FATAL_FAILURE(start_template());
  const int n = clone_count();
  std::vector<pid_t> pids;
  for (int i = 0; i < n; i++) {
    pid_t p = start_clone(i == 0 ? std::vector<std::string>{"--stats", files_ + "/stats.json"}
                                 : std::vector<std::string>{});
    ASSERT_GT(p, 0);
    pids.push_back(p);
  }
  std::string stats = proc::read_file(files_ + "/stats.json");
  EXPECT_NE(stats.find("request_to_first_instruction_ns"), std::string::npos) << stats;
  for (pid_t p : pids) {
    EXPECT_EQ(ask(p, "verify").rfind("ok verified", 0), 0u) << "clone " << p;
    // Inside its own namespace, with the image's pid (checked from inside too).
    EXPECT_NE(ns_id(p), ns_id(getpid()));
    EXPECT_EQ(nspid(p), std::to_string(p) + "\t" + std::to_string(image_pid()));
  }
  // The template holds the held process (its child): one copy's worth of memory.
  pid_t held = 0;
  for (pid_t c : proc::list_children(template_))
    if (ns_id(c) == ns_id(getpid()) && nspid(c) == std::to_string(image_pid())) held = c;
  ASSERT_GT(held, 0) << "no held process with pid " << image_pid();
  const uint64_t one_copy = rollup_kb(held, "Rss");
  EXPECT_GE(one_copy, uint64_t{kMiB} * 1024);
  uint64_t pss = rollup_kb(held, "Pss");
  for (pid_t p : pids) pss += rollup_kb(p, "Pss");
  std::printf("PSS of template + %d clones: %llu kB; one copy (template RSS): %llu kB\n", n,
              static_cast<unsigned long long>(pss), static_cast<unsigned long long>(one_copy));
  EXPECT_LE(pss, one_copy * 13 / 10)
      << "PSS of template + " << n << " clones: " << pss << " kB; one copy: " << one_copy << " kB";

  // The template's memory is collapsed into huge pages where the kernel allows it (printed:
  // not every machine gives huge pages); the areas' VmFlags stay the image's (no "hg": the
  // target never asked for MADV_HUGEPAGE), in the template and in the clones.
  std::printf("AnonHugePages: template %llu kB, clone %llu kB\n",
              static_cast<unsigned long long>(rollup_kb(held, "AnonHugePages")),
              static_cast<unsigned long long>(rollup_kb(pids[0], "AnonHugePages")));
  for (pid_t p : {held, pids[0]}) {
    std::ifstream smaps("/proc/" + std::to_string(p) + "/smaps");
    std::string line;
    while (std::getline(smaps, line))
      if (line.rfind("VmFlags:", 0) == 0) {
        EXPECT_EQ((line + " ").find(" hg "), std::string::npos) << "pid " << p << ": " << line;
      }
  }
  // A clone's first write to a huge page copies one 4 KiB page, not 2 MiB (the kernel splits
  // the huge page on copy-on-write): one write per 2 MiB dirties a few MiB at most.
  const uint64_t dirty_before = rollup_kb(pids[4], "Private_Dirty");
  EXPECT_EQ(ask(pids[4], "touch").rfind("ok verified", 0), 0u);
  const uint64_t dirtied = rollup_kb(pids[4], "Private_Dirty") - dirty_before;
  std::printf("one write per 2 MiB of %d MiB dirtied %llu kB\n", kMiB,
              static_cast<unsigned long long>(dirtied));
  EXPECT_LT(dirtied, uint64_t{kMiB} * 1024 / 8);

  // One clone rewrites all its memory; the others see nothing of it.
  EXPECT_EQ(ask(pids[0], "write 7").rfind("ok verified", 0), 0u);
  for (size_t i = 1; i < pids.size(); i++)
    EXPECT_EQ(ask(pids[i], "verify").rfind("ok verified", 0), 0u) << "clone " << pids[i];

  // Each its own file description and pipe.
  for (pid_t p : pids) {
    EXPECT_EQ(ask(p, "file").rfind("ok", 0), 0u) << "clone " << p;
    EXPECT_EQ(ask(p, "pipe"), "ok pipe") << "clone " << p;
  }

  // A clone killed leaves the others running.
  ASSERT_TRUE(send_signal(pids[1], SIGKILL));
  for (int i = 0; i < 1000 && proc::exists(pids[1]); i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(proc::exists(pids[1]));
  EXPECT_EQ(ask(pids[2], "verify").rfind("ok verified", 0), 0u);
  pid_t later = start_clone();
  EXPECT_EQ(ask(later, "verify").rfind("ok verified", 0), 0u);

  // The template's exit leaves the clones running.
  auto r = lazycr({"clone", "--socket", socket_, "--stop"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(reap(template_), 0);
  EXPECT_FALSE(proc::exists(held));
  EXPECT_EQ(ask(pids[3], "verify").rfind("ok verified", 0), 0u);
  struct stat st;
  EXPECT_NE(stat(socket_.c_str(), &st), 0) << "the socket outlived the template";
}

TEST_F(CloneE2E, ForegroundCloneExitsWithItsStatus) {
  ASSERT_NO_FATAL_FAILURE(start_template());
  Child fg({lazycr_bin(), "clone", "--socket", socket_, "--pidfile", files_ + "/fg.pid"});
  pid_t pid = 0;
  for (int i = 0; i < 6000 && pid == 0; i++) {
    auto text = proc::try_read_file(files_ + "/fg.pid");
    if (text)
      pid = std::atoi(text->c_str());
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GT(pid, 0);
  clones_.push_back(pid);
  EXPECT_EQ(ask(pid, "verify").rfind("ok verified", 0), 0u);
  EXPECT_EQ(ask(pid, "exit 7"), "ok exiting");
  EXPECT_EQ(fg.wait(60), 7);
}

TEST_F(CloneE2E, BadRequestsFailWithOneLineAndLeaveNothing) {
  // No template at the socket.
  auto r = lazycr({"clone", "--socket", socket_});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("no template answers at " + socket_), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

  // A damaged image.
  TempDir bad;
  for (const auto& e : std::filesystem::directory_iterator(image_))
    std::filesystem::copy(e.path(), bad / e.path().filename().string());
  std::string proc_file = bad / ("process-" + std::to_string(image_pid()) + ".pb");
  ASSERT_TRUE(std::filesystem::exists(proc_file));
  std::filesystem::resize_file(proc_file, std::filesystem::file_size(proc_file) / 2);
  r = lazycr({"template", "-D", bad.path(), "--socket", socket_, "-d"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  struct stat st;
  EXPECT_NE(stat(socket_.c_str(), &st), 0) << "socket left behind";
  expect_nothing_left(image_pid());

  // A socket path owned by another user.
  {
    int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, socket_.c_str(), sizeof a.sun_path - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    close(fd);
    ASSERT_EQ(chown(socket_.c_str(), 65534, 65534), 0);
  }
  r = lazycr({"template", "-D", image_, "--socket", socket_, "-d"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("owned by uid 65534"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  expect_nothing_left(image_pid());
}

// Clones of a process tree: the root forked from the template, the children made in the clone.
TEST_F(CloneE2E, TreeClonesAreEachTheirOwn) {
  constexpr int kTreeMiB = 16;
  TempDir tree;
  const std::string image = tree / "image", files = tree / "files";
  std::filesystem::create_directory(image);
  std::filesystem::create_directory(files);
  Child target({target_bin("clone_tree_target"), files, std::to_string(kTreeMiB)});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready", 120));
  const pid_t root = static_cast<pid_t>(info.first("pid"));
  const pid_t a = static_cast<pid_t>(info.first("a")), b = static_cast<pid_t>(info.first("b"));
  ASSERT_GT(root, 0);
  auto d = lazycr({"dump", "-t", std::to_string(root), "-D", image});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  target.wait(60);
  for (pid_t c : proc::list_children(getpid())) {  // its children, re-parented to us
    int status;
    waitpid(c, &status, 0);
  }
  ASSERT_NO_FATAL_FAILURE(start_template(image));

  // Every process of the clone whose root is `p` verifies itself; answers by role.
  auto verify = [&](pid_t p) {
    std::map<char, std::string> out;
    if (!proc::exists(p)) return out;
    const std::string id = ns_id(p);
    for (char role : {'r', 'a', 'b'}) {
      const std::string cmd = files + "/cmd-" + id + "-" + role;
      { std::ofstream(cmd + ".tmp") << "verify"; }
      std::filesystem::rename(cmd + ".tmp", cmd);
    }
    for (char role : {'r', 'a', 'b'}) {
      const std::string res = files + "/res-" + id + "-" + role;
      for (int i = 0; i < 24000 && out[role].empty(); i++) {
        if (!proc::exists(p)) break;  // the clone is gone: no answer will come
        std::ifstream in(res);
        std::string line;
        if (in && std::getline(in, line)) {
          std::filesystem::remove(res);
          out[role] = line;
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
    }
    return out;
  };
  auto pipe_of = [](const std::string& answer) {
    auto at = answer.find("pipe=");
    return at == std::string::npos ? std::string() : answer.substr(at + 5);
  };
  // The processes of the clone `p` other than its root, by image pid.
  auto children_of = [](pid_t p) {
    std::map<pid_t, pid_t> out;
    std::istringstream in(
        proc::read_file("/proc/" + std::to_string(p) + "/task/" + std::to_string(p) + "/children"));
    pid_t c;
    while (in >> c) {
      std::string ns = nspid(c);
      out[std::atoi(ns.substr(ns.find_last_of('\t') + 1).c_str())] = c;
    }
    return out;
  };

  const int n = 4;
  std::vector<pid_t> clones;
  for (int i = 0; i < n; i++) {
    pid_t p = start_clone();
    ASSERT_GT(p, 0);
    clones.push_back(p);
  }
  std::set<std::string> pipes;
  for (pid_t p : clones) {
    auto ans = verify(p);
    EXPECT_EQ(ans['r'].rfind("ok pid=" + std::to_string(root), 0), 0u)
        << "clone " << p << ": " << ans['r'];
    EXPECT_EQ(ans['a'].rfind("ok pid=" + std::to_string(a) + " ppid=" + std::to_string(root), 0),
              0u)
        << "clone " << p << ": " << ans['a'];
    EXPECT_EQ(ans['b'].rfind("ok pid=" + std::to_string(b) + " ppid=" + std::to_string(root), 0),
              0u)
        << "clone " << p << ": " << ans['b'];
    // One pipe between the clone's root and A, no other clone's.
    EXPECT_EQ(pipe_of(ans['r']), pipe_of(ans['a'])) << "clone " << p;
    EXPECT_TRUE(pipes.insert(pipe_of(ans['r'])).second) << "clone " << p << " shares its pipe";
    EXPECT_EQ(nspid(p), std::to_string(p) + "\t" + std::to_string(root));
    auto kids = children_of(p);
    ASSERT_EQ(kids.size(), 2u) << "clone " << p;
    ASSERT_TRUE(kids.count(a) && kids.count(b)) << "clone " << p;
    // A never wrote its pages: they stay shared with the clone's root (and the template).
    const uint64_t a_private =
        rollup_kb(kids[a], "Private_Dirty") + rollup_kb(kids[a], "Private_Clean");
    EXPECT_LT(a_private, uint64_t{kTreeMiB} * 1024 / 4) << "clone " << p << ": A's private memory";
  }

  // Killing one clone's root ends that clone (its namespace) and nothing else.
  auto victims = children_of(clones[1]);
  ASSERT_TRUE(send_signal(clones[1], SIGKILL));
  for (int i = 0; i < 2000 &&
                  (proc::exists(clones[1]) || proc::exists(victims[a]) || proc::exists(victims[b]));
       i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_FALSE(proc::exists(victims[a]));
  EXPECT_FALSE(proc::exists(victims[b]));
  EXPECT_TRUE(proc::exists(template_));
  for (size_t i = 0; i < clones.size(); i++) {
    if (i == 1) continue;
    auto ans = verify(clones[i]);
    for (char role : {'r', 'a', 'b'})
      EXPECT_EQ(ans[role].rfind("ok", 0), 0u)
          << "clone " << clones[i] << " " << role << ": " << ans[role];
  }
  pid_t later = start_clone();
  auto ans = verify(later);
  for (char role : {'r', 'a', 'b'})
    EXPECT_EQ(ans[role].rfind("ok", 0), 0u) << "a later clone " << role << ": " << ans[role];
}

// Another user's process: the template keeps lazycr's credentials (it must make each clone in a
// new PID namespace: setns and clone3 with set_tid need privileges), each clone gets the image's
// as its last step, checked through /proc and by the process itself in both threads.
TEST_F(CloneE2E, AnotherUsersProcessIsClonedWithItsCredentials) {
  TempDir dir;
  Child target({target_bin("creds_target")});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready"));
  std::map<std::string, std::string> before;
  for (const char* key :
       {"Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"})
    before[key] = status_field(target.pid(), key);
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", dir / "image"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(dir / "image", {"--shell-job"}));
  for (int i = 0; i < 2; i++) {
    const std::string pidfile = dir / ("clone" + std::to_string(i) + ".pid");
    Child c({lazycr_bin(), "clone", "--socket", socket_, "--shell-job", "--pidfile", pidfile});
    const pid_t pid = wait_for_pidfile(c, pidfile);
    ASSERT_GT(pid, 0);
    for (const auto& [key, value] : before)
      EXPECT_EQ(status_field(pid, key), value) << "clone " << i << ": " << key;
    const auto tasks = proc::list_tasks(pid);
    EXPECT_EQ(tasks.size(), info.list("tids").size());
    for (pid_t tid : tasks)
      EXPECT_NE(proc::read_file("/proc/" + std::to_string(pid) + "/task/" + std::to_string(tid) +
                                "/status")
                    .find("Uid:" + before["Uid"]),
                std::string::npos)
          << "clone " << i << " thread " << tid;
    ASSERT_TRUE(send_signal(pid, SIGUSR1));
    EXPECT_EQ(c.read_line(), "verified ok") << "clone " << i;
    EXPECT_EQ(c.wait(60), 0) << "clone " << i;
  }
}

// A tree with zombies (one exited with 42, one killed by SIGTERM, under the root and under A)
// and a process of another user (A, uid 65534, which is also the parent of A1 and of a zombie):
// in each clone every live process checks its pids, groups, ids and bytes from inside and its
// zombie children's wait statuses; the root's exit status is the tree's verdict.
TEST_F(CloneE2E, TreeWithZombiesAndAnotherUsersProcessIsCloned) {
  TempDir dir;
  std::filesystem::permissions(dir.path(), std::filesystem::perms::owner_all |
                                               std::filesystem::perms::group_exec |
                                               std::filesystem::perms::others_exec);
  const std::string verify = dir / "verify";
  Child target({target_bin("tree_target"), "--mode", "zombie", "--verify-file", verify, "--workdir",
                dir.path(), "--mib", "4", "--nobody", "A", "--setsid"});
  TargetInfo info = TargetInfo::parse(target.wait_for("ready", 120));
  auto d = lazycr({"dump", "-t", std::to_string(info.first("pid")), "-D", dir / "image"});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  target.wait(60);
  for (pid_t c : proc::list_children(getpid())) {  // its children, re-parented to us
    int status;
    waitpid(c, &status, 0);
  }
  ASSERT_NO_FATAL_FAILURE(start_template(dir / "image", {"--shell-job"}));
  for (int i = 0; i < 2; i++) {
    const std::string pidfile = dir / ("clone" + std::to_string(i) + ".pid");
    Child c({lazycr_bin(), "clone", "--socket", socket_, "--shell-job", "--pidfile", pidfile});
    ASSERT_GT(wait_for_pidfile(c, pidfile), 0);
    // The first clone waits for the request; the second finds it there and verifies at once.
    if (i == 0) std::ofstream(verify).put('\n');
    std::vector<std::string> verdicts;
    for (int k = 0; k < 3; k++) verdicts.push_back(c.wait_for("VERIFY", 60));
    for (const char* role : {"R", "A", "A1"})
      EXPECT_EQ(std::count_if(verdicts.begin(), verdicts.end(),
                              [&](const std::string& v) {
                                return v.rfind(std::string("VERIFY ") + role + " ", 0) == 0 &&
                                       v.size() > 3 && v.compare(v.size() - 3, 3, " ok") == 0;
                              }),
                1)
          << "clone " << i << " " << role << ": " << ::testing::PrintToString(verdicts);
    EXPECT_EQ(c.wait(60), 0) << "clone " << i;
  }
}

// Kernel objects made afresh per clone: eventfd, epoll set, timerfd, signalfd, socketpair with
// its data, a TCP listener (each clone in its own network namespace, all on the same port), and
// MADV_WIPEONFORK memory zeroed as a fork zeroes it. Each clone checks its own from inside.
TEST_F(CloneE2E, KernelObjectsAndSocketsAreEachClonesOwn) {
  TempDir kinds;
  const std::string img = kinds / "image";
  std::filesystem::create_directory(img);
  const int port = 24301;
  Child target({target_bin("clone_target"), kinds.path(), "8", "kinds", std::to_string(port)});
  TargetInfo t = TargetInfo::parse(target.wait_for("ready", 120));
  ASSERT_GT(t.first("pid"), 0);
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(60), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(img));
  const std::string saved_files = files_;
  files_ = kinds.path();  // where this target takes commands
  std::vector<pid_t> pids;
  for (int i = 0; i < 3; i++) {
    pid_t p = start_clone({"--netns"});
    ASSERT_GT(p, 0);
    pids.push_back(p);
  }
  for (pid_t p : pids) {
    EXPECT_EQ(ask(p, "kinds"), "ok kinds") << "clone " << p;
    EXPECT_EQ(ask(p, "pipe"), "ok pipe") << "clone " << p;
    EXPECT_EQ(ask(p, "verify").rfind("ok verified", 0), 0u) << "clone " << p;
    EXPECT_NE(std::filesystem::read_symlink("/proc/" + std::to_string(p) + "/ns/net"),
              std::filesystem::read_symlink("/proc/self/ns/net"));
  }
  // Without --netns the port is the template's (it holds the listener in this namespace): the
  // request fails with one line and leaves no clone behind.
  // (The template's other children are namespace reapers, one made ahead for the next clone.)
  auto targets = [&] {
    size_t n = 0;
    for (pid_t c : proc::list_children(template_)) {
      std::error_code ec;
      auto exe = std::filesystem::read_symlink("/proc/" + std::to_string(c) + "/exe", ec);
      n += exe.string().find("clone_target") != std::string::npos;
    }
    return n;
  };
  const size_t before = targets();
  EXPECT_EQ(before, 4u);
  auto r = lazycr({"clone", "--socket", socket_, "-d"});
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.err.find("EADDRINUSE"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_EQ(targets(), before);
  files_ = saved_files;
}

// A deleted file: each clone gets its own copy made from the image's contents (a file shared
// between clones would hold another clone's id once that clone appended it).
TEST_F(CloneE2E, DeletedFileIsEachClonesOwn) {
  TempDir del;
  const std::string img = del / "image";
  std::filesystem::create_directory(img);
  Child target({target_bin("clone_target"), del.path(), "4", "deleted"});
  TargetInfo t = TargetInfo::parse(target.wait_for("ready", 120));
  ASSERT_GT(t.first("pid"), 0);
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(60), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(img));
  const std::string saved_files = files_;
  files_ = del.path();
  std::vector<pid_t> pids;
  for (int i = 0; i < 3; i++) {
    pid_t p = start_clone();
    ASSERT_GT(p, 0);
    pids.push_back(p);
  }
  for (pid_t p : pids) EXPECT_EQ(ask(p, "deleted"), "ok deleted file") << "clone " << p;
  for (pid_t p : pids) EXPECT_EQ(ask(p, "verify").rfind("ok verified", 0), 0u) << "clone " << p;
  EXPECT_FALSE(std::filesystem::exists(del / "deleted.txt"));
  files_ = saved_files;
}

std::string net_ns(pid_t pid) {
  return std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/ns/net").string();
}

// template --netns: the template sits in a fresh network namespace; a clone stays in it unless
// clone --netns gives it one of its own.
TEST_F(CloneE2E, TemplateNetnsIsInheritedUnlessCloneNetns) {
  ASSERT_NO_FATAL_FAILURE(start_template(image_, {"--netns"}));
  ASSERT_GT(template_, 0);
  pid_t tpl_proc = 0;  // the held process: the template's child running clone_target
  for (pid_t c : proc::list_children(template_)) {
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/" + std::to_string(c) + "/exe", ec);
    if (exe.string().find("clone_target") != std::string::npos) tpl_proc = c;
  }
  ASSERT_GT(tpl_proc, 0);
  const std::string mine = net_ns(getpid());
  const std::string held = net_ns(tpl_proc);
  EXPECT_NE(held, mine);
  EXPECT_EQ(net_ns(template_), mine);  // lazycr itself stays where it was
  pid_t a = start_clone(), b = start_clone(), c = start_clone({"--netns"});
  ASSERT_GT(a, 0);
  ASSERT_GT(b, 0);
  ASSERT_GT(c, 0);
  EXPECT_EQ(net_ns(a), held);
  EXPECT_EQ(net_ns(b), held);
  EXPECT_NE(net_ns(c), held);
  EXPECT_NE(net_ns(c), mine);
  for (pid_t p : {a, b, c}) {
    EXPECT_EQ(ask(p, "verify").rfind("ok verified", 0), 0u) << "clone " << p;
    EXPECT_EQ(ask(p, "pipe"), "ok pipe") << "clone " << p;
  }
}

// Waits (bounded) for `path` to exist while `pid` lives.
bool wait_for_file(const std::string& path, pid_t pid) {
  for (int i = 0; i < 12000; i++) {
    if (std::filesystem::exists(path)) return true;
    if (!proc::exists(pid)) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::string real_python() {
  for (const char* p : {"/root/.pyenv/versions/3.11.7/bin/python3", "/usr/bin/python3"})
    if (access(p, X_OK) == 0) return p;
  return "";
}

// A python3 interpreter with a large dict, cloned: each clone checks every entry from inside
// and answers in a file named after its PID namespace (as clone_target does).
const char kPythonScript[] = R"(
import os, sys, time
d = {i: 'v%d' % (i * 7) for i in range(1000000)}
expect = sum(i * 7 for i in range(1000000))
dir = sys.argv[1]
open(dir + '/ready', 'w').close()
while True:
    ns = os.readlink('/proc/self/ns/pid')[5:-1]
    cmd = dir + '/cmd-' + ns
    try:
        with open(cmd) as f:
            c = f.read()
    except FileNotFoundError:
        time.sleep(0.002)
        continue
    os.unlink(cmd)
    # Entry -1 is this clone's own: none before its first check, its own after; another
    # clone's must never show.
    mine = d.pop(-1, ns) == ns
    ok = len(d) == 1000000 and sum(int(v[1:]) for v in d.values()) == expect
    d[-1] = ns
    out = ('ok dict pid %d' % os.getpid()) if ok and mine else 'FAIL dict'
    with open(dir + '/res-' + ns + '.tmp', 'w') as f:
        f.write(out + '\n')
    os.rename(dir + '/res-' + ns + '.tmp', dir + '/res-' + ns)
)";

TEST_F(CloneE2E, PythonWithALargeDict) {
  const std::string py = real_python();
  if (py.empty()) GTEST_SKIP() << "no python3";
  TempDir work;
  std::ofstream(work / "dict.py") << kPythonScript;
  Child target({"/bin/sh", "-c",
                "exec " + py + " " + (work / "dict.py") + " " + work.path() +
                    " </dev/null >/dev/null 2>&1"});
  ASSERT_TRUE(wait_for_file(work / "ready", target.pid()));
  const std::string img = work / "image";
  std::filesystem::create_directory(img);
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(60), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(img));
  const std::string saved_files = files_;
  files_ = work.path();
  std::vector<pid_t> pids;
  for (int i = 0; i < 4; i++) pids.push_back(start_clone());
  for (pid_t p : pids) {
    EXPECT_EQ(ask(p, "check"), "ok dict pid " + std::to_string(target.pid())) << "clone " << p;
    EXPECT_EQ(ask(p, "check"), "ok dict pid " + std::to_string(target.pid())) << "clone " << p;
  }
  files_ = saved_files;
}

// A node http server cloned several times, each in its own network namespace, each answering
// on the same port from the state built before the dump.
const char kNodeScript[] = R"(
const http = require('http');
const fs = require('fs');
let hits = 0;
const big = new Map();
for (let i = 0; i < 200000; i++) big.set('k' + i, {i, s: 'value-' + i});
http.createServer((req, res) => {
  hits++;
  let s = 0;
  for (const [, o] of big) s += o.i;
  res.end(`hits=${hits} sum=${s} key=${big.get('k4321').s}\n`);
}).listen(+process.argv[2], '127.0.0.1', () => fs.writeFileSync(process.argv[3], 'x'));
)";

std::string http_get_in(pid_t netns_of, int port) {
  int old = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  int ns = open(("/proc/" + std::to_string(netns_of) + "/ns/net").c_str(), O_RDONLY | O_CLOEXEC);
  if (old < 0 || ns < 0 || setns(ns, CLONE_NEWNET) != 0) {
    if (ns >= 0) close(ns);
    if (old >= 0) close(old);
    return "setns failed";
  }
  close(ns);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (setns(old, CLONE_NEWNET) != 0) std::abort();
  close(old);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string got;
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const std::string req = "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if (write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof buf)) > 0) got.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return got;
}

TEST_F(CloneE2E, NodeHttpServerClonedWithNetns) {
  if (access("/usr/bin/node", X_OK) != 0) GTEST_SKIP() << "node is not installed";
  TempDir work;
  const int port = 24302;
  std::ofstream(work / "server.js") << kNodeScript;
  Child server({"/bin/sh", "-c",
                "exec /usr/bin/node " + (work / "server.js") + " " + std::to_string(port) + " " +
                    (work / "listening") + " </dev/null >/dev/null 2>&1"});
  ASSERT_TRUE(wait_for_file(work / "listening", server.pid()));
  const std::string img = work / "image";
  std::filesystem::create_directory(img);
  auto d = lazycr({"dump", "-t", std::to_string(server.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(server.wait(60), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(img));
  std::vector<pid_t> pids;
  for (int i = 0; i < 10; i++) pids.push_back(start_clone({"--netns"}));
  const std::string state = "sum=19999900000 key=value-4321";
  for (pid_t p : pids) {
    ASSERT_GT(p, 0);
    std::string got;
    for (int i = 0; i < 3000 && got.empty() && proc::exists(p); i++) {
      got = http_get_in(p, port);
      if (got.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_NE(got.find("hits=1 " + state), std::string::npos) << "clone " << p << ": " << got;
    got = http_get_in(p, port);
    EXPECT_NE(got.find("hits=2 " + state), std::string::npos) << "clone " << p << ": " << got;
  }
}

// The inode of the shared anonymous mapping ("/dev/zero (deleted)") of `pid`, 0 if none.
uint64_t shared_zero_inode(pid_t pid) {
  for (const auto& m : proc::parse_maps(proc::read_file("/proc/" + std::to_string(pid) + "/maps")))
    if (m.shared && m.path.starts_with("/dev/zero")) return m.inode;
  return 0;
}

// nginx, master (root) and two workers (nobody) sharing shared anonymous memory (its accept
// mutex and counters) and the listening socket: each clone, in a network namespace of its own,
// answers on the same port; its workers are nobody's; its processes share one object, which is
// neither the template's nor another clone's.
TEST_F(CloneE2E, NginxMasterAndWorkersClonedWithNetns) {
  if (access("/usr/sbin/nginx", X_OK) != 0) GTEST_SKIP() << "nginx is not installed";
  const int port = 24303;
  NginxSetup setup(port, "served by a cloned nginx");
  Child server({"/bin/sh", "-c",
                "exec /usr/sbin/nginx -c " + setup.conf + " -p " + setup.dir.path() +
                    " </dev/null >/dev/null 2>&1"});
  std::vector<pid_t> workers;
  for (int i = 0; i < 3000 && (workers.size() != 2 || http_get_in(server.pid(), port).empty());
       i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    workers = proc::list_children(server.pid());
  }
  ASSERT_EQ(workers.size(), 2u);
  const std::string img = setup.dir / "image";
  auto d = lazycr({"dump", "-t", std::to_string(server.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(server.wait(60), 128 + SIGKILL);
  for (pid_t w : workers) waitpid(w, nullptr, 0);  // re-parented to us
  ASSERT_NO_FATAL_FAILURE(start_template(img));
  // The template holds the master at its image pid.
  const uint64_t held = shared_zero_inode(server.pid());
  ASSERT_NE(held, 0u) << "nginx has no shared anonymous memory";
  std::set<uint64_t> objects{held};
  for (int i = 0; i < 3; i++) {
    const pid_t p = start_clone({"--netns"});
    ASSERT_GT(p, 0);
    std::string got;
    for (int k = 0; k < 3000 && got.empty() && proc::exists(p); k++) {
      got = http_get_in(p, port);
      if (got.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    EXPECT_NE(got.find("served by a cloned nginx"), std::string::npos)
        << "clone " << p << ": " << got;
    const uint64_t object = shared_zero_inode(p);
    EXPECT_TRUE(objects.insert(object).second) << "clone " << p << " maps another's object";
    const auto kids = proc::list_children(p);
    EXPECT_EQ(kids.size(), 2u) << "clone " << p;
    for (pid_t w : kids) {
      EXPECT_EQ(status_field(w, "Uid"), "\t65534\t65534\t65534\t65534") << "worker " << w;
      EXPECT_EQ(shared_zero_inode(w), object) << "worker " << w << " of clone " << p;
    }
  }
}

// An image whose stdout is a pipe to outside: the template holds it with --shell-job, and each
// `clone --shell-job` gives the clone its own stdout (the clone writes there, from inside).
const char kEchoScript[] = R"(
import os, sys, time
print('ready', flush=True)
while True:
    ns = os.readlink('/proc/self/ns/pid')[5:-1]
    cmd = sys.argv[1] + '/cmd-' + ns
    if os.path.exists(cmd):
        os.unlink(cmd)
        print('hello from ' + ns, flush=True)
    time.sleep(0.002)
)";

TEST_F(CloneE2E, ShellJobGivesTheClonesStdout) {
  const std::string py = real_python();
  if (py.empty()) GTEST_SKIP() << "no python3";
  TempDir work;
  std::ofstream(work / "echo.py") << kEchoScript;
  Child target({py, work / "echo.py", work.path()});
  ASSERT_EQ(target.read_line(), "ready");
  const std::string img = work / "image";
  std::filesystem::create_directory(img);
  auto d = lazycr({"dump", "-t", std::to_string(target.pid()), "-D", img});
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(60), 128 + SIGKILL);
  ASSERT_NO_FATAL_FAILURE(start_template(img, {"--shell-job"}));
  // Without --shell-job the clone's stdout would lead nowhere: refused in one line.
  auto r = lazycr({"clone", "--socket", socket_, "-d"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--shell-job gives the process"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (int i = 0; i < 2; i++) {
    Child fg(
        {lazycr_bin(), "clone", "--socket", socket_, "--shell-job", "--pidfile", work / "fg.pid"});
    pid_t pid = 0;
    for (int k = 0; k < 6000 && pid == 0; k++) {
      auto text = proc::try_read_file(work / "fg.pid");
      if (text && !text->empty())
        pid = std::atoi(text->c_str());
      else
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ASSERT_GT(pid, 0);
    clones_.push_back(pid);
    const std::string id = ns_id(pid);
    { std::ofstream(work / ("cmd-" + id)) << "x"; }
    EXPECT_EQ(fg.read_line(), "hello from " + id);
    ASSERT_TRUE(send_signal(pid, SIGKILL));
    EXPECT_EQ(fg.wait(60), 128 + SIGKILL);
    std::filesystem::remove(work / "fg.pid");
  }
}

}  // namespace
}  // namespace lazycr::test
