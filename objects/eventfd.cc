// eventfd (EVENTFD): its counter and EFD_SEMAPHORE from fdinfo; made again by lazycr with the
// counter written into it, non-blocking if it was.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>

#include "common/error.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

// The largest count an eventfd holds (a write that would reach 2^64 - 1 blocks).
constexpr uint64_t kMaxCount = UINT64_MAX - 1;

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  auto* e = f.mutable_eventfd();
  e->set_count(fdinfo_number(src.fdinfo, "eventfd-count", 16));
  // Linux 6.6 added the line; before it nothing tells a semaphore from a counter.
  if (!fdinfo_value(src.fdinfo, "eventfd-semaphore"))
    fail(
        "this kernel's fdinfo does not say whether it is an EFD_SEMAPHORE eventfd (Linux >= 6.6 "
        "does)");
  e->set_semaphore(fdinfo_number(src.fdinfo, "eventfd-semaphore", 10) != 0);
}

void validate(const image::FileDescriptor& f, const std::set<int>&) {
  if (!f.has_eventfd()) fail("has no eventfd state");
  if (f.eventfd().count() > kMaxCount)
    fail("eventfd count ", f.eventfd().count(), " exceeds ", kMaxCount);
}

UniqueFd create(const image::FileDescriptor& f, const FdCreateContext&) {
  const auto& e = f.eventfd();
  int flags = EFD_CLOEXEC | (e.semaphore() ? EFD_SEMAPHORE : 0) |
              (f.flags() & O_NONBLOCK ? EFD_NONBLOCK : 0);
  UniqueFd fd(::eventfd(0, flags));
  if (!fd) fail_errno("eventfd(0, ", flags, ")");
  // eventfd() takes an unsigned int; a write adds any count below 2^64 - 1 without blocking.
  uint64_t count = e.count();
  if (count != 0 && ::write(fd.get(), &count, sizeof count) != sizeof count)
    fail_errno("writing its count ", count, " into the new eventfd");
  return fd;
}

}  // namespace

const FdKind kEventfdKind = {
    image::FileDescriptor::EVENTFD, "[eventfd]", dump, validate, create, nullptr};

}  // namespace lazycr::objects
