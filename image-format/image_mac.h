// The image's MAC (FORMAT.md "image.mac"): HMAC-SHA256 under a per-machine key that only root
// can read, over every file of the image directory, written by the dump. A restore trusts the
// credentials an image asks for only if this machine signed it (restore/trust.h).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

namespace lazycr::image {

inline constexpr char kMacFile[] = "image.mac";
inline constexpr char kMacMagic[8] = {'L', 'Z', 'C', 'R', 'M', 'A', 'C', '\0'};
inline constexpr uint32_t kMacVersion = 1;
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

// Writes <dir>/image.mac for the files in `dir` as they are now. `sha256_of`: digests the
// caller computed while writing (page stores, PageStoreStats::sha256), by file name, used
// instead of reading those files again.
void sign_image(const std::string& dir, const std::string& key,
                const std::map<std::string, std::string>& sha256_of = {});

enum class MacCheck { kValid, kMissing, kMismatch };
// Checks <dir>/image.mac against the files of `dir`; `why` says what is wrong.
MacCheck verify_image(const std::string& dir, const std::string& key, std::string* why);

}  // namespace lazycr::image
