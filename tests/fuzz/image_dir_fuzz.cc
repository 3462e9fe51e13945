// libFuzzer target: the image directory's metadata reader and validators on arbitrary bytes.
// Every input must parse and validate, or give a clean lazycr::Error.
//
// The first byte picks what the rest is:
//   0: an inventory.pb file        1: a process-<pid>.pb file
//   2: a raw Inventory protobuf    3: a raw Process protobuf
//   4: a shared.pb file            5: a raw SharedObjects protobuf
// Modes 2, 3 and 5 wrap the bytes in a valid header and checksummed zstd frame, so mutations
// reach the protobuf parser and the semantic checks instead of stopping at the checksum.
#include <zstd.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "common/error.h"
#include "image-format/image_dir.h"

namespace {

using namespace lazycr::image;

std::string wrap(const char magic[8], const std::string& raw) {
  std::string out(24 + ZSTD_compressBound(raw.size()), '\0');
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
  size_t n = ZSTD_compress2(c, out.data() + 24, out.size() - 24, raw.data(), raw.size());
  ZSTD_freeCCtx(c);
  if (ZSTD_isError(n)) return {};
  out.resize(24 + n);
  std::memcpy(out.data(), magic, 8);
  uint32_t version = kFormatVersion, flags = 0;
  uint64_t payload = n;
  std::memcpy(out.data() + 8, &version, 4);
  std::memcpy(out.data() + 12, &flags, 4);
  std::memcpy(out.data() + 16, &payload, 8);
  return out;
}

Inventory default_inventory() {
  Inventory inv;
  inv.set_format_version(kFormatVersion);
  inv.set_page_size(kPageSize);
  inv.set_root_pid(1);
  inv.add_pids(1);
  inv.mutable_cpu()->set_xsave_size(832);
  return inv;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  int mode = data[0] % 6;
  std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    if (mode == 0 || mode == 2) {
      Inventory inv;
      parse_message_bytes("inventory.pb", mode == 0 ? body : wrap(kInventoryMagic, body),
                          kInventoryMagic, &inv);
      validate_inventory(inv);
    } else if (mode == 4 || mode == 5) {
      SharedObjects shared;
      parse_message_bytes("shared.pb", mode == 4 ? body : wrap(kSharedMagic, body), kSharedMagic,
                          &shared);
      validate_shared(shared);
    } else {
      Process proc;
      parse_message_bytes("process.pb", mode == 1 ? body : wrap(kProcessMagic, body), kProcessMagic,
                          &proc);
      validate_process(proc, default_inventory());
    }
  } catch (const lazycr::Error&) {
  }
  return 0;
}
