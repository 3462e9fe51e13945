// The monotonic clock in nanoseconds (CLOCK_MONOTONIC, std::chrono::steady_clock's on Linux):
// for durations and deadlines, compared only with itself.
#pragma once

#include <time.h>

#include <cstdint>

namespace lazycr {

inline int64_t monotonic_ns() {
  timespec t;
  ::clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1'000'000'000LL + t.tv_nsec;
}

// The same clock, unsigned: for the laps and stamps that only subtract a later from an earlier.
inline uint64_t now_ns() {
  return static_cast<uint64_t>(monotonic_ns());
}

}  // namespace lazycr
