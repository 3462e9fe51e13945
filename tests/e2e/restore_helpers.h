// Helpers shared by the restore end-to-end tests (eager: restore_e2e.cc, lazy: lazy_e2e.cc):
// what a process looks like from /proc, reaping re-parented processes, checking that a failed
// restore left nothing behind, and a state_target to dump.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {

inline std::string maps_of(pid_t pid) {
  return proc::read_file("/proc/" + std::to_string(pid) + "/maps");
}

inline std::set<int> tids_of(pid_t pid) {
  auto t = proc::list_tasks(pid);
  return std::set<int>(t.begin(), t.end());
}

inline std::string status_field(pid_t pid, const std::string& key) {
  std::istringstream in(proc::read_file("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return line.substr(key.size() + 1);
  return "";
}

// What a process can learn about itself from /proc beyond its maps: command line, exe, cwd,
// auxv, mm bounds, umask, signal dispositions, descriptors >= 3 (0-2 are lazycr's with
// --shell-job) with positions and flags, and each thread's name and blocked signals.
inline std::map<std::string, std::string> snapshot(pid_t pid, const std::vector<int>& tids) {
  std::string dir = "/proc/" + std::to_string(pid);
  std::map<std::string, std::string> s;
  s["cmdline"] = proc::read_file(dir + "/cmdline");
  s["exe"] = proc::read_link(dir + "/exe");
  s["cwd"] = proc::read_link(dir + "/cwd");
  s["auxv"] = proc::read_file(dir + "/auxv");
  s["personality"] = proc::read_file(dir + "/personality");
  auto st = proc::read_stat(pid);
  std::ostringstream mm;
  mm << std::hex << st.start_code << " " << st.end_code << " " << st.start_stack << " "
     << st.start_data << " " << st.end_data << " " << st.start_brk << " " << st.arg_start << " "
     << st.arg_end << " " << st.env_start << " " << st.env_end;
  s["mm"] = mm.str();
  for (const char* key : {"Umask", "SigIgn", "SigCgt", "CapEff", "NoNewPrivs", "Seccomp"})
    s[key] = status_field(pid, key);
  for (int fd : proc::list_fds(pid)) {
    if (fd < 3) continue;
    std::string f = std::to_string(fd);
    s["fd " + f] = proc::read_link(dir + "/fd/" + f);
    auto info = proc::parse_fdinfo(proc::read_file(dir + "/fdinfo/" + f));
    s["fdinfo " + f] = std::to_string(info.pos) + " " + std::to_string(info.flags) + " " +
                       std::to_string(info.mnt_id) + " " + std::to_string(info.ino);
  }
  for (int tid : tids) {
    std::string t = dir + "/task/" + std::to_string(tid);
    s["comm " + std::to_string(tid)] = proc::read_file(t + "/comm");
    std::istringstream in(proc::read_file(t + "/status"));
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("SigBlk:", 0) == 0) s["SigBlk " + std::to_string(tid)] = line;
  }
  return s;
}

inline void expect_same(const std::map<std::string, std::string>& before,
                        const std::map<std::string, std::string>& after) {
  for (const auto& [key, value] : before) {
    auto it = after.find(key);
    if (it == after.end()) {
      ADD_FAILURE() << key << " missing after the restore";
      continue;
    }
    EXPECT_EQ(it->second, value) << key;
  }
  for (const auto& [key, value] : after)
    EXPECT_TRUE(before.count(key)) << key << " = " << value << " appeared after the restore";
}

// Waits for a process that is our child (directly, or re-parented to us: the harness is a
// child subreaper) and returns its exit code (128 + signal if killed).
inline int reap(pid_t pid, int timeout_s = 60) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) {
      ADD_FAILURE() << "pid " << pid << " is not our child: " << std::strerror(errno);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ADD_FAILURE() << "pid " << pid << " did not exit within " << timeout_s << " s";
  return -1;
}

