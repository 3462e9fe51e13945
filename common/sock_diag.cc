#include "common/sock_diag.h"

#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <linux/unix_diag.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"
#include "common/fd.h"

namespace lazycr::sockdiag {
namespace {

constexpr uint32_t kShutdownRead = 1;   // RCV_SHUTDOWN
constexpr uint32_t kShutdownWrite = 2;  // SEND_SHUTDOWN
constexpr int kAllStates = -1;

}  // namespace

UnixSocket parse_unix_diag_msg(const void* data, size_t len) {
  if (len < sizeof(unix_diag_msg)) fail("sock_diag: UNIX message of ", len, " bytes is too short");
  unix_diag_msg msg;
  std::memcpy(&msg, data, sizeof msg);
  UnixSocket s;
  s.inode = msg.udiag_ino;
  s.type = msg.udiag_type;
  s.state = msg.udiag_state;
  const char* base = static_cast<const char*>(data);
  size_t off = NLMSG_ALIGN(sizeof(unix_diag_msg));
  while (off + sizeof(nlattr) <= len) {
    nlattr attr;
    std::memcpy(&attr, base + off, sizeof attr);
    if (attr.nla_len < sizeof(nlattr) || off + attr.nla_len > len)
      fail("sock_diag: bad attribute length ", attr.nla_len, " for socket:[", s.inode, "]");
    const char* payload = base + off + NLA_HDRLEN;
    size_t plen = attr.nla_len - NLA_HDRLEN;
    switch (attr.nla_type & NLA_TYPE_MASK) {
      case UNIX_DIAG_NAME:
        s.name.assign(payload, plen);
        // A path may come with its terminating NUL (bound with the whole sockaddr_un).
        if (!s.name.empty() && s.name[0] != '\0')
          while (!s.name.empty() && s.name.back() == '\0') s.name.pop_back();
        break;
      case UNIX_DIAG_PEER:
        if (plen >= 4) {
          uint32_t v;
          std::memcpy(&v, payload, 4);
          s.peer = v;
        }
        break;
      case UNIX_DIAG_RQLEN:
        if (plen >= sizeof(unix_diag_rqlen)) {
          unix_diag_rqlen rq;
          std::memcpy(&rq, payload, sizeof rq);
          s.rqueue = rq.udiag_rqueue;
          s.wqueue = rq.udiag_wqueue;
        }
        break;
      case UNIX_DIAG_SHUTDOWN:
        if (plen >= 1) {
          uint8_t v = static_cast<uint8_t>(payload[0]);
          s.shutdown_read = v & kShutdownRead;
          s.shutdown_write = v & kShutdownWrite;
        }
        break;
      case UNIX_DIAG_ICONS:
        for (size_t i = 0; i + 4 <= plen; i += 4) {
          uint32_t v;
          std::memcpy(&v, payload + i, 4);
          s.icons.push_back(v);
        }
        break;
      case UNIX_DIAG_VFS:
        if (plen >= sizeof(unix_diag_vfs)) {
          unix_diag_vfs v;
          std::memcpy(&v, payload, sizeof v);
          s.vfs_dev = v.udiag_vfs_dev;
          s.vfs_ino = v.udiag_vfs_ino;
        }
        break;
      default:
        break;
    }
    off += NLA_ALIGN(attr.nla_len);
  }
  return s;
}

std::map<uint64_t, UnixSocket> unix_sockets() {
  UniqueFd nl(::socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG));
  if (!nl) fail_errno("sock_diag: socket(AF_NETLINK, NETLINK_SOCK_DIAG)");
  struct {
    nlmsghdr hdr;
    unix_diag_req req;
  } request;
  std::memset(&request, 0, sizeof request);
  request.hdr.nlmsg_len = sizeof request;
  request.hdr.nlmsg_type = SOCK_DIAG_BY_FAMILY;
  request.hdr.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  request.hdr.nlmsg_seq = 1;
  request.req.sdiag_family = AF_UNIX;
  request.req.udiag_states = static_cast<uint32_t>(kAllStates);
  request.req.udiag_show =
      UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN | UDIAG_SHOW_ICONS | UDIAG_SHOW_VFS;
  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  if (::sendto(nl.get(), &request, sizeof request, 0, reinterpret_cast<sockaddr*>(&kernel),
               sizeof kernel) != static_cast<ssize_t>(sizeof request))
    fail_errno("sock_diag: sending the UNIX_DIAG dump request");

  std::map<uint64_t, UnixSocket> out;
  std::vector<char> buf(64 * 1024);
  for (;;) {
    ssize_t n = ::recv(nl.get(), buf.data(), buf.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno("sock_diag: reading the UNIX_DIAG dump");
    if (n == 0) fail("sock_diag: the UNIX_DIAG dump ended without NLMSG_DONE");
    size_t left = static_cast<size_t>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf.data()); NLMSG_OK(h, left);
         h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_type == NLMSG_DONE) return out;
      if (h->nlmsg_type == NLMSG_ERROR) {
        int err = 0;
        if (h->nlmsg_len >= NLMSG_LENGTH(sizeof(nlmsgerr)))
          err = -reinterpret_cast<nlmsgerr*>(NLMSG_DATA(h))->error;
        fail_errno_value(err, "sock_diag: UNIX_DIAG dump refused");
      }
      if (h->nlmsg_type != SOCK_DIAG_BY_FAMILY) continue;
      UnixSocket s = parse_unix_diag_msg(NLMSG_DATA(h), h->nlmsg_len - NLMSG_LENGTH(0));
      out[s.inode] = std::move(s);
    }
  }
}

}  // namespace lazycr::sockdiag
