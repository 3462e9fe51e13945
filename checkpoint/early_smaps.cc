// A live dump's smaps, read before the freeze, kept true (early_smaps.h).
#include "checkpoint/early_smaps.h"

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <tuple>

#include "common/error.h"
#include "common/log.h"

namespace lazycr::checkpoint {
namespace {

bool same_areas(const std::vector<proc::MapsEntry>& a, const std::vector<proc::MapsEntry>& b) {
  auto key = [](const proc::MapsEntry& m) {
    return std::tie(m.start, m.end, m.read, m.write, m.exec, m.shared, m.offset, m.dev_major,
                    m.dev_minor, m.inode, m.path);
  };
  return std::equal(a.begin(), a.end(), b.begin(), b.end(),
                    [&](const auto& x, const auto& y) { return key(x) == key(y); });
}

std::vector<std::string> flag_list(const std::string& vmflags) {
  std::vector<std::string> out;
  std::istringstream in(vmflags);
  for (std::string f; in >> f;) out.push_back(f);
  return out;
}

bool has_flag(const std::string& vmflags, const char* flag) {
  const auto flags = flag_list(vmflags);
  return std::find(flags.begin(), flags.end(), flag) != flags.end();
}

// Bytes in areas flagged locked (mlock, mlock2 MLOCK_ONFAULT, mlockall), which is what the
// kernel counts as the process's locked memory (mm->locked_vm, status "VmLck").
uint64_t locked_bytes(const std::vector<proc::MapsEntry>& maps) {
  uint64_t n = 0;
  for (const auto& m : maps)
    if (has_flag(m.vmflags, "lo")) n += m.end - m.start;
  return n;
}

// status "VmLck" in bytes, or nothing when it cannot be read.
std::optional<uint64_t> status_locked_bytes(pid_t pid) {
  const auto text = proc::try_read_file(cat("/proc/", pid, "/status"));
  if (!text) return std::nullopt;
  const size_t at = text->find("\nVmLck:");
  if (at == std::string::npos) return std::nullopt;
  return std::strtoull(text->c_str() + at + 7, nullptr, 10) * 1024;
}

// Flags fork does not pass on to the child's copy of an area (dup_mmap: VM_LOCKED_MASK;
// userfaultfd registrations without UFFD_FEATURE_EVENT_FORK), and MADV_DONTFORK's, whose
// areas it does not copy at all.
const std::set<std::string>& not_inherited() {
  static const std::set<std::string> flags{"lo", "lf", "um", "uw", "ui", "dc"};
  return flags;
}

}  // namespace

std::map<pid_t, std::vector<proc::MapsEntry>> read_smaps_ahead(pid_t root) {
  std::map<pid_t, std::vector<proc::MapsEntry>> out;
  std::vector<pid_t> todo{root};
  while (!todo.empty()) {
    const pid_t p = todo.back();
    todo.pop_back();
    if (out.count(p)) continue;
    try {
      out[p] = proc::read_smaps(p);
      for (pid_t c : proc::list_children(p)) todo.push_back(c);
    } catch (const Error&) {
      // Gone, or a zombie: the freeze finds out.
    }
  }
  return out;
}

std::vector<proc::MapsEntry> smaps_while_frozen(
    pid_t pid, std::map<pid_t, std::vector<proc::MapsEntry>>& ahead) {
  auto it = ahead.find(pid);
  if (it != ahead.end()) {
    const std::string path = cat("/proc/", pid, "/maps");
    std::vector<proc::MapsEntry> maps;
    try {
      maps = proc::parse_maps(proc::read_file(path));
    } catch (const Error& e) {
      fail(path, ": ", e.what());
    }
    if (!same_areas(maps, it->second)) {
      log::debug("pid ", pid, ": its areas changed since smaps was read: read again");
    } else if (status_locked_bytes(pid) != locked_bytes(it->second)) {
      log::debug("pid ", pid, ": its locked memory changed since smaps was read: read again");
    } else {
      return std::move(it->second);
    }
  }
  return proc::read_smaps(pid);
}

size_t refresh_vmflags(pid_t pid, pid_t read_from, std::vector<image::MemoryArea>& areas) {
  const bool own = read_from == pid;
  const std::vector<proc::MapsEntry> now = proc::read_smaps(read_from);
  size_t changed = 0;
  for (auto& a : areas) {
    // The area, or (the twin's) one it merged with since: the flags are the whole area's.
    auto m = std::find_if(now.begin(), now.end(), [&](const proc::MapsEntry& e) {
      return e.start <= a.start() && a.end() <= e.end;
    });
    if (m == now.end()) continue;  // MADV_DONTFORK: not in the twin
    std::string flags;
    auto add = [&](const std::string& f) { flags += flags.empty() ? f : " " + f; };
    for (const auto& f : flag_list(m->vmflags))
      if (own || !not_inherited().count(f)) add(f);
    if (!own)
      for (const auto& f : flag_list(a.vmflags()))
        if (not_inherited().count(f)) add(f);
    const auto before = flag_list(a.vmflags()), after = flag_list(flags);
    if (std::set<std::string>(before.begin(), before.end()) ==
        std::set<std::string>(after.begin(), after.end()))
      continue;
    log::debug("pid ", pid, ": area ", std::hex, a.start(), "-", a.end(), std::dec,
               " flags changed since smaps was read: ", a.vmflags(), " -> ", flags);
    a.set_vmflags(flags);
    changed++;
  }
  return changed;
}

}  // namespace lazycr::checkpoint
