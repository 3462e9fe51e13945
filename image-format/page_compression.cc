// --compress: how a page store's frames are stored (page_store.h).
#include <zstd.h>

#include <exception>
#include <string>

#include "common/error.h"
#include "image-format/page_store.h"

namespace lazycr::image {

namespace {

// The N of "NAME:N" when it is a whole number in [lo, hi] other than 0, else nothing.
bool parse_level(const std::string& num, int lo, int hi, int& level) {
  if (num.empty() || num.size() > 7) return false;
  if (num[0] != '-' && (num[0] < '0' || num[0] > '9')) return false;
  size_t used = 0;
  try {
    level = std::stoi(num, &used);
  } catch (const std::exception&) {
    return false;
  }
  return used == num.size() && level != 0 && level >= lo && level <= hi;
}

}  // namespace

void parse_compression(const std::string& text, PageStoreOptions& options) {
  const size_t colon = text.find(':');
  const std::string name = text.substr(0, colon);
  const bool has_level = colon != std::string::npos;
  const std::string num = has_level ? text.substr(colon + 1) : "";
  options.auto_codec = false;
  options.zstd_literals = false;
  if (name == "none" && !has_level) {
    options.compression = PageIndex::NONE;
    return;
  }
  if (name == "auto" && !has_level) {
    options.compression = PageIndex::LZ4;
    options.level = kLz4Acceleration;
    options.auto_codec = true;
    return;
  }
  if (name == "lz4") {
    int level = kLz4Acceleration;
    if (has_level && !parse_level(num, 1, kLz4MaxAcceleration, level))
      fail("--compress ", text, ": the lz4 acceleration must be a number in [1, ",
           kLz4MaxAcceleration, "]");
    options.compression = PageIndex::LZ4;
    options.level = level;
    return;
  }
  if (name == "zstd") {
    int level = kDefaultLevel;
    if (has_level && !parse_level(num, ZSTD_minCLevel(), ZSTD_maxCLevel(), level))
      fail("--compress ", text, ": the zstd level must be a number in [", ZSTD_minCLevel(),
           ", -1] or [1, ", ZSTD_maxCLevel(), "]");
    options.compression = PageIndex::ZSTD;
    options.level = level;
    return;
  }
  fail("--compress ", text, ": expected auto, zstd, zstd:LEVEL, lz4, lz4:ACCELERATION or none");
}

std::string compression_name(const PageStoreOptions& options) {
  if (options.auto_codec) return "auto";
  if (options.compression == PageIndex::NONE) return "none";
  if (options.compression == PageIndex::LZ4)
    return options.level == kLz4Acceleration ? "lz4" : cat("lz4:", options.level);
  return cat("zstd:", options.level);
}

}  // namespace lazycr::image
