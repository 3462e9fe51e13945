// Errors are exceptions carrying one line: what failed, on what, and why.
// They are caught once, by the CLI, and printed once.
#pragma once

#include <cerrno>
#include <sstream>
#include <stdexcept>
#include <string>

namespace lazycr {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg, int err = 0) : std::runtime_error(msg), errno_(err) {}
  // The errno behind this error, or 0 when it did not come from a system call.
  int sys_errno() const { return errno_; }

 private:
  int errno_;
};

// Concatenates its arguments with operator<<; g++ 12 has no <format>.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(cat(args...));
}

// "<what>: <strerror(err)>", keeping err for callers that branch on it.
[[noreturn]] void fail_errno_value(int err, const std::string& what);

template <typename... Args>
[[noreturn]] void fail_errno(const Args&... args) {
  int err = errno;
  fail_errno_value(err, cat(args...));
}

}  // namespace lazycr