// Kills and reaps a restored process that a failing test left running.
struct Restored {
  pid_t pid = 0;
  bool reaped = false;
  ~Restored() {
    if (pid > 0 && !reaped && proc::exists(pid)) {
      send_signal(pid, SIGKILL);
      int status;
      waitpid(pid, &status, 0);
    }
  }
  int wait() {
    reaped = true;
    return reap(pid);
  }
};

// After a refused or failed restore: no process with the image's pid, and no child of ours
// other than `keep` (no stopped, zombie, or half-built process).
inline void expect_nothing_left(pid_t pid, std::set<pid_t> keep = {}) {
  EXPECT_FALSE(proc::exists(pid)) << "pid " << pid << " exists after a failed restore";
  for (pid_t c : proc::list_children(getpid()))
    EXPECT_TRUE(keep.count(c))
        << "child " << c << " ("
        << proc::try_read_file("/proc/" + std::to_string(c) + "/stat").value_or("gone")
        << ") left behind";
}

// A state_target in its own work directory; its maps are captured right before a dump.
struct StateTarget {
  TempDir work;
  std::string verify_file = work / "verify";
  std::unique_ptr<Child> child;
  TargetInfo info;
  std::string maps;
  std::map<std::string, std::string> state;  // snapshot() of the leader and ticker

  explicit StateTarget(std::vector<std::string> extra = {}, std::string bin = "") {
    std::vector<std::string> argv{bin.empty() ? target_bin("state_target") : bin, "--verify-file",
                                  verify_file, "--workdir", work.path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    child = std::make_unique<Child>(argv);
    // Filling gigabytes takes minutes where fresh-page faults are slow or the machine is busy.
    std::string ready = child->wait_for("ready", 600);
    if (ready.empty()) throw std::runtime_error("state_target never said it was ready");
    info = TargetInfo::parse(ready);
  }
  pid_t pid() const { return child->pid(); }
  // The leader and the ticker (the sleeper ends soon after a restore, see expect_tids()).
  std::vector<int> stable_tids() const {
    auto t = info.list("tids");
    return {t[0], t[2]};
  }

  // Dumps (killing the target unless leave_running) into dir.
  void dump(const std::string& dir, bool leave_running = false,
            const std::vector<std::string>& extra = {}) {
    maps = maps_of(pid());
    state = snapshot(pid(), stable_tids());
    std::vector<std::string> args{"dump", "-t", std::to_string(pid()), "-D", dir};
    if (leave_running) args.push_back("--leave-running");
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = lazycr(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    if (!leave_running) {
      EXPECT_EQ(child->wait(30), 128 + SIGKILL);
    }
  }
  void go() { std::ofstream(verify_file) << "go"; }
};

// The restored threads are the original's. The sleeper may already be gone: it was in a
// relative nanosleep, which returns EINTR after a restore (the kernel's restart block does not
// survive; see fixup_interrupted_syscall), and then it ends.
inline void expect_tids(const std::set<int>& now, const std::vector<int>& before) {
  ASSERT_EQ(before.size(), 3u);
  std::set<int> all(before.begin(), before.end());
  for (int tid : now) EXPECT_TRUE(all.count(tid)) << "tid " << tid << " is not the original's";
  EXPECT_TRUE(now.count(before[0])) << "leader";
  EXPECT_TRUE(now.count(before[2])) << "ticker";
}

// Maps text with the inode of shared memory objects (shmem, memfd) blanked: a restore
// creates new objects, so only their numbers differ.
inline std::string maps_without_shmem_inodes(const std::string& maps) {
  std::istringstream in(maps);
  std::string line, out;
  while (std::getline(in, line)) {
    if (line.find("/dev/zero (deleted)") != std::string::npos ||
        line.find("/memfd:") != std::string::npos) {
      std::istringstream f(line);
      std::string range, perms, off, dev, inode;
      f >> range >> perms >> off >> dev >> inode;
      std::string rest;
      std::getline(f, rest);  // the path, after padding that depends on the inode's width
      rest.erase(0, rest.find_first_not_of(' '));
      line = range + " " + perms + " " + off + " " + dev + " <shmem> " + rest;
    }
    out += line + "\n";
  }
  return out;
}

}  // namespace lazycr::test
