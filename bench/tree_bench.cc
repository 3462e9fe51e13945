// Process-tree figures (issue 6) for the pre-fork server (prefork_target: a parent with --mib
// MiB, default 256, and --workers workers, default 4, each of which dirtied 1/(2W) of it):
// - the original tree's total RSS and PSS (sum over every task of /proc/PID/smaps_rollup),
// - per image, with the shared-page dedup (default) and without (--no-dedup): image size, dump
//   wall time (command start to exit) and lazycr's frozen time (both dumps --leave-running of
//   the same tree, which then verifies itself: the dumps must not disturb it),
// - eager restore (--detach): wall time until lazycr returns, lazycr's own time to first
//   instruction (-v), and the restored tree's total RSS and PSS before it runs on,
// - lazy restore (--detach): wall time until lazycr returns, time to first instruction and
//   time until nothing is owed (the page server's stats), and the time until every task has
//   verified its whole memory (the verify request is there before the restore starts);
// every restored tree verifies itself (each task "VERIFY ... ok"), or the figure is refused.
// Each figure is the median of --runs runs (default 3). A step that fails is reported in the
// table with lazycr's error, and the rest still runs. Usage:
//   tree_bench [--runs N] [--mib 256] [--workers 4]
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bench/process_util.h"

namespace {

namespace fs = boost::filesystem;

using lazycr::bench::die;
using lazycr::bench::now_ms;
using lazycr::bench::read_all;
using lazycr::bench::read_line;
using lazycr::bench::run_cmd;
using lazycr::bench::spawn;
using lazycr::bench::wait_exit;

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The number right after `key` in text, nullopt if absent.
std::optional<double> number_after(const std::string& text, const std::string& key) {
  auto pos = text.find(key);
  if (pos == std::string::npos) return std::nullopt;
  return std::strtod(text.c_str() + pos + key.size(), nullptr);
}

// The first line of lazycr's stderr (its one-line error) and its exit code.
std::string failure(const std::string& text, int code) {
  std::string line = text.substr(0, text.find('\n'));
  return (line.empty() ? "(no message)" : line) + " [exit " + std::to_string(code) + "]";
}

// Children of pid ({} if it is gone).
std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  boost::system::error_code ec;
  for (fs::directory_iterator t("/proc/" + std::to_string(pid) + "/task", ec), end; !ec && t != end;
       t.increment(ec)) {
    std::istringstream in(read_file(t->path().string() + "/children"));
    pid_t c;
    while (in >> c) out.push_back(c);
  }
  return out;
}

// After a failed restore: whatever it left (re-parented to us, a subreaper) is killed and
// reaped, so that the next restore finds the PIDs free.
void kill_leftovers() {
  for (int round = 0; round < 1000; round++) {
    std::vector<pid_t> all, todo{getpid()};
    while (!todo.empty()) {
      pid_t p = todo.back();
      todo.pop_back();
      for (pid_t c : children_of(p)) {
        all.push_back(c);
        todo.push_back(c);
      }
    }
    for (pid_t p : all)
      if (p > 0) kill(p, SIGKILL);
    int status;
    while (waitpid(-1, &status, WNOHANG) > 0) {
    }
    if (all.empty()) return;
    usleep(2000);
  }
}

// Total Rss and Pss (MiB) of pid and every process below it.
std::pair<double, double> tree_memory(pid_t root) {
  double rss = 0, pss = 0;
  std::vector<pid_t> todo{root};
  while (!todo.empty()) {
    pid_t p = todo.back();
    todo.pop_back();
    std::string text = read_file("/proc/" + std::to_string(p) + "/smaps_rollup");
    rss += number_after(text, "\nRss:").value_or(0) / 1024;
    pss += number_after(text, "\nPss:").value_or(0) / 1024;
    for (pid_t c : children_of(p)) todo.push_back(c);
  }
  return {rss, pss};
}

double dir_mib(const std::string& dir) {
  double bytes = 0;
  for (auto& e : fs::directory_iterator(dir)) bytes += fs::file_size(e.path());
  return bytes / 1048576.0;
}

// Reads `tasks` verdict lines from fd; every one must be "VERIFY ... ok".
void expect_verified(int fd, int tasks, const std::string& what) {
  for (int i = 0; i < tasks; i++) {
    std::string line = read_line(fd);
    if (line.rfind("VERIFY ", 0) != 0 || line.size() < 3 || line.substr(line.size() - 3) != " ok")
      die(what + ": the tree did not verify: '" + line + "'");
  }
}

struct Options {
  int runs = 3, workers = 4;
  size_t mib = 256;
};

