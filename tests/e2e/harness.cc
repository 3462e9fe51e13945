#include "tests/e2e/harness.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>

#include "common/proc.h"
#include "common/signals.h"
#include "image-format/image_mac.h"

extern char** environ;

namespace lazycr::test {
namespace {

// The machine's PID 1 does not reap orphans; restored trees re-parent to us.
struct SubreaperSetup {
  SubreaperSetup() { prctl(PR_SET_CHILD_SUBREAPER, 1); }
} g_subreaper;

// Images are signed under a key of the tests' own, not the machine's (README "Trust").
struct ImageKeySetup {
  ImageKeySetup() { setenv("LAZYCR_IMAGE_KEY", kTestImageKey, 0); }
} g_image_key;

std::vector<char*> to_argv(const std::vector<std::string>& argv) {
  std::vector<char*> out;
  for (const auto& a : argv) out.push_back(const_cast<char*>(a.c_str()));
  out.push_back(nullptr);
  return out;
}

pid_t spawn(const std::vector<std::string>& argv, int out_fd, int err_fd) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  posix_spawn_file_actions_adddup2(&fa, err_fd, 2);
  // Nothing the test runner inherited leaks into targets (it would be dumped with them).
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Each child in its own process group so a test can signal the whole group.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid = -1;
  auto args = to_argv(argv);
  int rc = posix_spawn(&pid, args[0], &fa, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << argv[0] << ": " << std::strerror(rc);
    return -1;
  }
  return pid;
}

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

void dump_killing(Child& target, const std::string& dir, const std::vector<std::string>& extra) {
  std::vector<std::string> args{"dump", "-t", std::to_string(target.pid()), "-D", dir};
  args.insert(args.end(), extra.begin(), extra.end());
  auto d = lazycr(args);
  ASSERT_EQ(d.exit_code, 0) << d.err;
  EXPECT_EQ(target.wait(30), 128 + SIGKILL);
}

std::vector<std::string> restore_argv(const std::string& dir, bool lazy,
                                      const std::vector<std::string>& extra) {
  std::vector<std::string> a{lazycr_bin(), "restore", "-D", dir, "--shell-job"};
  if (lazy) a.push_back("--lazy");
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

void sign_test_image(const std::string& dir) {
  auto key = image::load_image_key(true);
  ASSERT_TRUE(key.has_value()) << image::image_key_path();
  image::sign_image(dir, *key);
}

std::string lazycr_bin() {
  return LAZYCR_BIN;
}
std::string target_bin(const std::string& name) {
  return std::string(LAZYCR_TARGETS_DIR) + "/" + name;
}

RunResult run(const std::vector<std::string>& argv, int timeout_s) {
  RunResult result;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return result;
  }
  pid_t pid = spawn(argv, out[1], err[1]);
  close(out[1]);
  close(err[1]);
  if (pid <= 0) {
    close(out[0]);
    close(err[0]);
    return result;
  }
  double deadline = now_s() + timeout_s;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  while (open_fds > 0) {
    int left_ms = static_cast<int>((deadline - now_s()) * 1000);
    if (left_ms <= 0) {
      send_signal(pid, SIGKILL);
      ADD_FAILURE() << argv[0] << " timed out after " << timeout_s << " s";
      break;
    }
    if (poll(fds, 2, left_ms) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; i++) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[65536];
      ssize_t n = read(fds[i].fd, buf, sizeof buf);
      if (n > 0) {
        (i == 0 ? result.out : result.err).append(buf, n);
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        open_fds--;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) close(f.fd);
  int status = 0;
  waitpid(pid, &status, 0);
  result.exit_code = decode_status(status);
  return result;
}

RunResult lazycr(const std::vector<std::string>& args, int timeout_s) {
  std::vector<std::string> argv{lazycr_bin()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv, timeout_s);
}

std::string nftables_library() {
  for (const char* p :
       {"/usr/lib/x86_64-linux-gnu/libnftables.so.1", "/lib/x86_64-linux-gnu/libnftables.so.1",
        "/usr/lib64/libnftables.so.1", "/usr/lib/libnftables.so.1"}) {
    char real[PATH_MAX];
    if (::realpath(p, real) != nullptr) return real;
  }
  return "";
}

RunResult lazycr_without(const std::string& file, const std::vector<std::string>& args) {
  std::vector<std::string> argv{
      "/usr/bin/unshare",
      "-m",
      "/bin/sh",
      "-c",
      "mount --make-rprivate / && mount --bind /dev/null \"$1\" && shift && exec \"$@\"",
      "sh",
      file,
      lazycr_bin()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv);
}

Child::Child(const std::vector<std::string>& argv) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe: " << std::strerror(errno);
    return;
  }
  pid_ = spawn(argv, out[1], 2);
  close(out[1]);
  out_fd_ = out[0];
}

