// Clones of a held template against lazy restores of the same image (issue 13), by hand:
//   build/bench/clone_bench [--mib 64,512] [--runs 10] [--pss 1,10,50] [--loop 20]
// For each size: clone_target holding that much memory is dumped once; two templates hold it,
// in three blocks (a template holds the image's PIDs, so one at a time): memory collapsed into
// huge pages (the default), `--small-pages`, huge pages again. In each block, alternating,
// `runs` times each: `lazycr clone -d` (request to the clone's first instruction, from its
// --stats, and the command's wall time) and `lazycr restore --lazy --pidns -d` (first
// instruction from its -v line, and wall time). Every copy is killed right after it starts.
// Then clones per second (`loop` `lazycr clone -d` back to back) and, in the first two blocks,
// the total PSS of template + N idle clones for each N of --pss against one copy (the
// template's RSS). Prints medians and bests (RESULTS.md).
//   build/bench/clone_bench --tree MIB [--tree-pages small] [--runs 10] [--pss 1,10]
// Clones of a process tree instead (clone_tree_target: a root with MIB MiB, a child sharing
// them, a child rewriting half of its copy): per clone against `lazycr restore --pidns -d`
// (eager) of the same image, alternating; then the PSS of the held tree + N idle tree clones
// (--tree-pages small: the template with --small-pages).
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
const std::string kTreeTarget = std::string(LAZYCR_TARGETS_DIR) + "/clone_tree_target";

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

uint64_t rollup_kb(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/smaps_rollup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return std::stoull(line.substr(key.size() + 1));
  return 0;
}

// The held process: the template's child that runs clone_target and is no clone.
pid_t held_of(pid_t tpl, const std::vector<pid_t>& clones) {
  std::ifstream in("/proc/" + std::to_string(tpl) + "/task/" + std::to_string(tpl) + "/children");
  pid_t c;
  while (in >> c) {
    if (std::find(clones.begin(), clones.end(), c) != clones.end()) continue;
    std::error_code ec;
    char buf[4096];
    ssize_t n = readlink(("/proc/" + std::to_string(c) + "/exe").c_str(), buf, sizeof buf - 1);
    if (n > 0 && std::string(buf, static_cast<size_t>(n)).find("clone_target") != std::string::npos)
      return c;
  }
  return 0;
}

struct Template {
  std::string name, sock;
  pid_t pid = 0;
  double hold_ms = 0;
  Series first, wall;
};

// One `lazycr clone -d`; returns the clone's pid.
pid_t clone_once(Template& t, const std::string& stats, bool record) {
  int o[2];
  if (pipe2(o, O_CLOEXEC) != 0) die("pipe");
  double c0 = now_ms();
  std::vector<std::string> args{kLazycr, "clone", "--socket", t.sock, "-d"};
  if (record) {
    args.push_back("--stats");
    args.push_back(stats);
  }
  pid_t p = spawn(args, o[1], -1);
  close(o[1]);
  std::string pid_line = read_all(o[0]);
  close(o[0]);
  if (wait_exit(p) != 0) die("clone failed");
  if (record) {
    t.wall.v.push_back(now_ms() - c0);
    std::ifstream in(stats);
    std::stringstream s;
    s << in.rdbuf();
    t.first.v.push_back(number_after(s.str(), "\"request_to_first_instruction_ns\": ") / 1e6);
  }
  return std::atoi(pid_line.c_str());
}

// A process and its children (one level: clone_tree_target's tree).
std::vector<pid_t> with_children(pid_t p) {
  std::vector<pid_t> out{p};
  std::ifstream in("/proc/" + std::to_string(p) + "/task/" + std::to_string(p) + "/children");
  pid_t c;
  while (in >> c) out.push_back(c);
  return out;
}

uint64_t tree_kb(pid_t root, const std::string& key) {
  uint64_t kb = 0;
  for (pid_t p : with_children(root)) kb += rollup_kb(p, key);
  return kb;
}

