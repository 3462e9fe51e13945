#include "objects/fd_kinds.h"

#include <fcntl.h>
#include <sys/syscall.h>

#include <map>
#include <sstream>

#include "common/error.h"

namespace lazycr::objects {
namespace {

// Every descriptor kind lazycr restores beyond files, pipes and sockets.
const FdKind* const kFdKinds[] = {
    &kEventfdKind, &kTimerfdKind, &kSignalfdKind, &kInotifyKind, &kPidfdKind,
};

}  // namespace

const FdKind* fd_kind(image::FileDescriptor::Kind kind) {
  for (const FdKind* k : kFdKinds)
    if (k->kind == kind) return k;
  return nullptr;
}

const FdKind* fd_kind_of_anon(const std::string& anon_name) {
  for (const FdKind* k : kFdKinds)
    if (anon_name == k->anon_name) return k;
  return nullptr;
}

std::optional<std::string> fdinfo_value(const std::string& fdinfo, const std::string& key) {
  std::istringstream in(fdinfo);
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() <= key.size() || line.compare(0, key.size(), key) != 0 ||
        line[key.size()] != ':')
      continue;
    size_t at = line.find_first_not_of(" \t", key.size() + 1);
    return at == std::string::npos ? std::string() : line.substr(at);
  }
  return std::nullopt;
}

uint64_t fdinfo_number(const std::string& fdinfo, const std::string& key, int base) {
  auto v = fdinfo_value(fdinfo, key);
  if (!v) fail("fdinfo has no '", key, ":' line");
  try {
    size_t used = 0;
    unsigned long long n = std::stoull(*v, &used, base);
    if (used != v->size() || (*v)[0] == '-') throw std::invalid_argument(*v);
    return n;
  } catch (const std::exception&) {
    fail("fdinfo '", key, ":' is '", *v, "', not a number");
  }
}

void dump_fd_kinds(RemoteProcess&, image::Process&, DumpContext&) {
  // Recorded with the descriptors (checkpoint/files.cc), before the tree-wide checks.
}

void restore_fd_kinds(RestorePoint point, RemoteProcess& p, const image::Process& proc) {
  if (point != RestorePoint::kFilesInPlace) return;
  std::map<uint64_t, int> made;  // file_id -> the number of the first descriptor made
  for (const auto& f : proc.fds()) {
    const FdKind* k = fd_kind(f.kind());
    if (k == nullptr || k->create_inside == nullptr) continue;
    const uint64_t num = static_cast<uint64_t>(f.fd());
    const uint64_t cloexec = f.cloexec() ? O_CLOEXEC : 0;
    auto it = made.find(f.file_id());
    if (it != made.end()) {
      p.call(0, cat("dup3(", it->second, ", ", f.fd(), ")"), SYS_dup3,
             static_cast<uint64_t>(it->second), num, cloexec);
      continue;
    }
    const long got = k->create_inside(p, f);
    // The stand-in at f.fd() is closed by the dup3.
    p.call(0, cat("dup3(", got, ", ", f.fd(), ")"), SYS_dup3, static_cast<uint64_t>(got), num,
           cloexec);
    p.call(0, cat("close(", got, ")"), SYS_close, static_cast<uint64_t>(got));
    made[f.file_id()] = f.fd();
  }
}

}  // namespace lazycr::objects