// One image (dedup or not) and what was measured with it in each run.
struct Image {
  std::string name, dir, error;
  std::vector<double> mib, dump_ms, frozen_ms, restore_ms, restore_first_ms, rss, pss;
  std::vector<double> lazy_ms, lazy_first_ms, lazy_verified_ms, lazy_served_ms;
};

struct Run {
  std::string work, verify;
  int tasks = 0;

  void go() { std::ofstream(verify) << "go"; }
  void stop() { fs::remove(verify); }
};

// Restores img eagerly (detached), measures the tree's memory before it runs on, lets it
// verify itself.
void restore_eager(Run& run, Image& img) {
  int o[2], e[2];
  if (pipe2(o, O_CLOEXEC) != 0 || pipe2(e, O_CLOEXEC) != 0) die("pipe");
  double t0 = now_ms();
  pid_t lz =
      spawn({LAZYCR_BIN, "-v", "restore", "-D", img.dir, "--shell-job", "--detach"}, o[1], e[1]);
  close(o[1]);
  close(e[1]);
  std::string pid_line = read_line(o[0]);
  std::string log = read_all(e[0]);
  int rc = wait_exit(lz);
  double t1 = now_ms();
  pid_t root = std::atoi(pid_line.c_str());
  if (rc != 0 || root <= 0) {
    img.error = "eager restore: " + failure(log, rc);
    close(o[0]);
    close(e[0]);
    kill_leftovers();
    return;
  }
  auto [rss, pss] = tree_memory(root);
  run.go();
  expect_verified(o[0], run.tasks, img.name + " eager restore");
  close(o[0]);
  close(e[0]);
  if (int code = wait_exit(root); code != 0)
    die(img.name + ": restored root exited " + std::to_string(code));
  run.stop();
  img.restore_ms.push_back(t1 - t0);
  if (auto us = number_after(log, "first instruction after "))
    img.restore_first_ms.push_back(*us / 1000);
  img.rss.push_back(rss);
  img.pss.push_back(pss);
}

// Restores img lazily (detached): first instruction, and the time until every task verified.
void restore_lazy(Run& run, Image& img) {
  std::string stats = run.work + "/stats.json", spid = run.work + "/server.pid";
  fs::remove(stats);
  fs::remove(spid);
  int o[2], e[2];
  if (pipe2(o, O_CLOEXEC) != 0 || pipe2(e, O_CLOEXEC) != 0) die("pipe");
  run.go();  // each task verifies as soon as it runs
  double t0 = now_ms();
  pid_t lz = spawn({LAZYCR_BIN, "-v", "restore", "--lazy", "-D", img.dir, "--shell-job", "--detach",
                    "--stats", stats, "--server-pidfile", spid},
                   o[1], e[1]);
  close(o[1]);
  close(e[1]);
  std::string pid_line = read_line(o[0]);
  // lazycr's stderr is read after it exits: the page server keeps a copy of it open.
  int rc = wait_exit(lz);
  double t1 = now_ms();
  pid_t root = std::atoi(pid_line.c_str());
  if (rc != 0 || root <= 0) {
    run.stop();
    kill_leftovers();
    img.error = "lazy restore: " + failure(read_all(e[0]), rc);
    close(o[0]);
    close(e[0]);
    return;
  }
  expect_verified(o[0], run.tasks, img.name + " lazy restore");
  double t2 = now_ms();
  close(o[0]);
  if (int code = wait_exit(root); code != 0)
    die(img.name + ": lazily restored root exited " + std::to_string(code));
  pid_t server = std::atoi(read_file(spid).c_str());
  if (server > 0) wait_exit(server);  // re-parented to us; its stats are complete then
  read_all(e[0]);
  close(e[0]);
  run.stop();
  img.lazy_ms.push_back(t1 - t0);
  img.lazy_verified_ms.push_back(t2 - t0);
  std::string j = read_file(stats);
  if (auto ns = number_after(j, "\"time_to_first_instruction_ns\":"))
    img.lazy_first_ms.push_back(*ns / 1e6);
  if (auto ns = number_after(j, "\"time_until_nothing_owed_ns\":"))
    img.lazy_served_ms.push_back(*ns / 1e6);
}

