// Socket names for messages: what a socket lazycr cannot restore is, for refusals: family,
// type, protocol and addresses ("TCP/IPv4 socket listening on 127.0.0.1:6379"); and the one
// naming of socket types the families' own messages use.
#pragma once

#include <string>

namespace lazycr::objects {

// `sock` is lazycr's own descriptor of the socket (pidfd_getfd). Never throws: what cannot be
// read is left out.
std::string describe_socket(int sock);

// "stream", "datagram", "seqpacket", "raw", "type 7" (SOCK_*, as in "a stream socket").
std::string socket_type_text(int type);
// "SOCK_STREAM", "SOCK_DGRAM", "SOCK_SEQPACKET", "SOCK_RAW", "type 7": the constant, as in
// "socket(AF_UNIX, SOCK_STREAM)".
std::string socket_type_constant(int type);

}  // namespace lazycr::objects
