// The image's MAC (FORMAT.md "image.mac"): HMAC-SHA256 under a per-machine key that only root
// can read, over every file of the image directory (of a page store: its header, index and
// footer, which bind each frame by its SHA-256), written by the dump. A restore trusts the
// credentials an image asks for only if this machine signed it (restore/trust.h).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace lazycr::image {

inline constexpr char kMacFile[] = "image.mac";
// The working-set record (uffd/working_set.h) and its record pages are written into an image
// after the dump, by a restore, which may not hold the key: the MAC covers neither (nor their
// temporary files), so an image stays signed. The record binds itself to the stores it was
// made for and the record pages by their digests; a signed image is trusted only while only
// root can write its directory and files (restore/trust.h), these included.
inline constexpr char kWorkingSetFile[] = "working-set.lzw";
inline constexpr char kWorkingSetPagesPrefix[] = "working-set-";  // + <pid>.lzp
// Whether the MAC leaves out the directory entry `name` (image.mac, the working set's files).
bool outside_mac(const std::string& name);
inline constexpr char kMacMagic[8] = {'L', 'Z', 'C', 'R', 'M', 'A', 'C', '\0'};
// Version 2 covers a page store's header, index and footer; version 1 (images written before
// frame digests, still verified) every byte of every file.
inline constexpr uint32_t kMacVersion = 2;
inline constexpr uint32_t kMacVersionWholeFiles = 1;
inline constexpr size_t kImageKeyBytes = 32;
// Where the key lives; the environment variable LAZYCR_IMAGE_KEY names another file (tests).
inline constexpr char kDefaultImageKeyPath[] = "/var/lib/lazycr/image.key";

std::string image_key_path();

// The key, read from image_key_path(). The file must be a regular file of kImageKeyBytes
// owned by root (or by lazycr's own user when that is not root) with no access for group or
// others. With `create`, a missing key is made (random, mode 0600, its directory 0700).
// Returns nullopt when the file does not exist (and is not created) or cannot be read for
// lack of permission (lazycr is not root); throws Error when it exists but is unfit.
std::optional<std::string> load_image_key(bool create);

// Writes <dir>/image.mac (version kMacVersion) for the files in `dir` as they are now.
// `store_digests`: page_store_mac_digest() of page stores, by file name, that the caller has
// already (PageStoreStats::mac_digest, taken while writing), used instead of reading them.
void sign_image(const std::string& dir, const std::string& key,
                const std::map<std::string, std::string>& store_digests = {});

enum class MacCheck { kValid, kMissing, kMismatch };
// Checks <dir>/image.mac against the files of `dir`; `why` says what is wrong. With
// `store_digests` (PageStoreReader::mac_digest() of the stores a restore has open, by file
// name) a version 2 MAC vouches for exactly the indexes those readers use; version 2 leaves
// the frames to the readers' digest checks, so a valid MAC of version 2 is worth something only
// with stores that have frame digests (PageStoreReader::has_frame_digests()). `mac_version`
// receives the MAC file's version.
MacCheck verify_image(const std::string& dir, const std::string& key, std::string* why,
                      const std::map<std::string, std::string>& store_digests = {},
                      uint32_t* mac_version = nullptr);

}  // namespace lazycr::image
