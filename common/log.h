// Diagnostics for people: stderr (or --log-file), with a verbosity level.
// Progress lines go to the terminal only.
#pragma once

#include <string>

#include "common/error.h"

namespace lazycr::log {

enum class Level { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

void set_level(Level level);
Level level();
// Sends log lines to this file instead of stderr (progress lines still go to the terminal).
void set_file(const std::string& path);
void write(Level level, const std::string& line);
// The descriptor log lines go to (the --log-file's, or 2), for a forked helper process that
// closes every other descriptor it inherited.
int output_fd();

template <typename... Args>
void warn(const Args&... args) {
  if (level() >= Level::kWarn) write(Level::kWarn, cat(args...));
}
template <typename... Args>
void info(const Args&... args) {
  if (level() >= Level::kInfo) write(Level::kInfo, cat(args...));
}
template <typename... Args>
void debug(const Args&... args) {
  if (level() >= Level::kDebug) write(Level::kDebug, cat(args...));
}

// A single self-overwriting status line on stderr, shown only when stderr is a terminal.
class Progress {
 public:
  Progress();
  ~Progress();
  // Redraws at most every 100 ms.
  void update(const std::string& line);
  void finish();
  bool enabled() const { return enabled_; }

 private:
  bool enabled_;
  bool drawn_ = false;
  long long last_ns_ = 0;
};

}  // namespace lazycr::log
