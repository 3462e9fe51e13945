// Established TCP connections (dump and restore --tcp-established), both halves, through
// TCP_REPAIR as CRIU does. A connection is an image::InetSocket (objects/inet_socket.h: its
// local address and socket options, shared.pb keyed by inode) with `tcp` set: the peer, both
// sequence numbers, both queues, MSS, window and the options negotiated at the handshake.
//
// Dump: lazycr's own descriptor of the socket (pidfd_getfd, the tree frozen) is put in repair
// mode, which the socket shares with the tree, and everything is read through it without
// consuming anything. The copies stay in repair mode (TcpRepairHold) until the dump ends:
// --leave-running turns repair off (the connection works on, nothing was sent); otherwise the
// tree is killed and the copies are closed still in repair mode, which the kernel closes
// silently (tcp_close -> tcp_disconnect sends no RST and no FIN for a socket under repair):
// the peer sees nothing until the restored socket talks to it.
//
// Restore: create_inet_socket() makes the socket in repair mode before its bind (repair sets
// SK_FORCE_REUSE: the port of a listener of the tree, or of an accepted connection, binds),
// then finish_in_repair() sets the sequence numbers, connects (no packet), puts back options,
// queues and window. Repair is turned off for every connection together (TcpRestoreBatch),
// once all of the image's sockets exist: a connection whose peer is in the tree must not
// probe a peer that is not there yet (it would answer with a reset).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/fd.h"
#include "image-format/shared.pb.h"

namespace lazycr::objects {

// Lazycr's copies of the connections put in repair mode by a dump.
class TcpRepairHold {
 public:
  TcpRepairHold() = default;
  TcpRepairHold(TcpRepairHold&&) = default;
  TcpRepairHold& operator=(TcpRepairHold&&) = default;
  // Repair off on each: a failed dump leaves the connections as they were.
  ~TcpRepairHold();
  // `reuseaddr`: SO_REUSEADDR as it was before repair mode (which forces reuse; turning
  // repair off clears it).
  void add(UniqueFd sock, std::string what, bool reuseaddr);
  // --leave-running: repair off now; the tree's connections go on.
  void resume();
  // The tree is dead: close the copies in repair mode, so that the last close sends nothing.
  void close_silently();
  size_t size() const { return socks_.size(); }

 private:
  struct Held {
    UniqueFd fd;
    std::string what;
    bool reuseaddr;
  };
  std::vector<Held> socks_;
};

// True for a TCP socket that is neither listening nor closed (a connection, in any state).
bool is_tcp_connection(int sock);

// Dump: fills `out.tcp` from `sock` (lazycr's descriptor of the socket, the tree frozen) and
// returns true, the socket left in repair mode and a copy of it in `hold`; the caller fills the
// rest of `out` with dump_inet_socket(). Returns false with `why` naming the connection when it
// cannot be recorded: without `allowed` (dump --tcp-established), in a state other than
// ESTABLISHED, with urgent data pending or at the urgent mark (the repair queues carry no
// urgent pointer), or when repair mode is refused. Options lazycr does not restore are
// refused by dump_inet_socket().
bool dump_tcp_connection(int sock, uint64_t inode, bool allowed, image::InetSocket& out,
                         std::string& why, TcpRepairHold& hold);

// Restore: throws naming the field of `s.tcp` that is out of bounds, or the connection when
// the restore was not asked for connections (`allowed`: restore --tcp-established).
void validate_tcp_connection(const image::InetSocket& s, bool allowed);

// Restore, for create_inet_socket(): repair mode on `fd` (before its bind), then, bound,
// everything but the end of repair mode; throws naming `what`.
void enter_repair(int fd, const std::string& what);
void finish_in_repair(int fd, const image::InetSocket& s, const std::string& what);

// Restore: the connections made, repair turned off together once every socket of the image
// exists; closed while still in repair mode (silently) if the restore fails before.
class TcpRestoreBatch {
 public:
  TcpRestoreBatch() = default;
  TcpRestoreBatch(TcpRestoreBatch&&) = default;
  TcpRestoreBatch& operator=(TcpRestoreBatch&&) = default;
  // `fd`: lazycr's descriptor of the connection made by create_inet_socket() (dup'ed here).
  void add(int fd, const image::InetSocket& s, const std::string& what);
  // Repair off on each, the unsent bytes queued again (they go out now), buffer sizes as the
  // image's; throws naming the connection.
  void finish();

 private:
  struct Pending {
    UniqueFd fd;
    const image::InetSocket* s;
    std::string what;
  };
  std::vector<Pending> pending_;
};

// "TCP/IPv4 connection 127.0.0.1:20001 <-> 127.0.0.1:41234 (12 bytes unread, 3 unsent)".
std::string describe_tcp_connection(const image::InetSocket& s);

}  // namespace lazycr::objects
