#include "restore/trust.h"

#include <dirent.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "common/error.h"
#include "common/json.h"
#include "common/log.h"
#include "common/proc.h"
#include "image-format/image_mac.h"
#include "image-format/page_store.h"

namespace lazycr::restore {
namespace {

struct DirCloser {
  void operator()(DIR* d) const { ::closedir(d); }
};

std::string ids(const google::protobuf::RepeatedField<uint32_t>& v) {
  std::string s;
  for (uint32_t x : v) s += cat(s.empty() ? "" : " ", x);
  return s;
}

// The ids an unsigned image may hold: those of the user owning inventory.pb (a user who is
// not root can write an image only of its own processes, and only as files it owns).
struct Allowed {
  uint32_t uid = 0;
  std::set<uint32_t> gids;
  std::string who;
};

std::optional<Allowed> allowed_ids(const image::ImageReader& img) {
  if (::geteuid() != 0) {
    proc::Status me = proc::read_status(::getpid());
    Allowed a;
    a.uid = me.uids.at(0);
    a.gids.insert(me.gids.begin(), me.gids.end());
    a.gids.insert(me.groups.begin(), me.groups.end());
    a.who = cat("lazycr's user (uid ", a.uid, ")");
    if (!std::all_of(me.uids.begin(), me.uids.end(), [&](uint32_t u) { return u == a.uid; }))
      return std::nullopt;
    return a;
  }
  struct stat st;
  std::string inv = image::inventory_path(img.dir());
  if (::stat(inv.c_str(), &st) != 0) fail_errno("cannot stat ", inv);
  if (st.st_uid == 0) return std::nullopt;  // written by root: any id but 0 is root's to give
  Allowed a;
  a.uid = st.st_uid;
  a.gids.insert(st.st_gid);
  a.who = cat("the owner of its files (uid ", a.uid, ")");
  if (passwd* pw = ::getpwuid(st.st_uid)) {
    int n = 64;
    std::vector<gid_t> groups(static_cast<size_t>(n));
    if (::getgrouplist(pw->pw_name, pw->pw_gid, groups.data(), &n) < 0) {
      groups.resize(static_cast<size_t>(n));
      ::getgrouplist(pw->pw_name, pw->pw_gid, groups.data(), &n);
    }
    groups.resize(static_cast<size_t>(std::max(n, 0)));
    a.gids.insert(groups.begin(), groups.end());
  }
  return a;
}

// A signed image is only as good as its files at the time they are read: none of them, nor
// the directory, may be writable by anyone but root (or lazycr's own user).
void check_files_owned(const std::string& dir) {
  auto check = [&](const std::string& path) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) fail_errno("cannot stat ", path);
    if ((st.st_uid != 0 && st.st_uid != ::geteuid()) || (st.st_mode & 022) != 0)
      fail(path, " can be changed by others (uid ", st.st_uid, ", mode ", std::oct,
           st.st_mode & 07777, "); a signed image is trusted only while only root can write it");
  };
  check(dir);
  std::unique_ptr<DIR, DirCloser> d(::opendir(dir.c_str()));
  if (!d) fail_errno("cannot list ", dir);
  while (dirent* e = ::readdir(d.get())) {
    std::string name = e->d_name;
    if (name != "." && name != "..") check(cat(dir, "/", name));
  }
}

}  // namespace

std::string privilege_of(const image::ImageReader& img) {
  std::optional<Allowed> allowed;
  bool allowed_known = false;
  for (const auto& p : img.processes()) {
    if (p.zombie()) continue;
    const auto& c = p.creds();
    const std::string who = cat("pid ", p.pid());
    auto has0 = [](const auto& v) { return std::find(v.begin(), v.end(), 0u) != v.end(); };
    if (has0(c.uids())) return cat(who, " runs as uid ", ids(c.uids()));
    if (has0(c.gids())) return cat(who, " runs as gid ", ids(c.gids()));
    if (has0(c.groups())) return cat(who, " has supplementary group 0");
    // The bounding set only drops (restore_credentials); the others grant.
    if (c.cap_permitted() | c.cap_effective() | c.cap_inheritable() | c.cap_ambient())
      return cat(who, " holds capabilities (permitted ", hex(c.cap_permitted()), ", effective ",
                 hex(c.cap_effective()), ", inheritable ", hex(c.cap_inheritable()), ", ambient ",
                 hex(c.cap_ambient()), ")");
    if (!allowed_known) {
      allowed = allowed_ids(img);
      allowed_known = true;
    }
    if (!allowed) continue;
    for (uint32_t u : c.uids())
      if (u != allowed->uid) return cat(who, " runs as uid ", u, ", not as ", allowed->who);
    for (const auto* v : {&c.gids(), &c.groups()})
      for (uint32_t g : *v)
        if (!allowed->gids.count(g))
          return cat(who, " has gid ", g, ", which ", allowed->who, " does not have");
  }
  return "";
}

void check_trust(const image::ImageReader& img, const RestoreOptions& opts) {
  const std::string why = privilege_of(img);
  if (why.empty()) return;
  if (opts.trust_image) {
    log::info("restoring an image not checked against its MAC (--trust-image): ", why);
    return;
  }
  const char* advice = "; --trust-image restores it anyway if you trust where it came from";
  auto key = image::load_image_key(false);
  if (!key)
    fail("its MAC cannot be checked (", image::image_key_path(), " is not readable) and ", why,
         advice);
  // The MAC is checked against the indexes the restore has open (and then reads every frame
  // through, each checked against its digest there), not against the files read again.
  std::map<std::string, std::string> store_digests;
  for (const auto& p : img.processes()) {
    if (p.zombie()) continue;
    const image::PageStoreReader& store = img.pages(p.pid());
    store_digests[store.path().substr(store.path().rfind('/') + 1)] = store.mac_digest();
  }
  std::string mac_why;
  uint32_t mac_version = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const image::MacCheck mac =
      image::verify_image(img.dir(), *key, &mac_why, store_digests, &mac_version);
  log::debug(
      "restore: MAC checked in ",
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count(),
      " us (version ", mac_version, ")");
  if (mac != image::MacCheck::kValid)
    fail("the image is not signed by this machine (", mac_why, ") and ", why,
         ": restoring it would grant that to whoever wrote it", advice);
  // A version 2 MAC covers no frame: each must be checked against a digest when read. This
  // lazycr's dump writes them always; a store without them was not signed this way.
  if (mac_version >= 2)
    for (const auto& p : img.processes())
      if (!p.zombie() && !img.pages(p.pid()).has_frame_digests())
        fail(img.pages(p.pid()).path(), " has no frame digests, which its image's ",
             image::kMacFile, " needs to vouch for its pages, and ", why, advice);
  check_files_owned(img.dir());
}

}  // namespace lazycr::restore
