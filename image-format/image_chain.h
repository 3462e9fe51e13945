// Incremental images (`lazycr dump --parent DIR`): an image whose page stores hold only the
// pages that changed since its parent image, and PARENT runs for the rest. This unit names a
// parent (its identity digest and tree), checks it, and links a child's stores to it.
// FORMAT.md "Incremental images".
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "image-format/inventory.pb.h"

namespace lazycr::image {

class ImageReader;

// Links from an image to the full dump at the start of its chain, at most: bounds the
// recursion (and the images held open) before any parent is opened.
inline constexpr uint32_t kMaxChainLength = 1024;

// SHA-256 over the image's inventory.pb (as it is now on disk) and, per process with pages in
// inventory order, its pid and page_store_mac_digest() (header, index and footer, which bind
// every frame by its SHA-256): changes when any of them is changed or replaced.
std::string image_identity_digest(const ImageReader& img);

// /proc/sys/kernel/random/boot_id, without its newline.
std::string read_boot_id();

// Throws Error unless `parent` is a dump of the tree `root_pid` (started at start_ticks after
// boot `boot_id`) is: same root pid, start time and boot. `what` names the parent.
void check_same_tree(const Inventory& parent, int32_t root_pid, uint64_t start_ticks,
                     const std::string& boot_id, const std::string& what);

// The parent of a dump about to start: opened and validated with its whole chain (each link's
// digest checked against its child's record), checked to be a dump of this tree. Throws Error
// naming the parent directory and what is wrong (missing, damaged, changed, another tree).
struct ParentForDump {
  std::shared_ptr<const ImageReader> image;
  ParentImage record;  // what the child's inventory records (Inventory.parent)
};
ParentForDump open_parent_for_dump(const std::string& dir, int32_t root_pid, uint64_t start_ticks,
                                   const std::string& boot_id);

// A short hex prefix of a digest, for messages and show.
std::string short_hex(const std::string& digest);

}  // namespace lazycr::image
