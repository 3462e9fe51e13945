// Helpers for end-to-end tests: run lazycr and target programs, capture their output.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace lazycr::test {

struct RunResult {
  int exit_code = -1;  // 128 + signal if killed by a signal
  std::string out;
  std::string err;
};

// Path of the lazycr binary under test / of a target program built in tests/targets.
std::string lazycr_bin();
std::string target_bin(const std::string& name);

// Runs argv to completion (stdin /dev/null), capturing stdout and stderr. Kills it after
// timeout_s seconds and fails the test.
RunResult run(const std::vector<std::string>& argv, int timeout_s = 120);
// Runs `lazycr args...`.
RunResult lazycr(const std::vector<std::string>& args, int timeout_s = 120);
// `lazycr restore -D dir --shell-job` [--lazy] and `extra`: a restore run in the foreground.
std::vector<std::string> restore_argv(const std::string& dir, bool lazy,
                                      const std::vector<std::string>& extra = {});

// The nftables library lazycr loads (with dlopen) to lock TCP connections, resolved to its
// file; "" when this machine has none.
std::string nftables_library();
// Runs `lazycr args...` as on a machine without `file`: in a private mount namespace where it
// is /dev/null (bind-mounted over it), which the dynamic loader refuses.
RunResult lazycr_without(const std::string& file, const std::vector<std::string>& args);

// The key the tests' dumps sign their images with (LAZYCR_IMAGE_KEY, set for every lazycr the
// tests run).
inline constexpr char kTestImageKey[] = "/tmp/lazycr-e2e-image.key";
// Signs an image the test edited, as the dump would have (README "Trust"): for tests about
// something else than the MAC.
void sign_test_image(const std::string& dir);

// A process started in the background whose stdout is a pipe we can read line by line.
class Child {
 public:
  explicit Child(const std::vector<std::string>& argv);
  ~Child();  // kills (SIGKILL) and reaps if still running
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // Reads the next line of stdout (without '\n'); fails the test after timeout_s.
  std::string read_line(int timeout_s = 60);
  // Reads everything left on stdout until every writer closed it (lines not read yet
  // included); fails the test after timeout_s.
  std::string read_rest(int timeout_s = 60);
  // Reads lines until one starts with prefix; returns it.
  std::string wait_for(const std::string& prefix, int timeout_s = 60);
  // Waits for exit; returns the exit code (128 + signal if killed).
  int wait(int timeout_s = 60);
  bool running();

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buf_;
  bool reaped_ = false;
};

// `lazycr dump -t PID -D dir` and `extra` of the tree of `target`: a fatal test failure unless
// the dump succeeds and kills the target.
void dump_killing(Child& target, const std::string& dir,
                  const std::vector<std::string>& extra = {});

// Waits until the restore has let every one of `pids` go: named `comm` again and no longer
// traced (every thread of `tids` of the first pid, when given). A fatal test failure if the
// restore ends first or after a minute; call it inside ASSERT_NO_FATAL_FAILURE.
void wait_restored(Child& restore, const std::vector<pid_t>& pids, const std::string& comm,
                   const std::vector<int>& tids = {});

// The pid a restore run with `--pidfile path` writes there, once written; 0 (and a test failure)
// if the restore ends first or after a minute.
pid_t wait_for_pidfile(Child& restore, const std::string& path);

// Asks the restored target `pid` to verify itself (SIGUSR1): its "verified ok" comes through
// the foreground `restore`, which then exits 0.
void expect_verified(Child& restore, pid_t pid);

// A fresh empty temporary directory, removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace lazycr::test