Child::~Child() {
  if (pid_ > 0 && !reaped_) {
    send_signal(pid_, SIGKILL);
    int status;
    waitpid(pid_, &status, 0);
  }
  if (out_fd_ >= 0) close(out_fd_);
}

std::string Child::read_line(int timeout_s) {
  double deadline = now_s() + timeout_s;
  for (;;) {
    auto nl = buf_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      return line;
    }
    int left_ms = static_cast<int>((deadline - now_s()) * 1000);
    if (left_ms <= 0) {
      ADD_FAILURE() << "no output line from pid " << pid_ << " within " << timeout_s << " s";
      return {};
    }
    pollfd p{out_fd_, POLLIN, 0};
    if (poll(&p, 1, left_ms) <= 0) continue;
    char buf[4096];
    ssize_t n = read(out_fd_, buf, sizeof buf);
    if (n <= 0) {
      ADD_FAILURE() << "pid " << pid_ << " closed its output (exited?)";
      return {};
    }
    buf_.append(buf, n);
  }
}

std::string Child::read_rest(int timeout_s) {
  double deadline = now_s() + timeout_s;
  std::string out = std::move(buf_);
  buf_.clear();
  for (;;) {
    int left_ms = static_cast<int>((deadline - now_s()) * 1000);
    if (left_ms <= 0) {
      ADD_FAILURE() << "output of pid " << pid_ << " still open after " << timeout_s << " s";
      return out;
    }
    pollfd p{out_fd_, POLLIN, 0};
    if (poll(&p, 1, left_ms) <= 0) continue;
    char buf[4096];
    ssize_t n = read(out_fd_, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return out;
    out.append(buf, n);
  }
}

std::string Child::wait_for(const std::string& prefix, int timeout_s) {
  double deadline = now_s() + timeout_s;
  while (now_s() < deadline) {
    std::string line = read_line(static_cast<int>(deadline - now_s()) + 1);
    if (line.rfind(prefix, 0) == 0) return line;
    if (line.empty() && ::testing::Test::HasFailure()) return {};
  }
  ADD_FAILURE() << "pid " << pid_ << " never printed a line starting with '" << prefix << "'";
  return {};
}

int Child::wait(int timeout_s) {
  double deadline = now_s() + timeout_s;
  int status = 0;
  while (now_s() < deadline) {
    pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      return decode_status(status);
    }
    usleep(2000);
  }
  ADD_FAILURE() << "pid " << pid_ << " did not exit within " << timeout_s << " s";
  return -1;
}

bool Child::running() {
  if (reaped_) return false;
  int status = 0;
  pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    return false;
  }
  return true;
}

TempDir::TempDir() {
  char tmpl[] = "/tmp/lazycr-test-XXXXXX";
  char* p = mkdtemp(tmpl);
  if (p == nullptr) ADD_FAILURE() << "mkdtemp: " << std::strerror(errno);
  path_ = p ? p : "/tmp";
}

TempDir::~TempDir() {
  boost::system::error_code ec;
  if (path_ != "/tmp") boost::filesystem::remove_all(path_, ec);
}

void wait_restored(Child& restore, const std::vector<pid_t>& pids, const std::string& comm,
                   const std::vector<int>& tids) {
  auto untraced = [](const std::string& status_path) {
    auto st = proc::try_read_file(status_path);
    return st && st->find("TracerPid:\t0\n") != std::string::npos;
  };
  auto done = [&] {
    for (pid_t pid : pids) {
      const std::string dir = "/proc/" + std::to_string(pid);
      auto name = proc::try_read_file(dir + "/comm");
      if (!name || *name != comm + "\n" || !untraced(dir + "/status")) return false;
    }
    for (int tid : tids)
      if (!untraced("/proc/" + std::to_string(pids.front()) + "/task/" + std::to_string(tid) +
                    "/status"))
        return false;
    return true;
  };
  for (int i = 0; i < 30000 && restore.running(); i++) {
    if (done()) return;
    usleep(2000);
  }
  FAIL() << "pid " << (pids.empty() ? 0 : pids.front()) << " (" << comm << ") was not restored"
         << (restore.running() ? "" : ": the restore ended");
}

pid_t wait_for_pidfile(Child& restore, const std::string& path) {
  pid_t pid = 0;
  for (int i = 0; i < 30000 && restore.running() && pid == 0; i++) {
    std::ifstream in(path);
    if (!(in >> pid)) pid = 0;
    if (pid == 0) usleep(2000);
  }
  EXPECT_GT(pid, 0) << "no pid in " << path;
  return pid;
}

void expect_verified(Child& restore, pid_t pid) {
  ASSERT_TRUE(send_signal(pid, SIGUSR1));
  EXPECT_EQ(restore.read_line(), "verified ok");
  EXPECT_EQ(restore.wait(60), 0);
}

}  // namespace lazycr::test
