#include "common/log.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>

namespace lazycr::log {
namespace {

Level g_level = Level::kWarn;
FILE* g_file = nullptr;
std::mutex g_mutex;

long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

const char* prefix(Level level) {
  switch (level) {
    case Level::kError:
      return "error: ";
    case Level::kWarn:
      return "warning: ";
    case Level::kInfo:
      return "";
    case Level::kDebug:
      return "debug: ";
  }
  return "";
}

}  // namespace

void set_level(Level level) {
  g_level = level;
}
Level level() {
  return g_level;
}

void set_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "ae");
  if (f == nullptr) fail_errno("cannot open log file ", path);
  std::lock_guard lock(g_mutex);
  if (g_file != nullptr) std::fclose(g_file);
  g_file = f;
}

void write(Level level, const std::string& line) {
  std::lock_guard lock(g_mutex);
  FILE* out = g_file != nullptr ? g_file : stderr;
  std::fprintf(out, "lazycr: %s%s\n", prefix(level), line.c_str());
  std::fflush(out);
}

int output_fd() {
  std::lock_guard lock(g_mutex);
  return g_file != nullptr ? ::fileno(g_file) : STDERR_FILENO;
}

Progress::Progress() : enabled_(isatty(STDERR_FILENO) == 1) {}
Progress::~Progress() {
  finish();
}

void Progress::update(const std::string& line) {
  if (!enabled_) return;
  long long t = now_ns();
  if (drawn_ && t - last_ns_ < 100'000'000) return;
  last_ns_ = t;
  drawn_ = true;
  std::fprintf(stderr, "\r\033[K%s", line.c_str());
  std::fflush(stderr);
}

void Progress::finish() {
  if (enabled_ && drawn_) {
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }
  drawn_ = false;
}

}  // namespace lazycr::log
