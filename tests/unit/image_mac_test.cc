// image.mac: a signed image verifies; any change to any file, a missing MAC, another key, or
// an unfit key file is caught.
#include "image-format/image_mac.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/filesystem.hpp>
#include <fstream>
#include <iterator>
#include <vector>

#include "common/error.h"
#include "image-format/page_store.h"

namespace lazycr::image {
namespace {

namespace fs = boost::filesystem;

struct Tmp {
  std::string path;
  Tmp() {
    char t[] = "/tmp/lazycr-mac-XXXXXX";
    path = ::mkdtemp(t);
  }
  ~Tmp() { fs::remove_all(path); }
};

TEST(ImageMac, SignedImageVerifiesAndAnyChangeIsCaught) {
  Tmp tmp;
  const std::string dir = tmp.path + "/img";
  fs::create_directory(dir);
  std::ofstream(dir + "/inventory.pb") << "inventory";
  std::ofstream(dir + "/shared.pb") << std::string(3 << 20, 'p');
  const std::string key(kImageKeyBytes, 'k');
  sign_image(dir, key);
  std::string why;
  uint32_t version = 0;
  EXPECT_EQ(verify_image(dir, key, &why, {}, &version), MacCheck::kValid) << why;
  EXPECT_EQ(kMacVersion, version);
  EXPECT_EQ(verify_image(dir, std::string(kImageKeyBytes, 'K'), &why), MacCheck::kMismatch);

  std::ofstream(dir + "/shared.pb", std::ios::in | std::ios::out | std::ios::binary)
      .seekp(2 << 20)
      .put('q');
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
  sign_image(dir, key);
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  std::ofstream(dir + "/extra") << "";
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch) << "a file added";
  fs::remove(dir + "/extra");
  // Written by restores after the dump: the working set's record, its pages, their
  // temporary files.
  for (const char* name : {"working-set.lzw", "working-set-12.lzp", "working-set-12.lzp.tmp-9"})
    std::ofstream(dir + "/" + name) << "added by a restore";
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  for (const char* name : {"working-set.lzw", "working-set-12.lzp", "working-set-12.lzp.tmp-9"})
    fs::remove(dir + "/" + name);
  fs::rename(dir + "/inventory.pb", dir + "/inventory2.pb");
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch) << "a file renamed";
  fs::rename(dir + "/inventory2.pb", dir + "/inventory.pb");
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  ASSERT_EQ(::mkfifo((dir + "/fifo").c_str(), 0600), 0);
  EXPECT_THROW(verify_image(dir, key, &why), Error) << "a FIFO is refused, never read";
  fs::remove(dir + "/fifo");
  fs::remove(dir + "/" + kMacFile);
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMissing);
  std::ofstream(dir + "/" + kMacFile) << "short";
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
}

// The page store's own digest (taken while writing) signs exactly as reading it would. It
// covers the store's header, index and footer: a changed index is a mismatch, a changed frame
// is not (its digest in the index refuses it when read: page_store_corruption_test.cc).
TEST(ImageMac, PageStoreDigestTakenWhileWritingMatchesTheFile) {
  Tmp tmp;
  const std::string dir = tmp.path + "/img";
  fs::create_directory(dir);
  std::ofstream(dir + "/inventory.pb") << "inventory";
  PageStoreOptions opts;
  opts.threads = 2;
  opts.frame_size = 64 * 1024;
  PageStoreWriter w(dir + "/pages-1.lzp", opts);
  std::vector<unsigned char> data(300 * 4096);
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<unsigned char>(i * 7 + i / 4096);
  w.add_pages(0x10000, data.data(), 300);
  PageStoreStats stats = w.finish();
  ASSERT_EQ(stats.mac_digest.size(), 32u);
  const std::string key(kImageKeyBytes, 'k');
  sign_image(dir, key, {{"pages-1.lzp", stats.mac_digest}});
  std::string why;
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  EXPECT_EQ(verify_image(dir, key, &why, {{"pages-1.lzp", stats.mac_digest}}), MacCheck::kValid)
      << why;
  EXPECT_EQ(verify_image(dir, key, &why, {{"pages-1.lzp", std::string(32, 'y')}}),
            MacCheck::kMismatch)
      << "the digest of the index a restore holds is the one checked";
  const uint64_t size = fs::file_size(dir + "/pages-1.lzp");
  auto flip = [&](uint64_t at) {
    std::fstream f(dir + "/pages-1.lzp", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(at));
    f.put(static_cast<char>(c ^ 1));
  };
  flip(64 + 100);  // inside frame 0
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  flip(64 + 100);
  flip(size - 33);  // the index's last byte
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
  flip(size - 33);
  flip(20);  // the header's frame_pages
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
  flip(20);
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kValid) << why;
  sign_image(dir, key, {{"pages-1.lzp", std::string(32, 'x')}});
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
}

// Images signed before frame digests (version 1: every file's whole contents) still verify,
// page stores read whole: a changed frame is a mismatch there.
TEST(ImageMac, Version1CoversWholeFiles) {
  Tmp tmp;
  const std::string dir = tmp.path + "/img";
  fs::create_directory(dir);
  std::ofstream(dir + "/inventory.pb") << "inventory";
  PageStoreOptions opts;
  opts.threads = 1;
  PageStoreWriter w(dir + "/pages-1.lzp", opts);
  std::vector<unsigned char> data(40 * 4096);
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<unsigned char>(i * 13 + i / 4096);
  w.add_pages(0x10000, data.data(), 40);
  w.finish();
  const std::string key(kImageKeyBytes, 'k');
  std::string manifest;
  for (const char* name : {"inventory.pb", "pages-1.lzp"}) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    manifest += name;
    manifest.push_back('\0');
    for (int i = 0; i < 8; i++) manifest.push_back(static_cast<char>(content.size() >> (8 * i)));
    unsigned char md[32];
    SHA256(reinterpret_cast<const unsigned char*>(content.data()), content.size(), md);
    manifest.append(reinterpret_cast<char*>(md), 32);
  }
  unsigned char mac[32];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(manifest.data()), manifest.size(), mac, &len);
  std::string file("LZCRMAC\0\1\0\0\0\0\0\0\0", 16);
  file.append(reinterpret_cast<char*>(mac), 32);
  std::ofstream(dir + "/" + kMacFile, std::ios::binary) << file;
  std::string why;
  uint32_t version = 0;
  EXPECT_EQ(verify_image(dir, key, &why, {}, &version), MacCheck::kValid) << why;
  EXPECT_EQ(kMacVersionWholeFiles, version);
  std::fstream f(dir + "/pages-1.lzp", std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(64 + 50);
  f.put('\x5a');
  f.close();
  EXPECT_EQ(verify_image(dir, key, &why), MacCheck::kMismatch);
}

TEST(ImageMac, KeyIsMadeOnceAndMustBePrivate) {
  Tmp tmp;
  const std::string path = tmp.path + "/keys/image.key";
  ::setenv("LAZYCR_IMAGE_KEY", path.c_str(), 1);
  EXPECT_FALSE(load_image_key(false).has_value());
  auto made = load_image_key(true);
  ASSERT_TRUE(made.has_value());
  EXPECT_EQ(made->size(), kImageKeyBytes);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(*load_image_key(true), *made) << "made once";
  ::chmod(path.c_str(), 0644);
  EXPECT_THROW(load_image_key(false), Error);
  ::chmod(path.c_str(), 0600);
  std::ofstream(path, std::ios::app) << "x";
  EXPECT_THROW(load_image_key(false), Error);
  ::unsetenv("LAZYCR_IMAGE_KEY");
}

}  // namespace
}  // namespace lazycr::image
