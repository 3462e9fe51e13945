// The type of a file as a message says it: "a FIFO", "a regular file", ...
#pragma once

#include <sys/stat.h>

#include <string>

#include "common/error.h"

namespace lazycr {

inline std::string file_type_name(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFREG:
      return "a regular file";
    case S_IFDIR:
      return "a directory";
    case S_IFCHR:
      return "a character device";
    case S_IFBLK:
      return "a block device";
    case S_IFIFO:
      return "a FIFO";
    case S_IFSOCK:
      return "a socket";
    case S_IFLNK:
      return "a symbolic link";
    default:
      return cat("file type 0", std::oct, mode & S_IFMT);
  }
}

}  // namespace lazycr
