#include "common/proc.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <string_view>
#include <system_error>

#include "common/error.h"
#include "common/fd.h"

namespace lazycr::proc {
namespace {

std::string pid_path(pid_t pid, const char* what) {
  return cat("/proc/", pid, "/", what);
}

// Splits on any run of spaces/tabs; no empty tokens.
std::vector<std::string_view> split_ws(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    size_t j = i;
    while (j < s.size() && s[j] != ' ' && s[j] != '\t') ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

// Parses all of `s` as a number in `base`; false on empty input, junk or overflow.
template <typename T>
bool parse_num(std::string_view s, T& out, int base = 10) {
  if (s.empty()) return false;
  const char* end = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(s.data(), end, out, base);
  return ec == std::errc() && ptr == end;
}

template <typename T>
T num_or_fail(std::string_view s, int base, const char* what, std::string_view line) {
  T v{};
  if (!parse_num(s, v, base)) fail("bad ", what, " '", s, "' in line '", line, "'");
  return v;
}

// Calls fn(line) for each line of text (without the '\n').
template <typename Fn>
void for_each_line(std::string_view text, Fn&& fn) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string_view::npos) nl = text.size();
    fn(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
}

// "start-end perms offset major:minor inode   path"
MapsEntry parse_maps_line(std::string_view line) {
  MapsEntry e;
  size_t pos = 0;
  // Takes the next field ending at a space (the path is handled separately).
  auto next_field = [&](const char* what) {
    size_t sp = line.find(' ', pos);
    if (sp == std::string_view::npos || sp == pos) {
      fail("malformed maps line (no ", what, "): '", line, "'");
    }
    std::string_view f = line.substr(pos, sp - pos);
    pos = sp + 1;
    return f;
  };
  std::string_view range = next_field("address range");
  size_t dash = range.find('-');
  if (dash == std::string_view::npos) fail("malformed maps line (address range): '", line, "'");
  e.start = num_or_fail<uint64_t>(range.substr(0, dash), 16, "start address", line);
  e.end = num_or_fail<uint64_t>(range.substr(dash + 1), 16, "end address", line);
  if (e.end < e.start) fail("malformed maps line (end < start): '", line, "'");

  std::string_view perms = next_field("permissions");
  if (perms.size() != 4) fail("malformed maps line (permissions): '", line, "'");
  e.read = perms[0] == 'r';
  e.write = perms[1] == 'w';
  e.exec = perms[2] == 'x';
  e.shared = perms[3] == 's';

  e.offset = num_or_fail<uint64_t>(next_field("offset"), 16, "offset", line);

  std::string_view dev = next_field("device");
  size_t colon = dev.find(':');
  if (colon == std::string_view::npos) fail("malformed maps line (device): '", line, "'");
  e.dev_major = num_or_fail<uint32_t>(dev.substr(0, colon), 16, "device major", line);
  e.dev_minor = num_or_fail<uint32_t>(dev.substr(colon + 1), 16, "device minor", line);

  // The inode may end the line (anonymous mapping without trailing padding).
  size_t sp = line.find(' ', pos);
  std::string_view inode = line.substr(pos, sp == std::string_view::npos ? line.npos : sp - pos);
  e.inode = num_or_fail<uint64_t>(inode, 10, "inode", line);
  if (sp != std::string_view::npos) {
    // The kernel pads with spaces to a column; the rest of the line is the path verbatim
    // (it may contain spaces and end in " (deleted)"; '\n' in names appears as "\012").
    size_t p = line.find_first_not_of(' ', sp);
    if (p != std::string_view::npos) e.path = std::string(line.substr(p));
  }
  return e;
}

}  // namespace

std::vector<MapsEntry> parse_maps(const std::string& text) {
  std::vector<MapsEntry> out;
  for_each_line(text, [&](std::string_view line) {
    if (line.empty()) return;
    size_t sp = line.find(' ');
    std::string_view first = line.substr(0, sp);
    if (!first.empty() && first.back() == ':') {
      // smaps "Key: value [kB]" line, belonging to the last mapping line.
      if (out.empty()) fail("smaps field before any mapping: '", line, "'");
      MapsEntry& e = out.back();
      std::string_view key = first.substr(0, first.size() - 1);
      std::string_view value = sp == std::string_view::npos ? "" : trim(line.substr(sp + 1));
      if (key == "VmFlags") {
        e.vmflags = std::string(value);
        return;
      }
      uint64_t* field = nullptr;
      if (key == "Rss") {
        field = &e.rss_kb;
      } else if (key == "Swap") {
        field = &e.swap_kb;
      } else if (key == "Anonymous") {
        field = &e.anonymous_kb;
      }
      if (field) {
        auto toks = split_ws(value);
        if (toks.empty()) fail("smaps field without a value: '", line, "'");
        *field = num_or_fail<uint64_t>(toks[0], 10, "smaps value", line);
      }
      return;
    }
    out.push_back(parse_maps_line(line));
  });
  return out;
}

std::vector<MapsEntry> read_smaps(pid_t pid) {
  std::string path = pid_path(pid, "smaps");
  std::string text = read_file(path);
  try {
    return parse_maps(text);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

Stat parse_stat(const std::string& text) {
  std::string_view t = trim(text);
  size_t open = t.find(" (");
  size_t close = t.rfind(')');  // comm may itself contain ") (": the last ')' ends it
  if (open == std::string_view::npos || close == std::string_view::npos || close < open + 2) {
    fail("malformed stat line: '", t, "'");
  }
  Stat s;
  s.pid = num_or_fail<pid_t>(t.substr(0, open), 10, "pid", t);
  s.comm = std::string(t.substr(open + 2, close - open - 2));
  // tok[i] is field (i + 3) in man 5 proc numbering.
  auto tok = split_ws(t.substr(close + 1));
  if (tok.size() < 50) fail("stat line has ", tok.size() + 2, " fields, want >= 52: '", t, "'");
  auto field = [&](int n) { return tok[n - 3]; };
  if (field(3).size() != 1) fail("bad state in stat line: '", t, "'");
  s.state = field(3)[0];
  s.ppid = num_or_fail<pid_t>(field(4), 10, "ppid", t);
  s.pgrp = num_or_fail<pid_t>(field(5), 10, "pgrp", t);
  s.session = num_or_fail<pid_t>(field(6), 10, "session", t);
  s.flags = num_or_fail<uint64_t>(field(9), 10, "flags", t);
  s.num_threads = num_or_fail<uint64_t>(field(20), 10, "num_threads", t);
  s.start_time = num_or_fail<uint64_t>(field(22), 10, "starttime", t);
  s.start_code = num_or_fail<uint64_t>(field(26), 10, "startcode", t);
  s.end_code = num_or_fail<uint64_t>(field(27), 10, "endcode", t);
  s.start_stack = num_or_fail<uint64_t>(field(28), 10, "startstack", t);
  s.exit_signal = num_or_fail<int>(field(38), 10, "exit_signal", t);
  s.start_data = num_or_fail<uint64_t>(field(45), 10, "start_data", t);
  s.end_data = num_or_fail<uint64_t>(field(46), 10, "end_data", t);
  s.start_brk = num_or_fail<uint64_t>(field(47), 10, "start_brk", t);
  s.arg_start = num_or_fail<uint64_t>(field(48), 10, "arg_start", t);
  s.arg_end = num_or_fail<uint64_t>(field(49), 10, "arg_end", t);
  s.env_start = num_or_fail<uint64_t>(field(50), 10, "env_start", t);
  s.env_end = num_or_fail<uint64_t>(field(51), 10, "env_end", t);
  s.exit_code = num_or_fail<int>(field(52), 10, "exit_code", t);
  return s;
}

Stat read_stat(pid_t pid) {
  std::string path = pid_path(pid, "stat");
  std::string text = read_file(path);
  try {
    return parse_stat(text);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

std::optional<Stat> try_read_stat(pid_t pid) {
  std::optional<std::string> text = try_read_file(pid_path(pid, "stat"));
  if (!text) return std::nullopt;
  try {
    return parse_stat(*text);
  } catch (const Error&) {
    return std::nullopt;
  }
}

bool exiting(pid_t tid) {
  // Woken by SIGKILL, a thread runs a little before do_exit with the signal still pending;
  // it takes the signal off just before it sets PF_EXITING: read in that order.
  std::optional<std::string> text = try_read_file(pid_path(tid, "status"));
  if (!text) return true;
  const Status status = parse_status(*text);
  if ((status.sig_pnd | status.shd_pnd) & (uint64_t{1} << (SIGKILL - 1))) return true;
  std::optional<Stat> st = try_read_stat(tid);
  if (!st) return true;
  constexpr uint64_t kPfExiting = 0x4;
  return st->state == 'Z' || st->state == 'X' || st->state == 'x' || (st->flags & kPfExiting);
}

Status parse_status(const std::string& text) {
  Status s;
  for_each_line(text, [&](std::string_view line) {
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return;
    std::string_view key = line.substr(0, colon);
    std::string_view raw = line.substr(colon + 1);
    std::string_view value = trim(raw);
    auto hex64 = [&](uint64_t& out) { out = num_or_fail<uint64_t>(value, 16, "hex value", line); };
    auto dec_pid = [&](pid_t& out) { out = num_or_fail<pid_t>(value, 10, "number", line); };
    auto list = [&](std::vector<uint32_t>& out) {
      out.clear();
      for (auto t : split_ws(value)) out.push_back(num_or_fail<uint32_t>(t, 10, "id", line));
    };
    if (key == "Name") {
      // The value follows a single tab; keep leading/trailing spaces of the name itself.
      if (!raw.empty() && raw.front() == '\t') raw.remove_prefix(1);
      s.name = std::string(raw);
    } else if (key == "Umask") {
      s.umask = num_or_fail<uint32_t>(value, 8, "umask", line);
    } else if (key == "State") {
      if (value.empty()) fail("empty State in status line '", line, "'");
      s.state = value[0];
    } else if (key == "Tgid") {
      dec_pid(s.tgid);
    } else if (key == "Pid") {
      dec_pid(s.pid);
    } else if (key == "PPid") {
      dec_pid(s.ppid);
    } else if (key == "TracerPid") {
      dec_pid(s.tracer_pid);
    } else if (key == "Uid") {
      list(s.uids);
    } else if (key == "Gid") {
      list(s.gids);
    } else if (key == "Groups") {
      list(s.groups);
    } else if (key == "SigPnd") {
      hex64(s.sig_pnd);
    } else if (key == "ShdPnd") {
      hex64(s.shd_pnd);
    } else if (key == "SigBlk") {
      hex64(s.sig_blk);
    } else if (key == "SigIgn") {
      hex64(s.sig_ign);
    } else if (key == "SigCgt") {
      hex64(s.sig_cgt);
    } else if (key == "CapInh") {
      hex64(s.cap_inh);
    } else if (key == "CapPrm") {
      hex64(s.cap_prm);
    } else if (key == "CapEff") {
      hex64(s.cap_eff);
    } else if (key == "CapBnd") {
      hex64(s.cap_bnd);
    } else if (key == "CapAmb") {
      hex64(s.cap_amb);
    } else if (key == "NoNewPrivs") {
      s.no_new_privs = num_or_fail<int>(value, 10, "NoNewPrivs", line) != 0;
    } else if (key == "Threads") {
      s.threads = num_or_fail<uint64_t>(value, 10, "Threads", line);
    } else if (key == "Seccomp") {
      s.seccomp = num_or_fail<int>(value, 10, "Seccomp", line);
    } else if (key == "Seccomp_filters") {
      s.seccomp_filters = num_or_fail<uint32_t>(value, 10, "Seccomp_filters", line);
    }
  });
  return s;
}

Status read_status(pid_t pid) {
  std::string path = pid_path(pid, "status");
  std::string text = read_file(path);
  try {
    return parse_status(text);
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

FdInfo parse_fdinfo(const std::string& text) {
  FdInfo f;
  bool have_pos = false, have_flags = false;
  for_each_line(text, [&](std::string_view line) {
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) return;
    std::string_view key = line.substr(0, colon);
    std::string_view value = trim(line.substr(colon + 1));
    if (key == "pos") {
      f.pos = num_or_fail<uint64_t>(value, 10, "pos", line);
      have_pos = true;
    } else if (key == "flags") {
      f.flags = num_or_fail<uint32_t>(value, 8, "flags", line);
      have_flags = true;
    } else if (key == "mnt_id") {
      f.mnt_id = num_or_fail<int>(value, 10, "mnt_id", line);
    } else if (key == "ino") {
      f.ino = num_or_fail<uint64_t>(value, 10, "ino", line);
    } else if (key == "lock") {
      f.locks.emplace_back(value);
    }
  });
  if (!have_pos || !have_flags) fail("fdinfo without pos/flags: '", text, "'");
  return f;
}

std::string read_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno("open ", path);
  // /proc files report size 0 and may be far larger than one page: read until EOF.
  std::string out;
  size_t chunk = 16384;
  for (;;) {
    size_t old = out.size();
    out.resize(old + chunk);
    ssize_t n = ::read(fd.get(), out.data() + old, chunk);
    if (n < 0) {
      out.resize(old);
      if (errno == EINTR) continue;
      fail_errno("read ", path);
    }
    out.resize(old + static_cast<size_t>(n));
    if (n == 0) break;
    if (chunk < (1u << 20)) chunk *= 2;
  }
  return out;
}

std::optional<std::string> try_read_file(const std::string& path) {
  try {
    return read_file(path);
  } catch (const Error&) {
    return std::nullopt;
  }
}

std::string read_link(const std::string& path) {
  std::string buf(256, '\0');
  for (;;) {
    ssize_t n = ::readlink(path.c_str(), buf.data(), buf.size());
    if (n < 0) fail_errno("readlink ", path);
    if (static_cast<size_t>(n) < buf.size()) {
      buf.resize(static_cast<size_t>(n));
      return buf;
    }
    if (buf.size() >= (1u << 20)) fail("readlink ", path, ": target longer than 1 MiB");
    buf.resize(buf.size() * 2);  // possibly truncated: retry larger
  }
}

namespace {

// Numeric entries of a /proc directory, sorted. `skip` is left out (our own dir fd).
std::vector<int> list_numeric(const std::string& path, bool skip_own_fd) {
  DIR* dir = ::opendir(path.c_str());
  if (!dir) fail_errno("opendir ", path);
  int own = skip_own_fd ? ::dirfd(dir) : -1;
  std::vector<int> out;
  for (;;) {
    errno = 0;
    dirent* d = ::readdir(dir);
    if (!d) {
      int err = errno;
      ::closedir(dir);
      if (err != 0) fail_errno_value(err, cat("readdir ", path));
      break;
    }
    int v = 0;
    if (!parse_num(std::string_view(d->d_name), v)) continue;  // ".", ".."
    if (v == own) continue;
    out.push_back(v);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::vector<pid_t> list_tasks(pid_t pid) {
  auto v = list_numeric(pid_path(pid, "task"), false);
  return std::vector<pid_t>(v.begin(), v.end());
}

std::vector<int> list_fds(pid_t pid) {
  // Listing our own fd table shows the directory fd opened for the listing: leave it out.
  bool self = pid == ::getpid() || pid == static_cast<pid_t>(::syscall(SYS_gettid));
  return list_numeric(pid_path(pid, "fd"), self);
}

std::vector<pid_t> list_children(pid_t pid) {
  std::vector<pid_t> out;
  for (pid_t tid : list_tasks(pid)) {
    std::string path = cat("/proc/", pid, "/task/", tid, "/children");
    std::optional<std::string> text = try_read_file(path);
    if (!text) {
      // A thread that exited since the listing has no children left; anything else
      // (e.g. a kernel without CONFIG_PROC_CHILDREN) is an error.
      if (::access(cat("/proc/", pid, "/task/", tid).c_str(), F_OK) != 0) continue;
      text = read_file(path);  // throws with the reason
    }
    for (auto t : split_ws(trim(*text))) {
      out.push_back(num_or_fail<pid_t>(t, 10, "child pid", *text));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<uint8_t> read_auxv(pid_t pid) {
  std::string text = read_file(pid_path(pid, "auxv"));
  return std::vector<uint8_t>(text.begin(), text.end());
}

bool exists(pid_t pid) {
  if (pid <= 0) return false;
  struct stat st;
  return ::stat(cat("/proc/", pid).c_str(), &st) == 0;
}

}  // namespace lazycr::proc
