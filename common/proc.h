// Parsers for /proc. Pure functions over text where possible so tests can feed them
// fixed strings; thin readers on top for a live pid.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lazycr::proc {

// One line of /proc/PID/maps, plus the smaps fields lazycr uses.
struct MapsEntry {
  uint64_t start = 0;
  uint64_t end = 0;
  bool read = false, write = false, exec = false, shared = false;
  uint64_t offset = 0;
  uint32_t dev_major = 0, dev_minor = 0;
  uint64_t inode = 0;
  std::string path;     // pathname column, may be empty, "[heap]", ".. (deleted)"
  std::string vmflags;  // smaps "VmFlags:" value, e.g. "rd wr mr mw me gd ac"; "" from maps
  uint64_t rss_kb = 0, swap_kb = 0, anonymous_kb = 0;  // smaps only
};

// Maps or smaps text. Paths are kept verbatim (spaces, " (deleted)"; the kernel writes a '\n'
// in a name as "\012"). In smaps, the "Key: value" lines after a mapping line fill Rss, Swap,
// Anonymous and VmFlags of that mapping; other keys are skipped. Throws on a malformed line.
std::vector<MapsEntry> parse_maps(const std::string& text);
std::vector<MapsEntry> read_smaps(pid_t pid);

// /proc/PID/stat, the fields lazycr needs (man 5 proc numbering in comments).
struct Stat {
  pid_t pid = 0;
  std::string comm;                       // (2), may contain spaces and parentheses
  char state = '?';                       // (3)
  pid_t ppid = 0, pgrp = 0, session = 0;  // (4) (5) (6)
  uint64_t flags = 0;                     // (9) PF_* ; PF_KTHREAD = 0x00200000
  uint64_t num_threads = 0;               // (20)
  uint64_t start_time = 0;                // (22) clock ticks after boot
  uint64_t start_code = 0, end_code = 0, start_stack = 0;           // (26) (27) (28)
  int exit_signal = 0;                                              // (38)
  uint64_t start_data = 0, end_data = 0, start_brk = 0;             // (45) (46) (47)
  uint64_t arg_start = 0, arg_end = 0, env_start = 0, env_end = 0;  // (48)-(51)
  int exit_code = 0;                                                // (52)
};
Stat parse_stat(const std::string& text);
Stat read_stat(pid_t pid);
// The same, or nullopt when the process is gone (or its stat cannot be read or parsed).
std::optional<Stat> try_read_stat(pid_t pid);
// True if the thread is exiting: a zombie, gone, inside do_exit (PF_EXITING), or SIGKILL
// pending, as every thread of a SIGKILLed process soon is.
bool exiting(pid_t tid);

// /proc/PID/status: selected lines.
struct Status {
  std::string name;
  uint32_t umask = 0;
  char state = '?';
  pid_t tgid = 0, pid = 0, ppid = 0, tracer_pid = 0;
  std::vector<uint32_t> uids, gids, groups;  // Uid:/Gid: have 4 values
  uint64_t sig_pnd = 0, shd_pnd = 0, sig_blk = 0, sig_ign = 0, sig_cgt = 0;
  uint64_t cap_inh = 0, cap_prm = 0, cap_eff = 0, cap_bnd = 0, cap_amb = 0;
  bool no_new_privs = false;
  uint64_t threads = 0;
  int seccomp = 0;               // Seccomp: 0 none, 1 strict, 2 filter
  uint32_t seccomp_filters = 0;  // Seccomp_filters: filters attached to the thread
};
Status parse_status(const std::string& text);
Status read_status(pid_t pid);

// /proc/PID/fdinfo/N.
struct FdInfo {
  uint64_t pos = 0;
  uint32_t flags = 0;  // octal in the file
  int mnt_id = -1;
  uint64_t ino = 0;
  // "lock:" lines (locks held through this descriptor), after "lock:\t", as the kernel wrote
  // them (e.g. "1: POSIX  ADVISORY  WRITE 4809 fe:00:1234 10 14").
  std::vector<std::string> locks;
};
FdInfo parse_fdinfo(const std::string& text);

// Small helpers over a live process.
std::string read_file(const std::string& path);  // whole file; throws with the path
std::optional<std::string> try_read_file(const std::string& path);  // nullopt if it cannot be read
std::string read_link(const std::string& path);  // readlink; throws with the path
std::vector<pid_t> list_tasks(pid_t pid);        // /proc/PID/task, sorted
// /proc/PID/fd, sorted; for our own pid without the fd used for the listing.
std::vector<int> list_fds(pid_t pid);
std::vector<pid_t> list_children(pid_t pid);  // union of task/*/children
std::vector<uint8_t> read_auxv(pid_t pid);
bool exists(pid_t pid);  // /proc/PID exists (zombies and thread ids count); false for pid <= 0

}  // namespace lazycr::proc
