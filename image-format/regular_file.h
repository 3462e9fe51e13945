// Opening a file of an image, which is untrusted: a FIFO in its place would block open(2)
// forever and a device node would run its driver's open. Nothing is opened for reading until
// fstat on an O_PATH descriptor says the path is a regular file.
#pragma once

#include <cstdint>
#include <string>

#include "common/fd.h"

namespace lazycr::image {

// Opens `path` read-only if it is a regular file (symlinks followed); sets *size. Throws Error
// "<path>: cannot open <what>: <errno>" or "<path>: not a regular file (a FIFO)".
UniqueFd open_regular_file(const std::string& path, const char* what, uint64_t* size);

}  // namespace lazycr::image
