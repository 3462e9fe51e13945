#include "image-format/regular_file.h"

#include <fcntl.h>
#include <sys/stat.h>

#include "common/error.h"

namespace lazycr::image {
namespace {

const char* file_kind(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFIFO:
      return "a FIFO";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFSOCK:
      return "a socket";
    case S_IFDIR:
      return "a directory";
    default:
      return "of an unknown type";
  }
}

}  // namespace

UniqueFd open_regular_file(const std::string& path, const char* what, uint64_t* size) {
  UniqueFd where(::open(path.c_str(), O_PATH | O_CLOEXEC));
  if (!where) fail_errno(path, ": cannot open ", what);
  struct stat st;
  if (::fstat(where.get(), &st) != 0) fail_errno(path, ": fstat failed");
  if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file (", file_kind(st.st_mode), ")");
  // Reopening the O_PATH descriptor opens that very inode, even if the path changed since.
  UniqueFd fd(::open(cat("/proc/self/fd/", where.get()).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno(path, ": cannot open ", what);
  *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

}  // namespace lazycr::image
