// POSIX message queue descriptors (MQUEUE, mq_open): the queue's name, attributes, mode and
// the messages queued at dump; made again by lazycr. A queue whose name still exists at
// restore is opened by name as the holders would (its messages are its own by then, as a
// file's contents are); a queue that is gone, or was unlinked, is created with the recorded
// messages (and unlinked again).
#include <fcntl.h>
#include <mqueue.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "objects/fd_kinds.h"

namespace lazycr::objects {
namespace {

constexpr const char kDeleted[] = " (deleted)";
// Bounds for untrusted images, above what a default kernel allows (fs.mqueue.msg_max = 10,
// msgsize_max = 8192; HARD_MSGMAX 65536, HARD_MSGSIZEMAX 16 MiB).
constexpr int64_t kMaxMessages = 65536;
constexpr int64_t kMaxMessageSize = 16 << 20;
constexpr uint64_t kMaxQueuedBytes = 64ull << 20;
constexpr uint32_t kMaxPriority = 32768;  // MQ_PRIO_MAX
constexpr size_t kMaxName = 255;          // NAME_MAX

// "QSIZE:7 NOTIFY:0 SIGNO:0 NOTIFY_PID:0": what reading a queue's descriptor gives.
int status_field(const std::string& status, const std::string& key) {
  size_t at = status.find(key + ":");
  if (at == std::string::npos) fail("its status '", status, "' has no ", key);
  return std::atoi(status.c_str() + at + key.size() + 1);
}

// A time in the past: mq_timed{send,receive} then never wait, whatever the description's
// O_NONBLOCK (which the holders share and must not see change).
const struct timespec kNoWait = {0, 0};

void dump(const FdDumpSource& src, image::FileDescriptor& f) {
  std::string name = f.target();
  const bool unlinked =
      name.size() > sizeof kDeleted - 1 &&
      name.compare(name.size() - (sizeof kDeleted - 1), std::string::npos, kDeleted) == 0;
  if (unlinked) name.resize(name.size() - (sizeof kDeleted - 1));
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos)
    fail("message queue name '", name, "' is not /NAME");
  // pread: a read() would move the position the holders share.
  char buf[128] = {};
  ssize_t n = ::pread(src.dup, buf, sizeof buf - 1, 0);
  if (n < 0) fail_errno("reading the status of message queue ", name);
  const std::string status(buf, static_cast<size_t>(n));
  if (status_field(status, "NOTIFY_PID") != 0)
    fail("message queue ", name, " has an mq_notify() registration (its sigev_value cannot be ",
         "read from outside the process)");
  struct mq_attr attr;
  if (::mq_getattr(src.dup, &attr) != 0) fail_errno("mq_getattr of message queue ", name);
  struct stat st;
  if (::fstat(src.dup, &st) != 0) fail_errno("fstat of message queue ", name);
  auto* q = f.mutable_mqueue();
  q->set_name(name);
  q->set_unlinked(unlinked);
  q->set_mode(st.st_mode & 07777);
  q->set_max_messages(attr.mq_maxmsg);
  q->set_message_size(attr.mq_msgsize);
  // No peek for a message queue: every message is taken and put back at once, in the order
  // mq_receive gave them (highest priority first, oldest first within one), which is the
  // order they then have again.
  std::vector<char> msg(static_cast<size_t>(attr.mq_msgsize));
  std::vector<std::pair<unsigned, std::string>> taken;
  for (long i = 0; i < attr.mq_curmsgs + 1; i++) {
    unsigned prio = 0;
    ssize_t got = ::mq_timedreceive(src.dup, msg.data(), msg.size(), &prio, &kNoWait);
    if (got < 0) {
      if (errno == EAGAIN || errno == ETIMEDOUT) break;
      int err = errno;
      for (const auto& [p, m] : taken) ::mq_timedsend(src.dup, m.data(), m.size(), p, &kNoWait);
      fail_errno_value(err, cat("reading the messages of message queue ", name));
    }
    taken.emplace_back(prio, std::string(msg.data(), static_cast<size_t>(got)));
  }
  size_t lost = 0;
  for (const auto& [p, m] : taken) {
    if (::mq_timedsend(src.dup, m.data(), m.size(), p, &kNoWait) != 0) lost++;
    auto* rec = q->add_messages();
    rec->set_priority(p);
    rec->set_data(m);
  }
  if (lost != 0)
    fail(lost, " message(s) of message queue ", name,
         " could not be put back (a process outside the tree filled it meanwhile)");
}

void validate(const image::FileDescriptor& f, const std::set<int>&) {
  if (!f.has_mqueue()) fail("has no message queue state");
  const auto& q = f.mqueue();
  if (q.name().size() < 2 || q.name().size() > kMaxName + 1 || q.name()[0] != '/' ||
      q.name().find('/', 1) != std::string::npos || q.name().find('\0') != std::string::npos)
    fail("message queue name '", q.name(), "' is not /NAME");
  if (q.max_messages() < 1 || q.max_messages() > kMaxMessages)
    fail("message queue ", q.name(), ": max_messages ", q.max_messages(), " out of 1..",
         kMaxMessages);
  if (q.message_size() < 1 || q.message_size() > kMaxMessageSize)
    fail("message queue ", q.name(), ": message_size ", q.message_size(), " out of 1..",
         kMaxMessageSize);
  if (q.messages_size() > q.max_messages())
    fail("message queue ", q.name(), ": ", q.messages_size(), " messages, more than its ",
         q.max_messages());
  uint64_t bytes = 0;
  for (const auto& m : q.messages()) {
    if (m.priority() >= kMaxPriority)
      fail("message queue ", q.name(), ": priority ", m.priority(), " >= ", kMaxPriority);
    if (static_cast<int64_t>(m.data().size()) > q.message_size())
      fail("message queue ", q.name(), ": a message of ", m.data().size(),
           " bytes, more than its message size ", q.message_size());
    bytes += m.data().size();
  }
  if (bytes > kMaxQueuedBytes) fail("message queue ", q.name(), ": ", bytes, " bytes queued");
  if (q.mode() & ~07777u) fail("message queue ", q.name(), ": mode ", q.mode());
}

int access_flags(const image::FileDescriptor& f) {
  return (f.flags() & (O_ACCMODE | O_NONBLOCK)) | O_CLOEXEC;
}

UniqueFd open_existing(const image::FileDescriptor& f, const FdCreateContext& ctx) {
  UniqueFd fd;
  ctx.as_holders([&] {
    UniqueFd got(::mq_open(f.mqueue().name().c_str(), access_flags(f)));
    if (!got) fail_errno("mq_open(", f.mqueue().name(), ")");
    if (!fd) fd = std::move(got);
  });
  return fd;
}

UniqueFd create(const image::FileDescriptor& f, const FdCreateContext& ctx) {
  const auto& q = f.mqueue();
  if (!q.unlinked()) {
    UniqueFd probe(::mq_open(q.name().c_str(), O_RDONLY | O_CLOEXEC));
    if (probe || errno != ENOENT) return open_existing(f, ctx);
  }
  // Made afresh with the recorded messages: under its own name, or (unlinked) a unique one
  // that goes away once the description is open.
  std::string name = q.name();
  struct mq_attr attr = {};
  attr.mq_maxmsg = q.max_messages();
  attr.mq_msgsize = q.message_size();
  UniqueFd fill;
  ctx.as_holders([&] {
    if (fill) return;
    const int flags = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NONBLOCK;
    const auto mode = static_cast<mode_t>(q.mode());
    fill.reset(::mq_open(name.c_str(), flags, mode, &attr));
    // An unlinked queue keeps its name where it is free (/proc/PID/fd shows it), else gets a
    // name of its own for the moment it takes to open it.
    if (!fill && errno == EEXIST && q.unlinked()) {
      name = cat("/lazycr-", ::getpid(), "-", q.name().substr(1));
      fill.reset(::mq_open(name.c_str(), flags, mode, &attr));
    }
    if (!fill)
      fail_errno("mq_open(", name, ", O_CREAT) with ", q.max_messages(), " x ", q.message_size(),
                 " bytes");
    // The creator's umask (lazycr's) took bits off the image's mode.
    if (::fchmod(fill.get(), static_cast<mode_t>(q.mode())) != 0)
      fail_errno("fchmod of message queue ", name);
  });
  // An unlinked queue's temporary name goes once the description is open (or on failure).
  struct UnlinkAtEnd {
    const std::string* name = nullptr;
    ~UnlinkAtEnd() {
      if (name != nullptr) ::mq_unlink(name->c_str());
    }
  } unlink_at_end{q.unlinked() ? &name : nullptr};
  try {
    for (const auto& m : q.messages())
      if (::mq_timedsend(fill.get(), m.data().data(), m.data().size(), m.priority(), &kNoWait) != 0)
        fail_errno("putting a message back into message queue ", name);
    if ((access_flags(f) & O_ACCMODE) == O_RDWR && (f.flags() & O_NONBLOCK)) return fill;
    UniqueFd fd(::mq_open(name.c_str(), access_flags(f)));
    if (!fd) fail_errno("mq_open(", name, ")");
    return fd;
  } catch (...) {
    if (!q.unlinked()) ::mq_unlink(name.c_str());
    throw;
  }
}

}  // namespace

const FdKind kMqueueKind = {
    image::FileDescriptor::MQUEUE, nullptr, dump, validate, create, nullptr};

}  // namespace lazycr::objects
