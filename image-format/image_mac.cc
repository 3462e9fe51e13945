#include "image-format/image_mac.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/error.h"
#include "common/fd.h"
#include "image-format/page_store.h"

namespace lazycr::image {
namespace {

struct DirCloser {
  void operator()(DIR* d) const { ::closedir(d); }
};

constexpr size_t kMacBytes = 32;                         // SHA-256
constexpr size_t kMacFileBytes = 8 + 4 + 4 + kMacBytes;  // magic, version, 0, MAC
constexpr size_t kHashChunk = 1 << 20;

std::string parent_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

// A read buffer for the files of one MAC, as large as the largest file read through it (up to
// kHashChunk) and left uninitialised: a fresh zero-filled 1 MiB per file cost 256 page faults
// and a memset for each few-kB metadata file, most of the MAC check's time before a restore.
class HashBuffer {
 public:
  char* get(uint64_t file_size) {
    // One byte past the size: the read that finds EOF is the one after a full buffer.
    size_t want = static_cast<size_t>(std::min<uint64_t>(file_size + 1, kHashChunk));
    if (want > size_) {
      data_ = std::make_unique_for_overwrite<char[]>(want);
      size_ = want;
    }
    return data_.get();
  }
  size_t size() const { return size_; }

 private:
  std::unique_ptr<char[]> data_;
  size_t size_ = 0;
};

// SHA-256 of one file of the image (`size` bytes as fstat said), read through `fd`.
std::string sha256_of(int fd, const std::string& path, uint64_t size, HashBuffer& hb) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    fail("SHA-256 of ", path, ": libcrypto cannot start a digest");
  char* buf = hb.get(size);
  for (;;) {
    ssize_t n = ::read(fd, buf, hb.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail_errno("reading ", path, " for its MAC");
    if (n == 0) break;
    EVP_DigestUpdate(ctx.get(), buf, static_cast<size_t>(n));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  return std::string(reinterpret_cast<char*>(md), len);
}

bool is_page_store_name(const std::string& name) {
  return name.size() > 10 && name.compare(0, 6, "pages-") == 0 &&
         name.compare(name.size() - 4, 4, ".lzp") == 0;
}

// HMAC over (name, NUL, size as 8 bytes little endian, digest) of every file but image.mac,
// in name order. The digest is the SHA-256 of the whole content, but in version 2 that of a
// page store's header, index and footer only (page_store_mac_digest(): its frames are bound
// by their digests in the index, checked as they are read), taken from `known` when the
// caller has it. Anything but a regular file in the directory is an error: an image holds
// nothing else, and a FIFO there must not block the check.
}  // namespace

bool outside_mac(const std::string& name) {
  return name == kMacFile || name.rfind("working-set", 0) == 0;
}

namespace {

std::string compute_mac(const std::string& dir, const std::string& key, uint32_t version,
                        const std::map<std::string, std::string>& known = {}) {
  std::unique_ptr<DIR, DirCloser> d(::opendir(dir.c_str()));
  if (!d) fail_errno("cannot list ", dir);
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d.get())) {
    std::string name = e->d_name;
    if (name != "." && name != ".." && !outside_mac(name)) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::string manifest;
  HashBuffer hb;
  for (const auto& name : names) {
    std::string path = cat(dir, "/", name);
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
    if (!fd) fail_errno("cannot open ", path, " for the image's MAC");
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) fail_errno("cannot stat ", path);
    if (!S_ISREG(st.st_mode)) fail(path, " is not a regular file; an image holds nothing else");
    uint64_t size = static_cast<uint64_t>(st.st_size);
    manifest += name;
    manifest.push_back('\0');
    for (int i = 0; i < 8; i++) manifest.push_back(static_cast<char>(size >> (8 * i)));
    if (version >= 2 && is_page_store_name(name)) {
      auto k = known.find(name);
      manifest += k != known.end() ? k->second : page_store_mac_digest(fd.get(), path, size);
    } else {
      manifest += sha256_of(fd.get(), path, size, hb);
    }
  }
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
            reinterpret_cast<const unsigned char*>(manifest.data()), manifest.size(), mac, &len) ||
      len != kMacBytes)
    fail("HMAC-SHA256 of ", dir, ": libcrypto failed");
  return std::string(reinterpret_cast<char*>(mac), len);
}

