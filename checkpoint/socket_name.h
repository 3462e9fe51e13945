// Internal to checkpoint/: what a socket lazycr cannot restore is, for refusals: family, type,
// protocol and addresses ("TCP/IPv4 socket listening on 127.0.0.1:6379").
#pragma once

#include <string>

namespace lazycr::checkpoint {

// `sock` is lazycr's own descriptor of the socket (pidfd_getfd). Never throws: what cannot be
// read is left out.
std::string describe_socket(int sock);

}  // namespace lazycr::checkpoint
