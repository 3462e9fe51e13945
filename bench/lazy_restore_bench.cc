// Lazy restore figures (issue 5: `lazycr restore --lazy`), against the eager restore, for
// state_target holding 64 MiB, 512 MiB and 2 GiB (semi-compressible pattern). For each size
// the target is dumped (killed) once, then restored --runs times each way:
// - first instruction: command start until `lazycr restore --detach` returns (every thread
//   runs), as seen by this program ("wall": includes starting lazycr), and lazycr's own
//   measure from its main() ("lazycr");
// - verified: command start until the restored target printed "verified ok" (the verify file
//   exists before the restore, so it checks every byte as soon as it runs): eager, lazy with
//   prefetch, lazy without prefetch (every page by a fault);
// - the lazy run's page server stats (--stats): faults, fault service latency p50/p99 (the
//   server's measure: fault message read -> the fill that woke the thread), pages by fault
//   and by prefetch, time until nothing was owed;
// - drain: a lazy restore whose target stays idle (no verify file yet): owed bytes divided by
//   the time from the server's start to nothing owed; then the target verifies.
// Then, for one size (--pin-size, default 512), the same lazy runs with lazycr, the restored
// process and the page server pinned: server and process on the same CPU (0), on different
// CPUs (process 0, server 1; the process pinned once the restore has returned: lazycr refuses a
// --server-cpu outside its own CPUs, which the process inherits), and unpinned.
// Then, for each of --privileged-sizes (default 1024; state_target is root, so its image is
// privileged: a restore checks its MAC unless --trust-image), incompressible pages (the worst
// case for checking what the MAC covers): first instruction of a lazy restore and time to the
// target's self-verification of an eager one, MAC checked against --trust-image (the cost of
// an unprivileged image), and fault latency (prefetch off, MAC checked); with --before
// PATH, the same for another lazycr binary (say the build before a change), dumping its own
// image, in the same run.
// Each figure is the median of --runs runs (default 3). Usage:
//   lazy_restore_bench [--runs N] [--sizes 64,512,2048] [--pin-size 512|0] [--frame-size S]
//                      [--privileged-sizes 1024] [--before PATH]
// (--frame-size: the dump's page-store frame size; fault latency is mostly decompressing one;
// an empty --sizes or --privileged-sizes skips that part.)
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
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
#include <functional>
#include <map>
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

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// The number after "key": in JSON text (first occurrence), 0 if absent.
double json_number(const std::string& text, const std::string& key) {
  auto pos = text.find("\"" + key + "\":");
  if (pos == std::string::npos) return 0;
  return std::strtod(text.c_str() + pos + key.size() + 3, nullptr);
}
double number_after(const std::string& text, const std::string& key) {
  auto pos = text.find(key);
  if (pos == std::string::npos) return 0;
  return std::strtod(text.c_str() + pos + key.size(), nullptr);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// CPU placement of lazycr (and so of the restored process, which gets lazycr's CPU mask) and
// of the page server.
struct Placement {
  std::string name;
  int process_cpu = -1;  // -1: unpinned
  int server_cpu = -1;
  // lazycr refuses a --server-cpu outside its own CPUs, and the restored process inherits
  // lazycr's: to have them apart, lazycr runs unpinned and the restored process's threads are
  // pinned once the restore has returned, before the verify file is written.
  bool pin_after = false;
};

// Pins every thread of `pid` to `cpu`.
void pin_threads(pid_t pid, int cpu) {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  for (auto& t : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task"))
    sched_setaffinity(std::atoi(t.path().filename().c_str()), sizeof one, &one);
}

// One restore: figures of interest (ms, us, counts).
using Sample = std::map<std::string, double>;

class Bench {
 public:
  Bench(int mib, int runs, const std::string& frame_size, const std::string& pattern = "semi",
        const std::string& bin = LAZYCR_BIN)
      : runs_(runs), bin_(bin) {
    work_ = (fs::temp_directory_path() / fs::unique_path("lazycr-lbench-%%%%%%")).string();
    fs::create_directories(work_);
    verify_ = work_ + "/verify";
    dir_ = work_ + "/img";
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) die("pipe");
    int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    pid_t target =
        spawn({std::string(LAZYCR_TARGETS_DIR) + "/state_target", "--mib", std::to_string(mib),
               "--pattern", pattern, "--verify-file", verify_, "--workdir", work_},
              out[1], null);
    close(null);
    close(out[1]);
    std::string ready = read_line(out[0]);
    close(out[0]);
    if (ready.rfind("ready", 0) != 0) die("target did not start: " + ready);
    int e[2];
    if (pipe2(e, O_CLOEXEC) != 0) die("pipe");
    std::vector<std::string> dump{bin_, "dump", "-t", std::to_string(target), "-D", dir_};
    if (!frame_size.empty()) {
      dump.push_back("--frame-size");
      dump.push_back(frame_size);
    }
    pid_t d = spawn(dump, -1, e[1]);
    close(e[1]);
    std::string err = read_all(e[0]);
    close(e[0]);
    if (wait_exit(d) != 0) die("dump failed: " + err);
    wait_exit(target);
    for (auto& f : fs::directory_iterator(dir_)) image_mib_ += fs::file_size(f.path()) / 1048576.0;
  }
  ~Bench() { fs::remove_all(work_); }

  double image_mib() const { return image_mib_; }

  // One restore; `lazy_args` empty: eager. `verify_first`: the target checks itself at once;
  // otherwise it idles until the page server has finished, then checks itself.
  Sample restore(bool lazy, std::vector<std::string> lazy_args, bool verify_first,
                 const Placement& where, const std::vector<std::string>& restore_args = {}) {
    fs::remove(verify_);
    if (verify_first && !where.pin_after) std::ofstream(verify_) << "go";
    std::string stats = work_ + "/stats.json", spid = work_ + "/server.pid";
    fs::remove(stats);
    fs::remove(spid);
    std::vector<std::string> args{bin_, "-v", "restore", "-D", dir_, "--shell-job", "--detach"};
    args.insert(args.end(), restore_args.begin(), restore_args.end());
    if (lazy) {
      for (const std::string& a : {std::string("--lazy"), std::string("--stats"), stats,
                                   std::string("--server-pidfile"), spid})
        args.push_back(a);
      if (where.server_cpu >= 0) {
        args.push_back("--server-cpu");
        args.push_back(std::to_string(where.server_cpu));
      }
      args.insert(args.end(), lazy_args.begin(), lazy_args.end());
    }
    cpu_set_t saved;
    sched_getaffinity(0, sizeof saved, &saved);
    if (where.process_cpu >= 0 && !where.pin_after) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(where.process_cpu, &one);
      sched_setaffinity(0, sizeof one, &one);  // lazycr (and the process) inherit it
    }
    int o[2], e[2];
    if (pipe2(o, O_CLOEXEC) != 0 || pipe2(e, O_CLOEXEC) != 0) die("pipe");
    const double t0 = now_ms();
    pid_t lz = spawn(args, o[1], e[1]);
    sched_setaffinity(0, sizeof saved, &saved);
    close(o[1]);
    close(e[1]);
    std::string pid_line = read_line(o[0]);
    int rc = wait_exit(lz);
    const double t_running = now_ms();
    // lazycr's stderr: the page server (-v) keeps it open until it finishes.
    std::string log;
    std::thread log_reader([&] { log = read_all(e[0]); });
    if (rc != 0) {
      log_reader.join();
      die("restore failed: " + log);
    }
    pid_t restored = std::atoi(pid_line.c_str());
    pid_t server = 0;
    if (lazy) {
      for (int i = 0; i < 5000 && !fs::exists(spid); i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      server = std::atoi(read_file(spid).c_str());
    }
    if (where.pin_after) {
      pin_threads(restored, where.process_cpu);
      if (verify_first) std::ofstream(verify_) << "go";
    }
    Sample s;
    if (!verify_first && server > 0) {
      if (wait_exit(server) != 0) die("page server failed");
      server = 0;
      std::ofstream(verify_) << "go";
    }
    std::string verdict = read_line(o[0]);
    const double t_verified = now_ms();
    close(o[0]);
    int code = wait_exit(restored);  // re-parented to us
    if (verdict != "verified ok" || code != 0)
      die("restored target said '" + verdict + "', exit " + std::to_string(code));
    if (server > 0 && wait_exit(server) != 0) die("page server failed");
    log_reader.join();
    close(e[0]);
    s["running_ms"] = t_running - t0;
    s["verified_ms"] = t_verified - t0;
    s["lazycr_first_ms"] = number_after(log, "first instruction after ") / 1000;
    if (lazy) {
      std::string j = read_file(stats);
      s["faults"] = json_number(j, "faults");
      s["p50_us"] = json_number(j, "p50") / 1000;
      s["p99_us"] = json_number(j, "p99") / 1000;
      s["by_fault"] = json_number(j, "by_fault");
      s["by_prefetch"] = json_number(j, "by_prefetch");
      s["lazy_pages"] = json_number(j, "lazy_pages");
      s["decompressed_mib"] = json_number(j, "bytes_decompressed") / 1048576;
      const double owed_ns = json_number(j, "time_until_nothing_owed_ns");
      const double start_ns = json_number(j, "server_start_ns");
      s["nothing_owed_ms"] = owed_ns / 1e6;
      if (owed_ns > start_ns)
        s["drain_gbps"] = s["lazy_pages"] * 4096 / ((owed_ns - start_ns) / 1e9) / 1e9;
    }
    return s;
  }

  // Median of `runs_` restores.
  Sample median_of(const std::function<Sample()>& one) {
    std::vector<Sample> all;
    for (int i = 0; i < runs_; i++) all.push_back(one());
    Sample out;
    for (const auto& [k, v] : all.front()) {
      std::vector<double> col;
      for (const auto& s : all) col.push_back(s.count(k) ? s.at(k) : 0);
      out[k] = median(col);
    }
    return out;
  }

 private:
  int runs_;
  std::string bin_;
  std::string work_, verify_, dir_;
  double image_mib_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  int runs = 3;
  std::vector<int> sizes = {64, 512, 2048};
  int pin_size = 512;
  std::string frame_size;  // dump's default
  std::vector<int> privileged_sizes = {1024};
  std::string before;  // another lazycr binary to compare with
  auto parse_sizes = [](const char* arg) {
    std::vector<int> v;
    std::istringstream in(arg);
    std::string item;
    while (std::getline(in, item, ',')) v.push_back(std::atoi(item.c_str()));
    return v;
  };
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--sizes" && i + 1 < argc) {
      sizes = parse_sizes(argv[++i]);
    } else if (a == "--privileged-sizes" && i + 1 < argc) {
      privileged_sizes = parse_sizes(argv[++i]);
    } else if (a == "--before" && i + 1 < argc) {
      before = argv[++i];
    } else if (a == "--pin-size" && i + 1 < argc) {
      pin_size = std::atoi(argv[++i]);
    } else if (a == "--frame-size" && i + 1 < argc) {
      frame_size = argv[++i];
    } else {
      die("usage: lazy_restore_bench [--runs N] [--sizes 64,512,2048] [--pin-size 512|0] "
          "[--frame-size S] [--privileged-sizes 1024] [--before PATH]");
    }
  }
  prctl(PR_SET_CHILD_SUBREAPER, 1);  // restored processes and servers come back to us
  signal(SIGPIPE, SIG_IGN);
  const Placement unpinned{"unpinned", -1, -1};

  std::printf(
      "lazy_restore_bench: median of %d runs; state_target (semi pattern), images in %s, "
      "frames of %s\n\n",
      runs, fs::temp_directory_path().string().c_str(),
      frame_size.empty() ? "the dump's default size" : frame_size.c_str());
  if (!sizes.empty())
    std::printf(
        "| MiB | image MiB | first instr. eager ms (wall / lazycr) | first instr. lazy ms (wall / "
        "lazycr) | verified eager ms | verified lazy ms | lazy / eager | lazy faults | fault p50 "
        "/ p99 us | pages by fault / prefetch | nothing owed ms | MiB decompressed | verified "
        "lazy, prefetch off ms | p50 / p99 us, prefetch off | verified, prefetch off, window 16K "
        "ms | p50 / p99 us, window 16K | drain GB/s |\n");
  if (!sizes.empty())
    std::printf(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  std::fflush(stdout);
  for (int mib : sizes) {
    Bench b(mib, runs, frame_size);
    Sample eager = b.median_of([&] { return b.restore(false, {}, true, unpinned); });
    Sample lazy = b.median_of([&] { return b.restore(true, {}, true, unpinned); });
    Sample off = b.median_of([&] {
      return b.restore(true, {"--prefetch", "off"}, true, unpinned);
    });
    Sample off16 = b.median_of([&] {
      return b.restore(true, {"--prefetch", "off", "--window", "16K"}, true, unpinned);
    });
    Sample drain = b.median_of([&] { return b.restore(true, {}, false, unpinned); });
    std::printf(
        "| %d | %.1f | %.1f / %.1f | %.1f / %.1f | %.1f | %.1f | %.2f | %.0f | %.1f / %.1f | "
        "%.0f / %.0f | %.1f | %.0f | %.1f | %.1f / %.1f | %.1f | %.1f / %.1f | %.2f |\n",
        mib, b.image_mib(), eager["running_ms"], eager["lazycr_first_ms"], lazy["running_ms"],
        lazy["lazycr_first_ms"], eager["verified_ms"], lazy["verified_ms"],
        lazy["verified_ms"] / eager["verified_ms"], lazy["faults"], lazy["p50_us"], lazy["p99_us"],
        lazy["by_fault"], lazy["by_prefetch"], lazy["nothing_owed_ms"], lazy["decompressed_mib"],
        off["verified_ms"], off["p50_us"], off["p99_us"], off16["verified_ms"], off16["p50_us"],
        off16["p99_us"], drain["drain_gbps"]);
    std::fflush(stdout);
  }

  if (pin_size > 0) {
    std::printf(
        "\nCPU placement, %d MiB: lazycr and the restored process on CPU 0 (or unpinned), the "
        "page server where named\n\n",
        pin_size);
    std::printf(
        "| placement | verified ms (prefetch on) | fault p50 / p99 us (on) | pages by fault / "
        "prefetch (on) | verified ms (prefetch off) | fault p50 / p99 us (off) | drain GB/s |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    Bench b(pin_size, runs, frame_size);
    for (const Placement& where :
         {Placement{"server and process on one CPU", 0, 0},
          Placement{"server on CPU 1, process on CPU 0 (pinned once running)", 0, 1, true},
          unpinned}) {
      Sample on = b.median_of([&] { return b.restore(true, {}, true, where); });
      Sample off = b.median_of([&] { return b.restore(true, {"--prefetch", "off"}, true, where); });
      Sample drain = b.median_of([&] { return b.restore(true, {}, false, where); });
      std::printf("| %s | %.1f | %.1f / %.1f | %.0f / %.0f | %.1f | %.1f / %.1f | %.2f |\n",
                  where.name.c_str(), on["verified_ms"], on["p50_us"], on["p99_us"], on["by_fault"],
                  on["by_prefetch"], off["verified_ms"], off["p50_us"], off["p99_us"],
                  drain["drain_gbps"]);
      std::fflush(stdout);
    }
  }

  if (!privileged_sizes.empty()) {
    std::printf(
        "\nPrivileged image (root target, signed), random pages: MAC checked against "
        "--trust-image\n\n");
    std::printf(
        "| lazycr | MiB | image MiB | first instr. lazy ms, MAC (wall / lazycr) | same, "
        "--trust-image | MAC / trust | verified eager ms, MAC | same, --trust-image | MAC / "
        "trust | fault p50 / p99 us, prefetch off, MAC |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    std::vector<std::pair<std::string, std::string>> bins;
    if (!before.empty()) bins.emplace_back("before (" + before + ")", before);
    bins.emplace_back("this build", LAZYCR_BIN);
    const std::vector<std::string> trust{"--trust-image"};
    for (int mib : privileged_sizes) {
      for (const auto& [name, bin] : bins) {
        Bench b(mib, runs, frame_size, "random", bin);
        Sample lazy = b.median_of([&] { return b.restore(true, {}, true, unpinned); });
        Sample lazy_t = b.median_of([&] { return b.restore(true, {}, true, unpinned, trust); });
        Sample eager = b.median_of([&] { return b.restore(false, {}, true, unpinned); });
        Sample eager_t = b.median_of([&] { return b.restore(false, {}, true, unpinned, trust); });
        Sample off = b.median_of([&] {
          return b.restore(true, {"--prefetch", "off"}, true, unpinned);
        });
        std::printf(
            "| %s | %d | %.1f | %.1f / %.1f | %.1f / %.1f | %.2f | %.1f | %.1f | %.2f | %.1f / "
            "%.1f |\n",
            name.c_str(), mib, b.image_mib(), lazy["running_ms"], lazy["lazycr_first_ms"],
            lazy_t["running_ms"], lazy_t["lazycr_first_ms"],
            lazy["running_ms"] / lazy_t["running_ms"], eager["verified_ms"], eager_t["verified_ms"],
            eager["verified_ms"] / eager_t["verified_ms"], off["p50_us"], off["p99_us"]);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
