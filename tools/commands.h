// One function per lazycr command; lazycr.cc only parses options and calls these.
#pragma once

#include <cstdint>
#include <string>

namespace lazycr::cli {

struct CheckOptions {
  bool json = false;
};
// Returns the process exit code: 0 if the lazy restore path has everything, else 3.
int run_check(const CheckOptions& opts);

struct ShowOptions {
  std::string dir;
  bool json = false;
  bool pages = false;   // list every page run
  bool verify = false;  // decompress and check every frame
};
int run_show(const ShowOptions& opts);

}  // namespace lazycr::cli

#include "checkpoint/dump.h"

namespace lazycr::cli {
// Prints the one-line summary; returns 0, or 128+N when signal N interrupted the dump (it
// rolled back).
int run_dump(const checkpoint::DumpOptions& opts);

}  // namespace lazycr::cli

#include "restore/restore.h"

namespace lazycr::cli {
struct RestoreCliOptions {
  restore::RestoreOptions restore;
  bool detach = false;
  std::string pidfile;
};
// Foreground: the restored process's exit status (128+N for signal N); --detach: 0.
int run_restore(const RestoreCliOptions& opts);

}  // namespace lazycr::cli

namespace lazycr::cli {
// `lazycr template` / `lazycr clone` (tools/template.cc, restore/clone.h).
struct TemplateOptions {
  std::string dir;
  std::string socket;
  bool detach = false;
  bool small_pages = false;  // keep the restored 4 KiB pages (no MADV_COLLAPSE)
  bool shell_job = false;    // restore --shell-job for the template itself
  bool netns = false;        // the template in a fresh network namespace (clones inherit it)
  uint64_t start_ns = 0;
};
// Runs until SIGTERM or `clone --stop` (foreground); --detach: returns 0 once the template
// answers, printing its pid.
int run_template(const TemplateOptions& opts);

struct CloneOptions {
  std::string socket;
  bool detach = false;
  bool stop = false;
  bool netns = false;      // the clone in a fresh network namespace (loopback up)
  bool shell_job = false;  // the clone's fds 0-2 that lead outside the image are ours
  std::string pidfile;
  std::string stats_file;
  uint64_t start_ns = 0;
};
// Foreground: the clone's exit status (128+N for signal N); --detach and --stop: 0.
int run_clone(const CloneOptions& opts);

}  // namespace lazycr::cli
