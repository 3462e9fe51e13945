// Restore figures (issue: eager `lazycr restore`): for state_target holding 64 MiB, 512 MiB
// and 2 GiB, and areas_target with 5,000 areas, prints
// - restore time: `lazycr restore --detach` from command start until it returns (the process
//   runs),
// - time to verified: command start until the restored target printed "verified ok" (the
//   verify file exists before the restore, so it checks every byte as soon as it runs),
// - lazycr's own breakdown (validate, memory = map + fill + protect), pages written and the
//   fill rate, the system calls run inside the process, and the ptrace round trips that ran
//   them (single calls, or batches of calls) with their total and mean time.
// Each row is the median of --runs runs (default 3). Usage:
//   restore_bench [--runs N] [--sizes 64,512,2048] [--areas 5000]
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <boost/filesystem.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
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

// The number right after `key` in text (0 if absent).
double number_after(const std::string& text, const std::string& key) {
  auto pos = text.find(key);
  if (pos == std::string::npos) return 0;
  return std::strtod(text.c_str() + pos + key.size(), nullptr);
}
// The number right before " key" in text (0 if absent).
double number_before(const std::string& text, const std::string& key) {
  auto pos = text.find(" " + key);
  if (pos == std::string::npos || pos == 0) return 0;
  size_t start = text.rfind(' ', pos - 1);
  start = start == std::string::npos ? 0 : start + 1;
  return std::strtod(text.c_str() + start, nullptr);
}

struct Sample {
  double restore_ms = 0, verified_ms = 0, total_ms = 0, validate_ms = 0, memory_ms = 0;
  double pages = 0, injected = 0, round_trips = 0, inject_ms = 0;
};

struct Row {
  std::string name;
  double resident_mib = 0, image_mib = 0;
  uint64_t areas = 0;
  std::vector<Sample> samples;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Starts a target, dumps it (killed), then restores the image `runs` times.
Row measure(const std::string& name, const std::vector<std::string>& target_args, int runs) {
  Row row;
  row.name = name;
  std::string work = (fs::temp_directory_path() / fs::unique_path("lazycr-rbench-%%%%%%")).string();
  fs::create_directories(work);
  std::string verify = work + "/verify", dir = work + "/img";
  std::vector<std::string> targv = target_args;
  targv.insert(targv.end(), {"--verify-file", verify, "--workdir", work});
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) die("pipe");
  // stderr /dev/null (restorable): a terminal or pipe there would become lazycr's own stderr
  // with --shell-job, and lazycr's stderr pipe below would stay open.
  int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
  pid_t target = spawn(targv, out[1], null);
  close(null);
  close(out[1]);
  std::string ready = read_line(out[0]);
  close(out[0]);
  if (ready.rfind("ready", 0) != 0) die(name + ": target did not start: " + ready);
  std::string err;
  if (run_cmd({LAZYCR_BIN, "dump", "-t", std::to_string(target), "-D", dir}, &err) != 0)
    die(name + ": dump failed: " + err);
  wait_exit(target);
  for (auto& e : fs::directory_iterator(dir)) row.image_mib += fs::file_size(e.path()) / 1048576.0;
  std::ofstream(verify) << "go";

  for (int i = 0; i < runs; i++) {
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) != 0 || pipe2(e, O_CLOEXEC) != 0) die("pipe");
    double t0 = now_ms();
    pid_t lz =
        spawn({LAZYCR_BIN, "-v", "restore", "-D", dir, "--shell-job", "--detach"}, o[1], e[1]);
    close(o[1]);
    close(e[1]);
    std::string pid_line = read_line(o[0]);
    std::string log = read_all(e[0]);  // EOF when lazycr exits (the target keeps only fd 1)
    int rc = wait_exit(lz);
    double t_running = now_ms();
    if (rc != 0) die(name + ": restore failed: " + log);
    std::string verdict = read_line(o[0]);
    double t_verified = now_ms();
    close(o[0]);
    close(e[0]);
    pid_t restored = std::atoi(pid_line.c_str());
    if (restored <= 0) die(name + ": no pid from lazycr: " + pid_line);
    int code = wait_exit(restored);  // re-parented to us (we are a child subreaper)
    if (verdict != "verified ok" || code != 0)
      die(name + ": restored target said '" + verdict + "', exit " + std::to_string(code));
    Sample s;
    s.restore_ms = t_running - t0;
    s.verified_ms = t_verified - t0;
    s.total_ms = number_after(log, "pages written in ") / 1000;
    s.validate_ms = number_after(log, "(validate ") / 1000;
    s.memory_ms = number_after(log, "memory ") / 1000;
    s.pages = number_before(log, "pages written");
    s.injected = number_before(log, "injected syscalls");
    s.round_trips = number_after(log, "injected syscalls in ");
    s.inject_ms = number_after(log, "ptrace round trips, ") / 1000;
    row.areas = static_cast<uint64_t>(number_before(log, "areas,"));
    row.samples.push_back(s);
  }
  fs::remove_all(work);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 3;
  std::vector<int> sizes = {64, 512, 2048};
  int areas = 5000;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--sizes" && i + 1 < argc) {
      sizes.clear();
      std::istringstream in(argv[++i]);
      std::string item;
      while (std::getline(in, item, ',')) sizes.push_back(std::atoi(item.c_str()));
    } else if (a == "--areas" && i + 1 < argc) {
      areas = std::atoi(argv[++i]);
    } else {
      die("usage: restore_bench [--runs N] [--sizes 64,512,2048] [--areas 5000]");
    }
  }
  // Restored processes are re-parented to us when lazycr --detach exits.
  prctl(PR_SET_CHILD_SUBREAPER, 1);

  std::vector<Row> rows;
  for (int mib : sizes) {
    Row r = measure(
        std::to_string(mib) + " MiB state_target",
        {std::string(LAZYCR_TARGETS_DIR) + "/state_target", "--mib", std::to_string(mib)}, runs);
    r.resident_mib = mib;
    rows.push_back(r);
  }
  if (areas > 0) {
    Row r = measure(
        std::to_string(areas) + "-area areas_target",
        {std::string(LAZYCR_TARGETS_DIR) + "/areas_target", "--areas", std::to_string(areas)},
        runs);
    rows.push_back(r);
  }

  std::printf(
      "restore_bench: median of %d runs; restore = command start to process running "
      "(--detach returns), verified = to the target's \"verified ok\"\n\n",
      runs);
  std::printf(
      "| target | areas | image MiB | restore ms | verified ms | validate ms | memory ms | "
      "pages written | fill MiB/s | injected syscalls | ptrace round trips | "
      "round trips ms | us/round trip |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : rows) {
    auto col = [&](double Sample::*m) {
      std::vector<double> v;
      for (const auto& s : r.samples) v.push_back(s.*m);
      return median(v);
    };
    double pages = col(&Sample::pages), mem = col(&Sample::memory_ms);
    double inj = col(&Sample::injected), trips = col(&Sample::round_trips);
    double inj_ms = col(&Sample::inject_ms);
    std::printf(
        "| %s | %llu | %.1f | %.1f | %.1f | %.1f | %.1f | %.0f | %.0f | %.0f | %.0f | "
        "%.1f | %.1f |\n",
        r.name.c_str(), static_cast<unsigned long long>(r.areas), r.image_mib,
        col(&Sample::restore_ms), col(&Sample::verified_ms), col(&Sample::validate_ms), mem, pages,
        mem > 0 ? pages * 4096 / 1048576.0 / (mem / 1000) : 0, inj, trips, inj_ms,
        trips > 0 ? inj_ms * 1000 / trips : 0);
  }
  return 0;
}