void create_key(const std::string& path) {
  std::string dir = parent_of(path);
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    fail_errno("cannot create ", dir, " for the image key");
  char key[kImageKeyBytes];
  if (::getrandom(key, sizeof key, 0) != static_cast<ssize_t>(sizeof key))
    fail_errno("getrandom for the image key");
  // Written under a temporary name and linked into place: a concurrent lazycr sees either no
  // key or a whole one, and the first link wins.
  std::string tmp = cat(path, ".tmp-", ::getpid());
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd) fail_errno("cannot create the image key ", tmp);
  bool ok = ::write(fd.get(), key, sizeof key) == static_cast<ssize_t>(sizeof key) &&
            ::fsync(fd.get()) == 0;
  int err = errno;
  fd.reset();
  if (ok && ::link(tmp.c_str(), path.c_str()) != 0 && errno != EEXIST) {
    ok = false;
    err = errno;
  }
  ::unlink(tmp.c_str());
  if (!ok) fail_errno_value(err, cat("cannot write the image key ", path));
}

}  // namespace

std::string image_key_path() {
  const char* env = std::getenv("LAZYCR_IMAGE_KEY");
  return env && *env ? std::string(env) : std::string(kDefaultImageKeyPath);
}

std::optional<std::string> load_image_key(bool create) {
  const std::string path = image_key_path();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd && errno == ENOENT && create) {
    create_key(path);
    fd.reset(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  }
  if (!fd) {
    if (errno == ENOENT || errno == EACCES || errno == EPERM) return std::nullopt;
    fail_errno("cannot open the image key ", path);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno("cannot stat the image key ", path);
  if (!S_ISREG(st.st_mode) || (st.st_uid != 0 && st.st_uid != ::geteuid()) ||
      (st.st_mode & 077) != 0)
    fail("the image key ", path, " must be a regular file owned by root with mode 0600 (it is ",
         std::oct, st.st_mode, std::dec, ", uid ", st.st_uid, ")");
  std::string key(kImageKeyBytes, '\0');
  ssize_t n = ::read(fd.get(), key.data(), key.size() + 0);
  if (n != static_cast<ssize_t>(kImageKeyBytes) || st.st_size != static_cast<off_t>(kImageKeyBytes))
    fail("the image key ", path, " is not ", kImageKeyBytes, " bytes long");
  return key;
}

void sign_image(const std::string& dir, const std::string& key,
                const std::map<std::string, std::string>& store_digests) {
  std::string mac = compute_mac(dir, key, kMacVersion, store_digests);
  char out[kMacFileBytes] = {};
  std::memcpy(out, kMacMagic, 8);
  for (int i = 0; i < 4; i++) out[8 + i] = static_cast<char>(kMacVersion >> (8 * i));
  std::memcpy(out + 16, mac.data(), kMacBytes);
  std::string path = cat(dir, "/", kMacFile);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!fd) fail_errno("cannot create ", path);
  if (::write(fd.get(), out, sizeof out) != static_cast<ssize_t>(sizeof out))
    fail_errno("cannot write ", path);
}

MacCheck verify_image(const std::string& dir, const std::string& key, std::string* why,
                      const std::map<std::string, std::string>& store_digests,
                      uint32_t* mac_version) {
  std::string path = cat(dir, "/", kMacFile);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) {
      *why = cat("it has no ", kMacFile);
      return MacCheck::kMissing;
    }
    fail_errno("cannot open ", path);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) fail_errno("cannot stat ", path);
  char in[kMacFileBytes];
  if (!S_ISREG(st.st_mode) || st.st_size != static_cast<off_t>(kMacFileBytes) ||
      ::read(fd.get(), in, sizeof in) != static_cast<ssize_t>(sizeof in) ||
      std::memcmp(in, kMacMagic, 8) != 0) {
    *why = cat(kMacFile, " is not a MAC file of ", kMacFileBytes, " bytes");
    return MacCheck::kMismatch;
  }
  uint32_t version = 0;
  for (int i = 0; i < 4; i++)
    version |= static_cast<uint32_t>(static_cast<uint8_t>(in[8 + i])) << (8 * i);
  if (version != kMacVersion && version != kMacVersionWholeFiles) {
    *why = cat(kMacFile, " has version ", version, ", this lazycr knows ", kMacVersionWholeFiles,
               " and ", kMacVersion);
    return MacCheck::kMismatch;
  }
  if (mac_version != nullptr) *mac_version = version;
  std::string mac = compute_mac(dir, key, version, store_digests);
  if (CRYPTO_memcmp(mac.data(), in + 16, kMacBytes) != 0) {
    *why = cat(kMacFile,
               " does not match its files under this machine's key (edited, or signed "
               "on another machine)");
    return MacCheck::kMismatch;
  }
  return MacCheck::kValid;
}

}  // namespace lazycr::image
