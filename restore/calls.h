// Internal to restore/: a system call to run inside the process being built (batched from the
// trampoline, see RemoteProcess::batch()).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>

namespace lazycr::restore {

struct Call {
  long nr;
  std::array<uint64_t, 6> a;
  std::string what;  // for the error message
};

inline Call make_call(std::string what, long nr, uint64_t a1 = 0, uint64_t a2 = 0, uint64_t a3 = 0,
                      uint64_t a4 = 0, uint64_t a5 = 0, uint64_t a6 = 0) {
  return Call{nr, {a1, a2, a3, a4, a5, a6}, std::move(what)};
}

}  // namespace lazycr::restore