int run_tree(int mib, int runs, const std::vector<int>& pss_points, bool small_pages) {
  fs::path work = fs::temp_directory_path() / fs::unique_path("clone-bench-tree-%%%%%%");
  fs::create_directories(work / "image");
  fs::create_directories(work / "files");
  int out[2];
  if (pipe(out) != 0) die("pipe");
  pid_t target = spawn({kTreeTarget, (work / "files").string(), std::to_string(mib)}, out[1], -1);
  close(out[1]);
  std::string ready = read_line(out[0]);
  close(out[0]);
  if (ready.rfind("ready", 0) != 0) die("clone_tree_target did not start");
  std::string err;
  if (run_cmd({kLazycr, "dump", "-t", std::to_string(target), "-D", (work / "image").string()},
              &err) != 0)
    die("dump: " + err);
  wait_exit(target);
  usleep(200000);
  reap_zombies();
  Template t;
  t.name = "tree";
  t.sock = (work / "t.sock").string();
  int o[2];
  if (pipe2(o, O_CLOEXEC) != 0) die("pipe");
  double t0 = now_ms();
  std::vector<std::string> targs{kLazycr,    "template", "-D", (work / "image").string(),
                                 "--socket", t.sock,     "-d"};
  if (small_pages) targs.push_back("--small-pages");
  pid_t tp = spawn(targs, o[1], -1);
  close(o[1]);
  std::string line = read_all(o[0]);
  close(o[0]);
  if (wait_exit(tp) != 0) die("template failed");
  t.hold_ms = now_ms() - t0;
  t.pid = std::atoi(line.c_str());
  usleep(300000);
  Series first_restore, wall_restore;
  const std::string stats = (work / "stats.json").string();
  for (int r = 0; r < runs; r++) {
    kill_pid(clone_once(t, stats, true));
    usleep(50000);
    int ro[2], re[2];
    if (pipe2(ro, O_CLOEXEC) != 0 || pipe2(re, O_CLOEXEC) != 0) die("pipe");
    double c0 = now_ms();
    pid_t p = spawn({kLazycr, "-v", "restore", "-D", (work / "image").string(), "--pidns", "-d"},
                    ro[1], re[1]);
    close(ro[1]);
    close(re[1]);
    std::string pid_line = read_all(ro[0]);
    std::string text = read_all(re[0]);
    close(ro[0]);
    close(re[0]);
    if (wait_exit(p) != 0) die("restore failed: " + text);
    wall_restore.v.push_back(now_ms() - c0);
    first_restore.v.push_back(number_after(text, "first instruction after ") / 1000);
    kill_pid(std::atoi(pid_line.c_str()));
    usleep(100000);
    reap_zombies();
  }
  std::printf(
      "| MiB | hold ms | tree clone: request->first instr (median / best) | clone: command wall | "
      "restore --pidns: first instr | restore: command wall |\n");
  std::printf(
      "| %d%s | %.0f | %.2f / %.2f ms | %.1f / %.1f ms | %.2f / %.2f ms | %.1f / %.1f ms |\n", mib,
      small_pages ? " --small-pages" : "", t.hold_ms, t.first.median(), t.first.best(),
      t.wall.median(), t.wall.best(), first_restore.median(), first_restore.best(),
      wall_restore.median(), wall_restore.best());
  std::fflush(stdout);
  std::vector<pid_t> pids;
  pid_t held = 0;
  for (pid_t c : with_children(t.pid))
    if (c != t.pid && with_children(c).size() == 3) held = c;
  if (held == 0) die("no held tree");
  const uint64_t one = tree_kb(held, "Rss");
  for (int n : pss_points) {
    while (static_cast<int>(pids.size()) < n) pids.push_back(clone_once(t, stats, false));
    usleep(500000);
    uint64_t pss = tree_kb(held, "Pss");
    for (pid_t p : pids) pss += tree_kb(p, "Pss");
    std::printf(
        "PSS %d MiB tree%s: held tree + %d tree clones %.1f MiB, one copy (held tree's RSS) %.1f "
        "MiB, ratio %.3f\n",
        mib, small_pages ? " --small-pages" : "", n, pss / 1024.0, one / 1024.0,
        one ? static_cast<double>(pss) / static_cast<double>(one) : 0.0);
    std::fflush(stdout);
  }
  for (pid_t p : pids) kill_pid(p);
  run_cmd({kLazycr, "clone", "--socket", t.sock, "--stop"});
  usleep(500000);
  reap_zombies();
  fs::remove_all(work);
  return 0;
}