// One run: a fresh tree, both dumps of it, then each image restored eagerly and lazily.
void one_run(const Options& opt, std::vector<Image>& images, std::vector<double>& orig_rss,
             std::vector<double>& orig_pss) {
  Run run;
  run.work = (fs::temp_directory_path() / fs::unique_path("lazycr-tbench-%%%%%%")).string();
  fs::create_directories(run.work);
  run.verify = run.work + "/verify";
  run.tasks = opt.workers + 1;
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) die("pipe");
  // stderr /dev/null (restorable): a terminal or pipe there would become lazycr's own stderr
  // with --shell-job and keep lazycr's stderr pipe open.
  int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
  pid_t first = spawn({std::string(LAZYCR_TARGETS_DIR) + "/prefork_target", "--mib",
                       std::to_string(opt.mib), "--workers", std::to_string(opt.workers),
                       "--setsid", "--verify-file", run.verify, "--workdir", run.work},
                      out[1], null);
  close(null);
  close(out[1]);
  std::string ready = read_line(out[0]);
  if (ready.rfind("ready pid=", 0) != 0) die("prefork_target did not start: " + ready);
  pid_t root = std::atoi(ready.c_str() + 10);
  if (first != root) wait_exit(first);  // it forked to make the session leader
  auto [rss, pss] = tree_memory(root);
  orig_rss.push_back(rss);
  orig_pss.push_back(pss);

  for (auto& img : images) {
    img.dir = run.work + "/" + img.name;
    std::vector<std::string> args{LAZYCR_BIN, "dump",           "-t", std::to_string(root), "-D",
                                  img.dir,    "--leave-running"};
    if (img.name == "no-dedup") args.push_back("--no-dedup");
    std::string err;
    double t0 = now_ms();
    int rc = run_cmd(args, &err);
    double t1 = now_ms();
    if (rc != 0) {
      img.error = "dump: " + failure(err, rc);
      continue;
    }
    img.dump_ms.push_back(t1 - t0);
    if (auto f = number_after(err, "frozen ")) img.frozen_ms.push_back(*f);
    img.mib.push_back(dir_mib(img.dir));
  }
  // The original, dumped twice and left running, is intact.
  run.go();
  expect_verified(out[0], run.tasks, "the original after its dumps");
  close(out[0]);
  if (int code = wait_exit(root); code != 0) die("original root exited " + std::to_string(code));
  run.stop();

  for (auto& img : images) {
    if (!img.error.empty()) continue;
    restore_eager(run, img);
    if (!img.error.empty()) continue;
    restore_lazy(run, img);
  }
  fs::remove_all(run.work);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string cell(const std::vector<double>& v, const char* fmt = "%.1f") {
  if (v.empty()) return "n/a";
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, median(v));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc)
      opt.runs = std::atoi(argv[++i]);
    else if (a == "--mib" && i + 1 < argc)
      opt.mib = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--workers" && i + 1 < argc)
      opt.workers = std::atoi(argv[++i]);
    else
      die("usage: tree_bench [--runs N] [--mib 256] [--workers 4]");
  }
  // Restored trees are re-parented to us when lazycr --detach exits, and so is the root of
  // the original (a session leader made by a fork).
  prctl(PR_SET_CHILD_SUBREAPER, 1);

  std::vector<Image> images(2);
  images[0].name = "dedup";
  images[1].name = "no-dedup";
  std::vector<double> orig_rss, orig_pss;
  for (int r = 0; r < opt.runs; r++) one_run(opt, images, orig_rss, orig_pss);

  std::printf(
      "tree_bench: prefork_target, parent %zu MiB, %d workers (each dirtied %zu MiB of it), "
      "median of %d runs\n\n",
      opt.mib, opt.workers, opt.mib / (2 * opt.workers), opt.runs);
  std::printf("original tree: RSS %s MiB, PSS %s MiB (sum over %d tasks)\n\n",
              cell(orig_rss).c_str(), cell(orig_pss).c_str(), opt.workers + 1);
  std::printf(
      "| image | image MiB | dump ms | frozen ms | eager restore ms | eager first instr. ms | "
      "RSS after eager MiB | PSS after eager MiB | lazy restore ms | lazy first instr. ms | "
      "lazy all verified ms | lazy nothing owed ms |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& img : images) {
    std::printf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", img.name.c_str(),
                cell(img.mib).c_str(), cell(img.dump_ms).c_str(), cell(img.frozen_ms).c_str(),
                cell(img.restore_ms).c_str(), cell(img.restore_first_ms).c_str(),
                cell(img.rss).c_str(), cell(img.pss).c_str(), cell(img.lazy_ms).c_str(),
                cell(img.lazy_first_ms).c_str(), cell(img.lazy_verified_ms).c_str(),
                cell(img.lazy_served_ms).c_str());
  }
  for (const auto& img : images)
    if (!img.error.empty()) std::printf("\n%s: %s\n", img.name.c_str(), img.error.c_str());
  return 0;
}
