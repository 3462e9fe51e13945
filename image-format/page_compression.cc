// --compress: how a page store's frames are stored (page_store.h).
#include <zstd.h>

#include <exception>
#include <string>

#include "common/error.h"
#include "image-format/page_store.h"

namespace lazycr::image {

void parse_compression(const std::string& text, PageStoreOptions& options) {
  if (text == "none") {
    options.compression = PageIndex::NONE;
    return;
  }
  if (text == "lz4") {
    options.compression = PageIndex::LZ4;
    options.level = kLz4Acceleration;
    return;
  }
  if (text == "zstd") {
    options.compression = PageIndex::ZSTD;
    options.level = kDefaultLevel;
    return;
  }
  const std::string prefix = "zstd:";
  if (text.rfind(prefix, 0) == 0 && text.size() > prefix.size() &&
      text.size() < prefix.size() + 8) {
    const std::string num = text.substr(prefix.size());
    size_t used = 0;
    int level = 0;
    if (num[0] == '-' || (num[0] >= '0' && num[0] <= '9')) {
      try {
        level = std::stoi(num, &used);
      } catch (const std::exception&) {
        used = 0;
      }
    }
    if (used == num.size() && level != 0 && level >= ZSTD_minCLevel() &&
        level <= ZSTD_maxCLevel()) {
      options.compression = PageIndex::ZSTD;
      options.level = level;
      return;
    }
    fail("--compress ", text, ": the zstd level must be a number in [", ZSTD_minCLevel(),
         ", -1] or [1, ", ZSTD_maxCLevel(), "]");
  }
  fail("--compress ", text, ": expected zstd, zstd:LEVEL, lz4 or none");
}

std::string compression_name(const PageStoreOptions& options) {
  if (options.compression == PageIndex::NONE) return "none";
  if (options.compression == PageIndex::LZ4) return "lz4";
  return cat("zstd:", options.level);
}

}  // namespace lazycr::image
