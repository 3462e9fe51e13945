// Clones of a held template against lazy restores of the same image (issue 13), by hand:
//   build/bench/clone_bench [--mib 64,512] [--runs 10]
// For each size: clone_target holding that much memory is dumped once; `lazycr template` holds
// it; then, in the same run, `runs` times each: `lazycr clone -d` (request to the clone's
// first instruction, from its --stats, and the command's wall time) and
// `lazycr restore --lazy --pidns -d` (first instruction from its -v line, and wall time).
// Every copy is killed right after it starts. Prints medians and bests (RESULTS.md, "Clones").
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <fstream>
#include <sstream>

#include "bench/process_util.h"

namespace fs = boost::filesystem;
using namespace lazycr::bench;

namespace {

const std::string kLazycr = LAZYCR_BIN;
const std::string kTarget = std::string(LAZYCR_TARGETS_DIR) + "/clone_target";

double number_after(const std::string& text, const std::string& key) {
  auto pos = text.find(key);
  if (pos == std::string::npos) die("no '" + key + "' in: " + text);
  return std::strtod(text.c_str() + pos + key.size(), nullptr);
}

void reap_zombies() {
  int status;
  while (waitpid(-1, &status, WNOHANG) > 0) {
  }
}

void kill_pid(pid_t pid) {
  if (pid > 0) kill(pid, SIGKILL);
}

struct Series {
  std::vector<double> v;
  double median() {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
  }
  double best() { return v.empty() ? 0 : *std::min_element(v.begin(), v.end()); }
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> sizes{64, 512};
  int runs = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--mib") {
      sizes.clear();
      std::stringstream in(v);
      std::string item;
      while (std::getline(in, item, ',')) sizes.push_back(std::atoi(item.c_str()));
    } else if (k == "--runs") {
      runs = std::atoi(v.c_str());
    } else {
      die("usage: clone_bench [--mib 64,512] [--runs N]");
    }
  }
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  std::printf(
      "| MiB | clone: request->first instr (median / best) | clone: command wall | "
      "restore --lazy --pidns: first instr | restore: command wall | template hold |\n");
  for (int mib : sizes) {
    fs::path work = fs::temp_directory_path() / fs::unique_path("clone-bench-%%%%%%");
    fs::create_directories(work / "image");
    fs::create_directories(work / "files");
    int out[2];
    if (pipe(out) != 0) die("pipe");
    pid_t target = spawn({kTarget, (work / "files").string(), std::to_string(mib)}, out[1], -1);
    close(out[1]);
    std::string ready = read_line(out[0]);
    close(out[0]);
    if (ready.rfind("ready", 0) != 0) die("clone_target did not start");
    std::string err;
    if (run_cmd({kLazycr, "dump", "-t", std::to_string(target), "-D", (work / "image").string()},
                &err) != 0)
      die("dump: " + err);
    wait_exit(target);
    const std::string sock = (work / "t.sock").string();
    double t0 = now_ms();
    if (run_cmd({kLazycr, "template", "-D", (work / "image").string(), "--socket", sock, "-d"},
                &err) != 0)
      die("template: " + err);
    const double hold_ms = now_ms() - t0;
    Series first_clone, wall_clone, first_restore, wall_restore;
    const std::string stats = (work / "stats.json").string();
    for (int r = 0; r < runs; r++) {
      int o[2];
      if (pipe2(o, O_CLOEXEC) != 0) die("pipe");
      double c0 = now_ms();
      pid_t p = spawn({kLazycr, "clone", "--socket", sock, "-d", "--stats", stats}, o[1], -1);
      close(o[1]);
      std::string pid_line = read_all(o[0]);
      close(o[0]);
      if (wait_exit(p) != 0) die("clone failed");
      wall_clone.v.push_back(now_ms() - c0);
      std::ifstream in(stats);
      std::stringstream s;
      s << in.rdbuf();
      first_clone.v.push_back(number_after(s.str(), "\"request_to_first_instruction_ns\": ") / 1e6);
      kill_pid(std::atoi(pid_line.c_str()));

      if (pipe2(o, O_CLOEXEC) != 0) die("pipe");
      int e[2];
      if (pipe2(e, O_CLOEXEC) != 0) die("pipe");
      c0 = now_ms();
      p = spawn(
          {kLazycr, "-v", "restore", "-D", (work / "image").string(), "--lazy", "--pidns", "-d"},
          o[1], e[1]);
      close(o[1]);
      close(e[1]);
      pid_line = read_all(o[0]);
      std::string text = read_all(e[0]);
      close(o[0]);
      close(e[0]);
      if (wait_exit(p) != 0) die("restore failed: " + text);
      wall_restore.v.push_back(now_ms() - c0);
      first_restore.v.push_back(number_after(text, "first instruction after ") / 1000);
      kill_pid(std::atoi(pid_line.c_str()));
      usleep(100000);
      reap_zombies();
    }
    run_cmd({kLazycr, "clone", "--socket", sock, "--stop"});
    usleep(200000);
    reap_zombies();
    std::printf(
        "| %d | %.2f / %.2f ms | %.1f / %.1f ms | %.2f / %.2f ms | %.1f / %.1f ms | %.0f ms |\n",
        mib, first_clone.median(), first_clone.best(), wall_clone.median(), wall_clone.best(),
        first_restore.median(), first_restore.best(), wall_restore.median(), wall_restore.best(),
        hold_ms);
    std::fflush(stdout);
    fs::remove_all(work);
  }
  return 0;
}
