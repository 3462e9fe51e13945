#include "common/error.h"

#include <cstring>

namespace lazycr {

void fail_errno_value(int err, const std::string& what) {
  throw Error(what + ": " + std::strerror(err), err);
}

}  // namespace lazycr
