// Incremental images: parents, their identity and the linking of a child's stores to them.
#include "image-format/image_chain.h"

#include <openssl/evp.h>

#include <boost/filesystem.hpp>
#include <cstdio>
#include <cstdlib>

#include "common/error.h"
#include "common/proc.h"
#include "image-format/image_dir.h"

namespace lazycr::image {

namespace fs = boost::filesystem;

std::string short_hex(const std::string& digest) {
  std::string out;
  char b[3];
  for (size_t i = 0; i < digest.size() && i < 8; ++i) {
    std::snprintf(b, sizeof b, "%02x", static_cast<unsigned char>(digest[i]));
    out += b;
  }
  return out;
}

std::string image_identity_digest(const ImageReader& img) {
  std::string text = proc::read_file(inventory_path(img.dir()));
  for (int pid : img.inventory().pids()) {
    if (!img.has_pages(pid)) continue;
    text += cat("\npid ", pid, "\n");
    text += img.pages(pid).mac_digest();
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(text.data(), text.size(), md, &len, EVP_sha256(), nullptr) != 1 || len != 32)
    fail("libcrypto cannot compute a SHA-256");
  return std::string(reinterpret_cast<const char*>(md), len);
}

std::string read_boot_id() {
  std::string id = proc::read_file("/proc/sys/kernel/random/boot_id");
  while (!id.empty() && (id.back() == '\n' || id.back() == ' ')) id.pop_back();
  return id;
}

void check_same_tree(const Inventory& parent, int32_t root_pid, uint64_t start_ticks,
                     const std::string& boot_id, const std::string& what) {
  if (parent.root_start_ticks() == 0 || parent.boot_id().empty())
    fail(what, ": records no tree identity (written before incremental dumps): cannot be a parent");
  if (parent.boot_id() != boot_id)
    fail(what, ": a dump from another boot (", parent.boot_id(), ", now ", boot_id, ")");
  if (parent.root_pid() != root_pid || parent.root_start_ticks() != start_ticks)
    fail(what, ": a dump of another tree (root pid ", parent.root_pid(), " started at tick ",
         parent.root_start_ticks(), "; this one is pid ", root_pid, " started at tick ",
         start_ticks, ")");
}

namespace {

// Depth of ImageReaders being constructed on this thread through parents: a chain that loops
// back (A's parent B, B's parent A) is refused at kMaxChainLength instead of recursing forever.
thread_local uint32_t opening_depth = 0;

struct DepthGuard {
  DepthGuard() { ++opening_depth; }
  ~DepthGuard() { --opening_depth; }
};

std::shared_ptr<ImageReader> open_parent(const std::string& dir, const std::string& what) {
  boost::system::error_code ec;
  if (!fs::exists(fs::symlink_status(dir, ec)))
    fail(what, ": missing (", ec ? ec.message() : "no such directory", ")");
  if (opening_depth >= kMaxChainLength)
    fail(what, ": the chain is longer than ", kMaxChainLength, " links (or loops)");
  DepthGuard guard;
  try {
    return std::make_shared<ImageReader>(dir);
  } catch (const Error& e) {
    fail(what, ": ", e.what());
  }
}

uint32_t chain_length_of(const Inventory& inv) {
  return inv.has_parent() ? inv.parent().chain_length() : 0;
}

}  // namespace

void ImageReader::link_parent_image() {
  if (!inventory_.has_parent()) return;
  const ParentImage& rec = inventory_.parent();
  const std::string what = cat("parent image ", rec.dir(), " of ", dir_);
  if (rec.dir().empty() || rec.dir()[0] != '/') fail(what, ": not an absolute path");
  if (rec.chain_length() == 0 || rec.chain_length() > kMaxChainLength)
    fail(what, ": chain length ", rec.chain_length(), " is outside [1, ", kMaxChainLength, "]");
  if (rec.digest().size() != 32)
    fail(what, ": the recorded digest has ", rec.digest().size(), " bytes, not 32");
  std::shared_ptr<ImageReader> parent = open_parent(rec.dir(), what);
  const uint32_t plen = chain_length_of(parent->inventory());
  if (plen + 1 != rec.chain_length())
    fail(what, ": it is link ", plen, " of its chain, this image says link ",
         rec.chain_length() - 1);
  const std::string digest = image_identity_digest(*parent);
  if (digest != rec.digest())
    fail(what, ": changed since this image was dumped (identity digest ", short_hex(digest),
         "..., recorded ", short_hex(rec.digest()), "...)");
  check_same_tree(parent->inventory(), inventory_.root_pid(), inventory_.root_start_ticks(),
                  inventory_.boot_id(), what);
  for (auto& [pid, store] : pages_) {
    if (store->parent_pages() == 0) continue;
    if (!parent->has_pages(pid))
      fail(store->path(), ": ", store->parent_pages(), " pages are in the ", what,
           ", which has no pages for pid ", pid);
    store->link_parent(parent->shared_pages(pid));
  }
  parent_ = std::move(parent);
}

ParentForDump open_parent_for_dump(const std::string& dir, int32_t root_pid, uint64_t start_ticks,
                                   const std::string& boot_id) {
  const std::string what = cat("parent image ", dir);
  char* real = ::realpath(dir.c_str(), nullptr);
  if (real == nullptr) fail_errno(what, ": missing");
  const std::string abs = real;
  std::free(real);
  ParentForDump out;
  std::shared_ptr<ImageReader> img = open_parent(abs, what);
  check_same_tree(img->inventory(), root_pid, start_ticks, boot_id, what);
  const uint32_t len = chain_length_of(img->inventory()) + 1;
  if (len > kMaxChainLength)
    fail(what, ": already ", len - 1, " links long, the most a chain may have is ",
         kMaxChainLength);
  out.record.set_dir(abs);
  out.record.set_digest(image_identity_digest(*img));
  out.record.set_chain_length(len);
  out.image = std::move(img);
  return out;
}

}  // namespace lazycr::image
