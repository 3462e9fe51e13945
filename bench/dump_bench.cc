// Dump figures (issue: `lazycr dump`): for targets holding 64 MiB, 512 MiB and 2 GiB of
// semi-compressible and random memory, prints wall time, frozen time, MB/s of resident memory,
// image size / resident size and lazycr's peak RSS. Usage: dump_bench [MiB...]
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "image-format/image_dir.h"

extern char** environ;

namespace {

pid_t spawn(const std::vector<std::string>& args, int out_fd) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  if (out_fd >= 0) posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);  // the target must hold no stray fds
  pid_t pid = -1;
  if (posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ) != 0) {
    std::perror("posix_spawn");
    std::exit(1);
  }
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

std::string read_line(int fd) {
  std::string line;
  char c;
  while (read(fd, &c, 1) == 1 && c != '\n') line += c;
  return line;
}

uint64_t dir_bytes(const std::string& dir) {
  uint64_t total = 0;
  for (auto& e : boost::filesystem::directory_iterator(dir))
    total += boost::filesystem::file_size(e.path());
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> sizes = {64, 512, 2048};
  if (argc > 1) {
    sizes.clear();
    for (int i = 1; i < argc; i++) sizes.push_back(std::atoi(argv[i]));
  }
  // LAZYCR_BENCH_DIR picks where images go (default /tmp: a disk here; /dev/shm: memory).
  const char* base = std::getenv("LAZYCR_BENCH_DIR");
  std::string work = std::string(base ? base : "/tmp") + "/lazycr-dump-bench";
  boost::filesystem::remove_all(work);
  boost::filesystem::create_directories(work);
  std::printf("%-8s %-7s %9s %10s %10s %9s %8s %12s\n", "pattern", "MiB", "wall ms", "frozen ms",
              "MB/s", "image MiB", "ratio", "peak RSS MiB");
  for (const char* pattern : {"semi", "random"}) {
    for (int mib : sizes) {
      int pipefd[2];
      if (pipe2(pipefd, O_CLOEXEC) != 0) return 1;
      pid_t target = spawn({LAZYCR_TARGETS_DIR "/state_target", "--mib", std::to_string(mib),
                            "--pattern", pattern, "--workdir", work},
                           pipefd[1]);
      close(pipefd[1]);
      std::string ready = read_line(pipefd[0]);
      if (ready.rfind("ready", 0) != 0) {
        std::fprintf(stderr, "target did not start\n");
        return 1;
      }
      std::string dir = work + "/img";
      boost::filesystem::remove_all(dir);
      auto t0 = std::chrono::steady_clock::now();
      pid_t dumper = spawn({LAZYCR_BIN, "dump", "-t", std::to_string(target), "-D", dir}, -1);
      int status = 0;
      struct rusage ru;
      wait4(dumper, &status, 0, &ru);
      double wall_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        std::fprintf(stderr, "dump failed\n");
        kill(target, SIGKILL);
        waitpid(target, nullptr, 0);
        return 1;
      }
      int tstatus;
      waitpid(target, &tstatus, 0);
      close(pipefd[0]);
      lazycr::image::ImageReader img(dir);
      const auto& idx = img.pages(target).index();
      double resident = double(idx.data_pages() + idx.zero_pages()) * 4096;
      double image = double(dir_bytes(dir));
      std::printf("%-8s %-7d %9.1f %10.1f %10.0f %9.1f %8.3f %12.1f\n", pattern, mib, wall_ms,
                  img.inventory().frozen_ns() / 1e6, resident / 1e6 / (wall_ms / 1e3),
                  image / (1 << 20), image / resident, ru.ru_maxrss / 1024.0);
      std::fflush(stdout);
    }
  }
  boost::filesystem::remove_all(work);
  return 0;
}
