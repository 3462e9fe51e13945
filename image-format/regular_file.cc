#include "image-format/regular_file.h"

#include <fcntl.h>
#include <sys/stat.h>

#include "common/error.h"
#include "common/file_type.h"

namespace lazycr::image {

UniqueFd open_regular_file(const std::string& path, const char* what, uint64_t* size) {
  UniqueFd where(::open(path.c_str(), O_PATH | O_CLOEXEC));
  if (!where) fail_errno(path, ": cannot open ", what);
  struct stat st;
  if (::fstat(where.get(), &st) != 0) fail_errno(path, ": fstat failed");
  if (!S_ISREG(st.st_mode)) fail(path, ": not a regular file (", file_type_name(st.st_mode), ")");
  // Reopening the O_PATH descriptor opens that very inode, even if the path changed since.
  UniqueFd fd(::open(cat("/proc/self/fd/", where.get()).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fail_errno(path, ": cannot open ", what);
  *size = static_cast<uint64_t>(st.st_size);
  return fd;
}

}  // namespace lazycr::image
