// Descriptor kinds beyond files, pipes and sockets (eventfd, timerfd, signalfd, inotify,
// pidfd, ...): one unit per kind holding both halves, registered in one table (fd_kinds.cc),
// as CRIU's eventfd.c/timerfd.c. The dump asks the table to classify an anon-inode
// descriptor and to record its state; the restore asks it to validate that state and to make
// the open file description again. Neither names a kind, so adding a kind (mqueue, epoll) is
// one file and one table entry.
//
// Two ways to make a description at restore:
// - create: lazycr makes it before any process exists and hands it, through
//   restore/shared_files.h, to every descriptor of the image that shares it (dup'ed, or
//   inherited at fork): one description, as in the original.
// - create_inside: it needs the restored tree to exist (a pidfd); shared_files.h hands a
//   stand-in (/dev/null) at the descriptor's number and close-on-exec flag, and at
//   RestorePoint::kFilesInPlace the kind makes the real one inside the holder, which
//   replaces the stand-in (dups within a process stay dups).
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <set>
#include <string>

#include "common/fd.h"
#include "image-format/process.pb.h"
#include "objects/objects.h"
#include "objects/remote.h"

namespace lazycr::objects {

// What a kind's dump half is given, while the whole tree is frozen.
struct FdDumpSource {
  pid_t pid = 0;                          // the holder
  int fd = -1;                            // its number there
  std::string fdinfo;                     // /proc/PID/fdinfo/N
  int dup = -1;                           // lazycr's own descriptor of the same description
  const std::set<pid_t>* tree = nullptr;  // every process of the image, zombies included
};

// What a kind's create half is given.
struct FdCreateContext {
  // `path` opened for reading in lazycr as every holder of the description would open it
  // (its credentials, restore/open_files.h), checked to be the file (dev, inode) the image
  // names; throws otherwise. A kind acts on what this returns, never on the path again.
  std::function<UniqueFd(const std::string& path, bool directory, uint64_t dev, uint64_t inode)>
      open_readable;
};

struct FdKind {
  image::FileDescriptor::Kind kind;
  const char* anon_name;  // what /proc/PID/fd/N reads after "anon_inode:" ("[eventfd]")
  // Dump: fills this kind's fields of `f` (flags, cloexec and file_id are the caller's); throws
  // Error saying why lazycr cannot restore this one (the dump then refuses it by pid and fd).
  void (*dump)(const FdDumpSource& src, image::FileDescriptor& f);
  // Restore: throws naming the field of an image that is out of bounds or that this kernel
  // cannot make (`image_pids`: every process of the image).
  void (*validate)(const image::FileDescriptor& f, const std::set<int>& image_pids);
  // One of the two (see the top of this file). `create` returns lazycr's descriptor of the new
  // description, close-on-exec, status flags as the image's; `create_inside` returns the new
  // descriptor's number in the leader of `p`, status flags as the image's.
  UniqueFd (*create)(const image::FileDescriptor& f, const FdCreateContext& ctx);
  long (*create_inside)(RemoteProcess& p, const image::FileDescriptor& f);
};

// The kind's entry, or nullptr for a kind the table does not hold.
const FdKind* fd_kind(image::FileDescriptor::Kind kind);
// The entry whose anon_name is `anon_name`, or nullptr.
const FdKind* fd_kind_of_anon(const std::string& anon_name);

// The objects table's entry for these kinds: the create_inside ones, at kFilesInPlace.
void dump_fd_kinds(RemoteProcess& p, image::Process& proc, DumpContext& ctx);
void restore_fd_kinds(RestorePoint point, RemoteProcess& p, const image::Process& proc);

// Helpers for the kinds: the value after "key:" in fdinfo text (leading blanks dropped), or
// nullopt; and a hexadecimal / decimal value of one, throwing naming the key.
std::optional<std::string> fdinfo_value(const std::string& fdinfo, const std::string& key);
uint64_t fdinfo_number(const std::string& fdinfo, const std::string& key, int base);

// Each kind, one file each (objects/eventfd.cc, ...).
extern const FdKind kEventfdKind, kTimerfdKind, kSignalfdKind, kInotifyKind, kPidfdKind;

}  // namespace lazycr::objects
