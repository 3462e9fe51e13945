// The IPv4/IPv6 socket family's entry in objects/socket_families.h: both halves of the
// family as a whole, over its parts (objects/inet_socket.h for every socket,
// objects/tcp_connection.h for established connections, objects/tcp_pending.h for clients
// queued at a listener of the tree, objects/net_lock.h for the dump's network lock).
#include <fcntl.h>

#include "common/error.h"
#include "common/log.h"
#include "objects/inet_socket.h"
#include "objects/net_lock.h"
#include "objects/socket_families.h"
#include "objects/tcp_connection.h"
#include "objects/tcp_pending.h"

namespace lazycr::objects {
namespace {

using image::InetSocket;

void dump_family(SocketDump& d) {
  // Two passes: first every socket, so that a listener's queued connections can be matched
  // with their clients in the tree (objects/tcp_pending.h).
  std::map<uint64_t, UniqueFd> fds;
  for (auto& [inode, h] : d.untaken) {
    UniqueFd sock;
    try {
      sock = h.open();
    } catch (const Error&) {
      continue;  // left to the caller, which names what it can of it
    }
    if (is_inet_socket(sock.get())) fds[inode] = std::move(sock);
  }
  std::map<uint64_t, int> raw;
  for (const auto& [inode, fd] : fds) raw[inode] = fd.get();
  const PendingAccepts pending = find_pending_accepts(raw);
  for (const auto& [inode, fd] : fds) {
    d.untaken.erase(inode);
    if (auto no = pending.why_not.find(inode); no != pending.why_not.end()) {
      d.why_not[inode] = no->second;
      continue;
    }
    const int sock = fd.get();
    InetSocket in;
    if (auto l = pending.listeners.find(inode); l != pending.listeners.end())
      in.set_accept_queue(l->second);
    const bool queued_client = pending.clients.count(inode) > 0;
    in.set_pending_accept(queued_client);
    std::string why;
    if ((queued_client || !is_tcp_connection(sock) ||
         dump_tcp_connection(sock, inode, d.opts.tcp_established, in, why, *d.tcp_repair)) &&
        dump_inet_socket(sock, inode, in, why)) {
      d.restorable.insert(inode);
      log::debug("socket:[", inode, "]: ", describe_inet_socket(in));
      *d.out->add_inet_sockets() = std::move(in);
    } else {
      d.why_not[inode] = why;
    }
  }
}

void validate_family(const image::SharedObjects& shared, const SocketOptions& opts) {
  for (const auto& s : shared.inet_sockets()) {
    validate_inet_socket(s);
    if (s.has_tcp()) validate_tcp_connection(s, opts.tcp_established);
  }
  validate_pending_accepts(shared.inet_sockets());
}

class InetSocketRestore : public SocketRestore {
 public:
  explicit InetSocketRestore(const image::SharedObjects& shared) : all_(shared.inet_sockets()) {
    for (const auto& s : all_) sockets_[s.inode()] = &s;
  }
  bool has(uint64_t inode) const override { return sockets_.count(inode) != 0; }

  std::map<uint64_t, UniqueFd> create(
      const std::map<uint64_t, std::string>& held,
      const std::function<void(uint64_t, const std::function<void()>&)>&) override {
    std::map<uint64_t, UniqueFd> made;
    for (const auto& [inode, who] : held) {
      const InetSocket& s = *sockets_.at(inode);
      UniqueFd fd = create_inet_socket(s, who);
      if (s.has_tcp()) tcp_.add(fd.get(), s, who);
      if (s.pending_accept()) {
        UniqueFd copy(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
        if (!copy) fail_errno("socket inode ", inode, ": dup");
        pending_connects_.push_back(
            {std::move(copy), &s, cat(describe_inet_socket(s), " (", who, ")")});
      }
      made[inode] = std::move(fd);
    }
    return made;
  }

  void finish() override {
    tcp_.finish();             // every socket exists: TCP connections leave repair mode together
    unlock_connections(all_);  // the dump's network lock
    // Then the clients that were queued at a listener of the tree connect to it again.
    for (auto& [fd, s, what] : pending_connects_) connect_pending(fd.get(), *s, what);
    pending_connects_.clear();
  }

 private:
  const google::protobuf::RepeatedPtrField<InetSocket>& all_;
  std::map<uint64_t, const InetSocket*> sockets_;
  TcpRestoreBatch tcp_;  // connections made in repair mode, until all exist
  struct PendingConnect {
    UniqueFd fd;
    const InetSocket* s;
    std::string what;
  };
  std::vector<PendingConnect> pending_connects_;  // clients queued at a listener of the tree
};

std::unique_ptr<SocketRestore> restore_family(const image::SharedObjects& shared,
                                              const SocketOptions&) {
  return std::make_unique<InetSocketRestore>(shared);
}

}  // namespace

const SocketFamily kInetSocketFamily{"IPv4/IPv6", dump_family, validate_family, restore_family};

}  // namespace lazycr::objects
