#include "objects/net_lock.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <nftables/libnftables.h>
#include <sys/socket.h>

#include <cstring>
#include <memory>

#include "common/error.h"
#include "common/log.h"

namespace lazycr::objects {
namespace {

using image::InetSocket;

constexpr char kTable[] = "inet lazycr";

// The table, its sets and its chain; "create chain" fails when the chain exists, so the rules
// are added once whoever comes first.
constexpr char kSetup[] =
    "add table inet lazycr\n"
    "add set inet lazycr conns4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }\n"
    "add set inet lazycr conns6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }\n";
constexpr char kChain[] =
    "create chain inet lazycr input { type filter hook input priority raw; policy accept; }\n"
    "add rule inet lazycr input ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop\n"
    "add rule inet lazycr input ip6 saddr . tcp sport . ip6 daddr . tcp dport @conns6 drop\n";

// libnftables, loaded with dlopen the first time a lock is taken, deleted or checked: a lazycr
// that never locks (no established TCP connection) neither loads it nor its dependencies at
// start-up, nor needs it installed.
constexpr char kLibrary[] = "libnftables.so.1";

struct Nft {
  decltype(&nft_ctx_new) ctx_new;
  decltype(&nft_ctx_free) ctx_free;
  decltype(&nft_ctx_buffer_output) buffer_output;
  decltype(&nft_ctx_buffer_error) buffer_error;
  decltype(&nft_run_cmd_from_buffer) run_cmd_from_buffer;
  decltype(&nft_ctx_get_error_buffer) get_error_buffer;
};

template <typename F>
void load(void* lib, F& f, const char* name) {
  f = reinterpret_cast<F>(::dlsym(lib, name));
  if (f == nullptr) fail("network lock: ", kLibrary, " has no ", name);
}

// Throws one line naming the library when it cannot be loaded. Never unloaded.
const Nft& nft() {
  static const Nft loaded = [] {
    void* lib = ::dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* err = ::dlerror();
      fail("network lock: cannot load ", kLibrary, " (", err ? err : "dlopen failed",
           "); the nftables library is needed to lock TCP connections");
    }
    Nft n;
    load(lib, n.ctx_new, "nft_ctx_new");
    load(lib, n.ctx_free, "nft_ctx_free");
    load(lib, n.buffer_output, "nft_ctx_buffer_output");
    load(lib, n.buffer_error, "nft_ctx_buffer_error");
    load(lib, n.run_cmd_from_buffer, "nft_run_cmd_from_buffer");
    load(lib, n.get_error_buffer, "nft_ctx_get_error_buffer");
    return n;
  }();
  return loaded;
}

struct CtxFree {
  void operator()(nft_ctx* c) const { nft().ctx_free(c); }
};
using Ctx = std::unique_ptr<nft_ctx, CtxFree>;

Ctx new_ctx() {
  const Nft& n = nft();
  Ctx c(n.ctx_new(NFT_CTX_DEFAULT));
  if (!c) fail("network lock: nft_ctx_new failed");
  n.buffer_output(c.get());
  n.buffer_error(c.get());
  return c;
}

// Runs `cmd`; returns "" or nftables' error text.
std::string run(nft_ctx* c, const std::string& cmd) {
  if (nft().run_cmd_from_buffer(c, cmd.c_str()) == 0) return {};
  std::string err = nft().get_error_buffer(c);
  while (!err.empty() && (err.back() == '\n' || err.back() == ' ')) err.pop_back();
  return err.empty() ? std::string("failed") : err.substr(0, err.find('\n'));
}

bool v4_mapped(const std::string& a) {
  return a.size() == 16 && std::memcmp(a.data(), "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0;
}

std::string addr(const std::string& raw) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (raw.size() == 4 || v4_mapped(raw))
    ::inet_ntop(AF_INET, raw.data() + (raw.size() - 4), buf, sizeof buf);
  else if (raw.size() == 16)
    ::inet_ntop(AF_INET6, raw.data(), buf, sizeof buf);
  return buf;
}

// The set element matching the connection's incoming packets, or "" for an unusable record.
std::string element(const InetSocket& s) {
  const auto& t = s.tcp();
  const std::string& local = s.local_addr();
  const std::string& peer = t.peer_addr();
  if ((local.size() != 4 && local.size() != 16) || local.size() != peer.size()) return {};
  const bool v4 = local.size() == 4 || (v4_mapped(local) && v4_mapped(peer));
  return cat(v4 ? "conns4" : "conns6", " { ", addr(peer), " . ", t.peer_port(), " . ", addr(local),
             " . ", s.local_port(), " }");
}

}  // namespace

NetworkLock::NetworkLock(const google::protobuf::RepeatedPtrField<InetSocket>& all) {
  std::vector<std::string> want;
  for (const InetSocket& s : all)
    if (s.has_tcp()) {
      std::string e = element(s);
      if (e.empty()) fail("network lock: socket:[", s.inode(), "] has no usable 4-tuple");
      want.push_back(std::move(e));
    }
  if (want.empty()) return;
  Ctx c = new_ctx();
  if (std::string err = run(c.get(), kSetup); !err.empty())
    fail("network lock: making nftables table ", kTable, ": ", err);
  run(c.get(), kChain);  // fails when another lazycr made it first
  if (std::string err = run(c.get(), "list chain inet lazycr input"); !err.empty())
    fail("network lock: nftables chain ", kTable, " input: ", err);
  for (const std::string& e : want) {
    if (std::string err = run(c.get(), cat("add element ", kTable, " ", e)); !err.empty())
      fail("network lock: adding ", e, " to nftables table ", kTable, ": ", err);
    elements_.push_back(e);
    log::debug("network lock: ", e);
  }
}

NetworkLock::~NetworkLock() {
  if (elements_.empty()) return;
  try {
    Ctx c = new_ctx();
    for (const std::string& e : elements_)
      if (std::string err = run(c.get(), cat("delete element ", kTable, " ", e)); !err.empty())
        log::warn("network lock: cannot delete ", e, " from nftables table ", kTable, ": ", err);
  } catch (const Error& e) {
    log::warn(e.what());
  }
}

void unlock_connections(const google::protobuf::RepeatedPtrField<InetSocket>& all) {
  try {
    Ctx c;
    for (const InetSocket& s : all) {
      if (!s.has_tcp()) continue;
      std::string e = element(s);
      if (e.empty()) continue;
      if (!c) {
        c = new_ctx();
        if (!run(c.get(), "list table inet lazycr").empty()) return;  // no lock here
      }
      if (std::string err = run(c.get(), cat("delete element ", kTable, " ", e)); !err.empty())
        log::debug("network lock: ", e, " not deleted: ", err);
      else
        log::debug("network lock: ", e, " deleted");
    }
  } catch (const Error& e) {
    log::warn(e.what());
  }
}

bool network_lock_available(std::string& detail) {
  try {
    Ctx c = new_ctx();
    if (std::string err = run(c.get(), "list tables"); !err.empty()) {
      detail = cat("nftables: ", err);
      return false;
    }
    detail = "nf_tables (libnftables)";
    return true;
  } catch (const Error& e) {
    detail = e.what();
    return false;
  }
}

}  // namespace lazycr::objects
