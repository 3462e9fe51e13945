// Many lazy restores of one image at once (issue 10): state_target holding --mib MiB is dumped
// once, then restored N times concurrently (`lazycr restore --lazy --pidns -d`, prefetch on,
// every copy in its own PID namespace), each copy verifying every byte of itself as soon as it
// runs (the verify file exists before the restores start). Per N (--counts, default 1,20,50):
// - time to all verified: from starting the first lazycr to the last "verified ok";
// - the page servers' memory: the peak of the sum of VmRSS over every live lazycr-server and
//   lazycr-guardian (sampled every 2 ms), and the sum over the servers of their last VmHWM
//   (peak RSS) seen before they exited;
// - first instruction: median and max of lazycr's own measure (-v).
// Usage: concurrent_lazy_bench [--mib 64] [--counts 1,20,50]
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/filesystem.hpp>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/process_util.h"

namespace {

namespace fs = boost::filesystem;
using lazycr::bench::die;
using lazycr::bench::now_ms;
using lazycr::bench::read_all;
using lazycr::bench::read_line;
using lazycr::bench::spawn;
using lazycr::bench::wait_exit;

// "VmRSS:" or "VmHWM:" of pid in KiB, -1 if gone.
long status_kib(pid_t pid, const char* key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::atol(line.c_str() + std::strlen(key));
  return -1;
}

// Live processes named lazycr-server or lazycr-guardian.
std::vector<std::pair<pid_t, bool>> helpers() {  // (pid, is_server)
  std::vector<std::pair<pid_t, bool>> out;
  for (auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name[0] < '0' || name[0] > '9') continue;
    std::ifstream in(e.path().string() + "/comm");
    std::string comm;
    std::getline(in, comm);
    if (comm == "lazycr-server" || comm == "lazycr-guardian")
      out.push_back({std::atoi(name.c_str()), comm == "lazycr-server"});
  }
  return out;
}

struct Result {
  double all_verified_ms = 0;
  double peak_total_rss_mib = 0;
  double sum_server_hwm_mib = 0;
  double first_p50_ms = 0, first_max_ms = 0;
};

Result run(const std::string& dir, int n) {
  std::atomic<bool> sampling{true};
  long peak_kib = 0;
  std::map<pid_t, long> hwm;  // servers: last VmHWM seen
  std::thread sampler([&] {
    while (sampling) {
      long total = 0;
      for (auto [pid, server] : helpers()) {
        long rss = status_kib(pid, "VmRSS:");
        if (rss > 0) total += rss;
        if (server) {
          long h = status_kib(pid, "VmHWM:");
          if (h > 0) hwm[pid] = std::max(hwm[pid], h);
        }
      }
      peak_kib = std::max(peak_kib, total);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  std::vector<int> outs(n), errs(n);
  std::vector<pid_t> lz(n);
  const double t0 = now_ms();
  for (int i = 0; i < n; i++) {
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) != 0 || pipe2(e, O_CLOEXEC) != 0) die("pipe");
    lz[i] =
        spawn({LAZYCR_BIN, "-v", "restore", "--lazy", "--pidns", "-d", "--shell-job", "-D", dir},
              o[1], e[1]);
    close(o[1]);
    close(e[1]);
    outs[i] = o[0];
    errs[i] = e[0];
  }
  std::vector<double> first;
  for (int i = 0; i < n; i++) {
    std::string pid_line = read_line(outs[i]);
    std::string log = read_all(errs[i]);  // the detached server keeps none of it
    close(errs[i]);
    if (wait_exit(lz[i]) != 0 || pid_line.empty()) die("restore failed: " + log);
    auto pos = log.find("first instruction after ");
    if (pos != std::string::npos) first.push_back(std::atof(log.c_str() + pos + 24) / 1000.0);
  }
  for (int i = 0; i < n; i++) {
    std::string verdict = read_line(outs[i]);
    if (verdict != "verified ok") die("copy " + std::to_string(i) + " said '" + verdict + "'");
  }
  Result r;
  r.all_verified_ms = now_ms() - t0;
  for (int fd : outs) close(fd);
  // Reapers (with their restored process), servers and guardians are ours (subreaper).
  while (true) {
    int status;
    pid_t p = waitpid(-1, &status, 0);
    if (p < 0 && errno == EINTR) continue;
    if (p < 0) break;
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
      die("pid " + std::to_string(p) + " exited with " + std::to_string(WEXITSTATUS(status)));
  }
  sampling = false;
  sampler.join();
  r.peak_total_rss_mib = peak_kib / 1024.0;
  for (auto& [pid, h] : hwm) r.sum_server_hwm_mib += h / 1024.0;
  std::sort(first.begin(), first.end());
  if (!first.empty()) {
    r.first_p50_ms = first[first.size() / 2];
    r.first_max_ms = first.back();
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int mib = 64;
  std::vector<int> counts{1, 20, 50};
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--mib" && i + 1 < argc) {
      mib = std::atoi(argv[++i]);
    } else if (a == "--counts" && i + 1 < argc) {
      counts.clear();
      std::stringstream s(argv[++i]);
      std::string c;
      while (std::getline(s, c, ',')) counts.push_back(std::atoi(c.c_str()));
    } else {
      std::fprintf(stderr, "usage: concurrent_lazy_bench [--mib 64] [--counts 1,20,50]\n");
      return 2;
    }
  }
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  const std::string work =
      (fs::temp_directory_path() / fs::unique_path("lazycr-cbench-%%%%%%")).string();
  fs::create_directories(work);
  const std::string verify = work + "/verify", dir = work + "/img";
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) die("pipe");
  int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
  pid_t target = spawn({std::string(LAZYCR_TARGETS_DIR) + "/state_target", "--mib",
                        std::to_string(mib), "--verify-file", verify, "--workdir", work},
                       out[1], null);
  close(out[1]);
  std::string ready = read_line(out[0]);
  close(out[0]);
  if (ready.rfind("ready", 0) != 0) die("target did not start: " + ready);
  int e[2];
  if (pipe2(e, O_CLOEXEC) != 0) die("pipe");
  pid_t d = spawn({LAZYCR_BIN, "dump", "-t", std::to_string(target), "-D", dir}, null, e[1]);
  close(e[1]);
  std::string err = read_all(e[0]);
  close(e[0]);
  if (wait_exit(d) != 0) die("dump failed: " + err);
  wait_exit(target);
  close(null);
  std::ofstream(verify) << "go";  // every copy verifies itself as soon as it runs
  std::printf("state_target %d MiB, lazy restores at once (--pidns, prefetch on)\n", mib);
  std::printf("%6s %16s %22s %22s %18s\n", "copies", "all verified ms", "servers+guardians RSS",
              "sum of servers' peak", "first instr p50/max");
  for (int n : counts) {
    Result r = run(dir, n);
    std::printf("%6d %16.0f %18.1f MiB %18.1f MiB %10.1f/%.1f ms\n", n, r.all_verified_ms,
                r.peak_total_rss_mib, r.sum_server_hwm_mib, r.first_p50_ms, r.first_max_ms);
    std::fflush(stdout);
  }
  fs::remove_all(work);
  return 0;
}