int main(int argc, char** argv) {
  std::vector<int> sizes{64, 512}, pss_points{1, 10, 50};
  int runs = 10, loop = 20, tree_mib = 0;
  bool small_pages = false;
  auto list = [](const std::string& v) {
    std::vector<int> out;
    std::stringstream in(v);
    std::string item;
    while (std::getline(in, item, ',')) out.push_back(std::atoi(item.c_str()));
    return out;
  };
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--mib")
      sizes = list(v);
    else if (k == "--pss")
      pss_points = list(v);
    else if (k == "--runs")
      runs = std::atoi(v.c_str());
    else if (k == "--loop")
      loop = std::atoi(v.c_str());
    else if (k == "--tree")
      tree_mib = std::atoi(v.c_str());
    else if (k == "--tree-pages")
      small_pages = v == "small";
    else
      die("usage: clone_bench [--mib 64,512 | --tree MIB] [--runs N] [--pss 1,10,50] [--loop N]");
  }
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  if (tree_mib > 0) return run_tree(tree_mib, runs, pss_points, small_pages);
  std::printf(
      "| MiB | template | hold ms | clone: request->first instr (median / best) | clone: command "
      "wall | clones/s | restore --lazy --pidns: first instr | restore: command wall |\n");
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
    // The two templates hold the image's PIDs, so they run one after the other: huge pages,
    // small pages, huge pages again (rows per block; lazy restores interleaved in each block).
    const char* kinds[] = {"huge pages", "--small-pages", "huge pages"};
    for (int block = 0; block < 3; block++) {
      Template t;
      t.name = kinds[block];
      t.sock = (work / ("t" + std::to_string(block) + ".sock")).string();
      std::vector<std::string> args{kLazycr,    "template", "-D", (work / "image").string(),
                                    "--socket", t.sock,     "-d"};
      if (block == 1) args.push_back("--small-pages");
      int o[2];
      if (pipe2(o, O_CLOEXEC) != 0) die("pipe");
      double t0 = now_ms();
      pid_t tp = spawn(args, o[1], -1);
      close(o[1]);
      std::string line = read_all(o[0]);
      close(o[0]);
      if (wait_exit(tp) != 0) die("template failed");
      t.hold_ms = now_ms() - t0;
      t.pid = std::atoi(line.c_str());
      usleep(300000);  // the next clone's namespace is made right after the template is held
      Series first_restore, wall_restore;
      const std::string stats = (work / "stats.json").string();
      for (int r = 0; r < runs; r++) {
        kill_pid(clone_once(t, stats, true));
        usleep(50000);  // (the template makes the next namespace meanwhile)
        int ro[2], re[2];
        if (pipe2(ro, O_CLOEXEC) != 0 || pipe2(re, O_CLOEXEC) != 0) die("pipe");
        double c0 = now_ms();
        pid_t p = spawn(
            {kLazycr, "-v", "restore", "-D", (work / "image").string(), "--lazy", "--pidns", "-d"},
            ro[1], re[1]);
        close(ro[1]);
        close(re[1]);
        std::string pid_line = read_all(ro[0]);
        std::string text = read_all(re[0]);
        close(ro[0]);
        close(re[0]);
        if (wait_exit(p) != 0) die("restore failed: " + text);
        wall_restore.v.push_back(now_ms() - c0);
        first_restore.v.push_back(number_after(text, "first instruction after ") / 1000);
        kill_pid(std::atoi(pid_line.c_str()));
        usleep(100000);
        reap_zombies();
      }
      // Clones per second: back to back, killed afterwards.
      std::vector<pid_t> pids;
      const double l0 = now_ms();
      for (int i = 0; i < loop; i++) pids.push_back(clone_once(t, stats, false));
      const double per_s = loop * 1000.0 / (now_ms() - l0);
      for (pid_t p : pids) kill_pid(p);
      usleep(200000);
      reap_zombies();
      std::printf(
          "| %d | %s | %.0f | %.2f / %.2f ms | %.1f / %.1f ms | %.0f | %.2f / %.2f ms | "
          "%.1f / %.1f ms |\n",
          mib, t.name.c_str(), t.hold_ms, t.first.median(), t.first.best(), t.wall.median(),
          t.wall.best(), per_s, first_restore.median(), first_restore.best(), wall_restore.median(),
          wall_restore.best());
      std::fflush(stdout);
      if (block < 2) {  // total PSS of the held process and N idle clones
        pids.clear();
        for (int n : pss_points) {
          while (static_cast<int>(pids.size()) < n) pids.push_back(clone_once(t, stats, false));
          usleep(500000);
          const pid_t held = held_of(t.pid, pids);
          const uint64_t one = rollup_kb(held, "Rss");
          uint64_t pss = rollup_kb(held, "Pss");
          for (pid_t p : pids) pss += rollup_kb(p, "Pss");
          std::printf(
              "PSS %d MiB, %s: template + %d clones %.1f MiB, one copy (template RSS) "
              "%.1f MiB, ratio %.3f; template AnonHugePages %.0f MiB\n",
              mib, t.name.c_str(), n, pss / 1024.0, one / 1024.0,
              one ? static_cast<double>(pss) / static_cast<double>(one) : 0.0,
              rollup_kb(held, "AnonHugePages") / 1024.0);
          std::fflush(stdout);
        }
        for (pid_t p : pids) kill_pid(p);
        usleep(200000);
        reap_zombies();
      }
      const pid_t held = held_of(t.pid, {});
      run_cmd({kLazycr, "clone", "--socket", t.sock, "--stop"});
      // The next template takes the same PIDs: wait until this one's held process is gone.
      for (int i = 0; i < 3000 && held > 0 && kill(held, 0) == 0; i++) {
        usleep(10000);
        reap_zombies();
      }
      usleep(200000);
      reap_zombies();
    }
    fs::remove_all(work);
  }
  return 0;
}
