// Helpers of the lazy restore tests (lazy_e2e.cc, lazy_kill_e2e.cc): detached lazy restores,
// lazy_events_target, stats files.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/proc.h"
#include "common/signals.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/restore_helpers.h"
#include "tests/e2e/target_info.h"

namespace lazycr::test {

namespace fs = boost::filesystem;

// The number after "key": in a stats file (the first occurrence), -1 if absent.
inline int64_t json_number(const std::string& text, const std::string& key) {
  auto pos = text.find("\"" + key + "\":");
  if (pos == std::string::npos) return -1;
  return std::strtoll(text.c_str() + pos + key.size() + 3, nullptr, 10);
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline pid_t read_pidfile(const std::string& path) {
  for (int i = 0; i < 5000 && !fs::exists(path); i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  return std::atoi(read_text(path).c_str());
}

// Every child of ours (re-parented ones included) named `comm`: a page server's guardian
// outlives a killed server.
inline std::vector<pid_t> children_named(const std::string& comm) {
  std::vector<pid_t> out;
  for (pid_t c : proc::list_children(getpid())) {
    auto text = proc::try_read_file("/proc/" + std::to_string(c) + "/comm");
    if (text && *text == comm + "\n") out.push_back(c);
  }
  return out;
}

// A detached lazy restore: the restored pid, and the page server (re-parented to us when
// lazycr returns; it ends once nothing is owed or the process is gone).
struct LazyDetached {
  std::unique_ptr<Child> lz;
  Restored rp;
  pid_t server = 0;
  std::string stats;

  // Runs `lazycr [pre...] restore --lazy -D dir --shell-job --detach --server-pidfile ...
  // --stats ... extra...`.
  void start(const std::string& dir, const TempDir& work, std::vector<std::string> extra = {},
             std::vector<std::string> pre = {}) {
    stats = work / "stats.json";
    std::string pidfile = work / "server.pid";
    std::vector<std::string> argv{lazycr_bin()};
    argv.insert(argv.end(), pre.begin(), pre.end());
    for (const char* a : {"restore", "--lazy", "--shell-job", "--detach"}) argv.push_back(a);
    for (const std::string& a : {std::string("-D"), dir, std::string("--server-pidfile"), pidfile,
                                 std::string("--stats"), stats})
      argv.push_back(a);
    argv.insert(argv.end(), extra.begin(), extra.end());
    lz = std::make_unique<Child>(argv);
    rp.pid = std::atoi(lz->read_line().c_str());
    EXPECT_EQ(lz->wait(), 0);
    server = read_pidfile(pidfile);
    EXPECT_GT(server, 0);
  }
  // Waits for the server (once the process is gone or every page is served) and returns its
  // exit code; the stats file is complete then.
  int wait_server() {
    if (server <= 0) return -1;
    int code = reap(server);
    server = 0;
    return code;
  }
  ~LazyDetached() {  // a failed test: nothing left running
    if (rp.pid > 0 && !rp.reaped && proc::exists(rp.pid)) {
      send_signal(rp.pid, SIGKILL);
      rp.wait();
    }
    if (server > 0) reap(server);
  }
};

// lazy_events_target, dumped, then restored lazily with prefetch off: every page it does not
// touch stays owed.
struct EventsTarget {
  TempDir work;
  std::string cmd_file = work / "cmd";
  std::unique_ptr<Child> child;
  TargetInfo info;
  TempDir images;
  std::string dir = images / "img";

  explicit EventsTarget(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv{target_bin("lazy_events_target"), "--cmd-file", cmd_file};
    argv.insert(argv.end(), extra.begin(), extra.end());
    child = std::make_unique<Child>(argv);
    info = TargetInfo::parse(child->wait_for("ready"));
    auto r = lazycr({"dump", "-t", std::to_string(child->pid()), "-D", dir});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(child->wait(30), 128 + SIGKILL);
  }
  pid_t pid() const { return child->pid(); }
  // Hands the restored target a command (atomically: it polls for the file).
  void send(const std::string& word) {
    std::string tmp = cmd_file + ".tmp";
    std::ofstream(tmp) << word << "\n";
    fs::rename(tmp, cmd_file);
  }
};

}  // namespace lazycr::test
