#include "restore/skipped_fds.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <set>

#include "common/error.h"
#include "common/log.h"

namespace lazycr::restore {
namespace {

using image::FileDescriptor;

constexpr const char kDevNull[] = "/dev/null";

// What of the original open flags /dev/null can take: the access mode and the status flags a
// program may look at (fcntl F_GETFL). O_DIRECTORY, O_TMPFILE, O_CREAT, O_NOATIME or O_DIRECT
// would make the open fail or mean nothing there.
constexpr uint32_t kKeptFlags = O_ACCMODE | O_APPEND | O_NONBLOCK | O_DSYNC | O_SYNC | O_PATH;

const char* article(const std::string& kind) {
  if (kind.empty()) return "a";
  if (kind[0] == 'U') return kind.rfind("UNKNOWN", 0) == 0 ? "an" : "a";
  return std::string("AEIO").find(kind[0]) != std::string::npos ? "an" : "a";
}

}  // namespace

void stand_in_for_unsupported_fds(std::vector<image::Process>& procs, const RestoreOptions& opts) {
  // With --shell-job a description held at 0-2 that is not restorable becomes lazycr's own
  // standard descriptor, at every number it is held (shared_files.h).
  std::set<uint64_t> given_std;
  if (opts.shell_job)
    for (const auto& p : procs)
      for (const auto& f : p.fds())
        if (f.fd() <= 2 && !f.restorable() && f.file_id() != 0) given_std.insert(f.file_id());
  auto replaced_by_std = [&](const FileDescriptor& f) {
    return opts.shell_job && (f.fd() <= 2 || given_std.count(f.file_id()));
  };

  // Two wordings of one list: "fd 5 is a SOCKET (socket:[7])" for the refusal, and
  // "fd 5 (SOCKET socket:[7])" for the warning.
  std::string list, names;
  size_t count = 0;
  bool std_fd = false;
  for (const auto& p : procs) {
    std::string mine, my_names;
    for (const auto& f : p.fds()) {
      if (f.restorable() || replaced_by_std(f)) continue;
      count++;
      std_fd |= f.fd() <= 2;
      std::string kind = FileDescriptor::Kind_Name(f.kind());
      mine += cat(mine.empty() ? "" : ", ", "fd ", f.fd(), " is ", article(kind), " ", kind, " (",
                  f.target(), ")");
      my_names +=
          cat(my_names.empty() ? "" : ", ", "fd ", f.fd(), " (", kind, " ", f.target(), ")");
    }
    if (mine.empty()) continue;
    // The caller names the root already ("validate for pid N: ").
    std::string who = &p != &procs.front() ? cat("pid ", p.pid(), ": ") : "";
    list += cat(list.empty() ? "" : "; ", who, mine);
    names += cat(names.empty() ? "" : "; ", who, my_names);
  }
  if (count == 0) return;
  if (!opts.skip_unsupported_fds)
    fail(list, count == 1 ? " that lazycr cannot restore" : ", which lazycr cannot restore",
         "; --skip-unsupported-fds opens /dev/null in ", count == 1 ? "its place" : "their places",
         std_fd ? "; --shell-job gives the process lazycr's fds 0-2 instead" : "");

  struct stat st;
  if (::stat(kDevNull, &st) != 0) fail_errno("--skip-unsupported-fds: stat ", kDevNull);
  if (!S_ISCHR(st.st_mode))
    fail("--skip-unsupported-fds: ", kDevNull, " is not a character device");
  for (auto& p : procs) {
    for (auto& f : *p.mutable_fds()) {
      if (f.restorable() || replaced_by_std(f)) continue;
      f.set_kind(FileDescriptor::CHARDEV);
      f.set_target(kDevNull);
      f.set_flags(f.flags() & kKeptFlags);
      f.set_pos(0);
      f.set_rdev(st.st_rdev);
      f.set_object_inode(0);
      auto* id = f.mutable_file();
      id->Clear();
      id->set_path(kDevNull);
      id->set_dev(st.st_dev);
      id->set_inode(st.st_ino);
      id->set_mode(st.st_mode);
      id->set_size(static_cast<uint64_t>(st.st_size));
      id->set_mtime_ns(static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000ll + st.st_mtim.tv_nsec);
      f.set_restorable(true);  // file_id kept: dups of one description stay dups
    }
  }
  log::warn("--skip-unsupported-fds: /dev/null stands in for ", names);
}

}  // namespace lazycr::restore
