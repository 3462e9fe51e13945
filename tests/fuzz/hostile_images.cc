#include "tests/fuzz/hostile_images.h"

#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cstring>
#include <fstream>

#include "common/error.h"
#include "image-format/image_dir.h"

namespace lazycr::test::hostile {
namespace {

constexpr uint32_t kUnknownField = 1000;

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>(v | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out.flush()) fail(path, ": write failed");
}

// Compresses `prefix` then `zeros` zero bytes as one frame without holding the zeros.
std::string compress(const std::string& prefix, uint64_t zeros) {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, 1);
  ZSTD_CCtx_setPledgedSrcSize(c, prefix.size() + zeros);
  std::string out;
  std::string buf(ZSTD_CStreamOutSize(), '\0');
  const std::string chunk(1 << 20, '\0');
  auto feed = [&](const char* data, size_t size, ZSTD_EndDirective mode) {
    ZSTD_inBuffer in{data, size, 0};
    for (;;) {
      ZSTD_outBuffer o{buf.data(), buf.size(), 0};
      size_t left = ZSTD_compressStream2(c, &o, &in, mode);
      if (ZSTD_isError(left)) fail("zstd: ", ZSTD_getErrorName(left));
      out.append(buf.data(), o.pos);
      if (mode == ZSTD_e_end ? left == 0 : in.pos == in.size) break;
    }
  };
  feed(prefix.data(), prefix.size(), ZSTD_e_continue);
  for (uint64_t left = zeros; left > 0;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(left, chunk.size()));
    feed(chunk.data(), n, ZSTD_e_continue);
    left -= n;
  }
  feed(nullptr, 0, ZSTD_e_end);
  ZSTD_freeCCtx(c);
  return out;
}

std::string with_header(const char magic[8], const std::string& frame) {
  std::string out(24, '\0');
  std::memcpy(out.data(), magic, 8);
  uint32_t version = image::kFormatVersion, flags = 0;
  uint64_t payload = frame.size();
  std::memcpy(out.data() + 8, &version, 4);
  std::memcpy(out.data() + 12, &flags, 4);
  std::memcpy(out.data() + 16, &payload, 8);
  return out + frame;
}

}  // namespace

std::string metadata_file(const char magic[8], const std::string& raw) {
  return with_header(magic, compress(raw, 0));
}

std::string metadata_bomb(const char magic[8], const google::protobuf::Message& msg,
                          uint64_t inflate) {
  std::string prefix = msg.SerializeAsString();
  put_varint(prefix, kUnknownField << 3 | 2);
  put_varint(prefix, inflate);
  return with_header(magic, compress(prefix, inflate));
}

std::string empty_records(const char magic[8], const google::protobuf::Message& msg,
                          int field_number, uint64_t count) {
  std::string record;
  put_varint(record, static_cast<uint64_t>(field_number) << 3 | 2);
  record += '\0';
  std::string raw = msg.SerializeAsString();
  raw.reserve(raw.size() + record.size() * count);
  for (uint64_t i = 0; i < count; ++i) raw += record;
  return metadata_file(magic, raw);
}

void add_bomb_processes(const std::string& dir, int first_pid, int count, uint64_t inflate) {
  image::Inventory inv;
  image::read_message_file(image::inventory_path(dir), image::kInventoryMagic, &inv);
  for (int i = 0; i < count; ++i) {
    int pid = first_pid + i;
    inv.add_pids(pid);
    image::Process zombie;
    zombie.set_pid(pid);
    zombie.set_ppid(inv.root_pid());
    zombie.set_zombie(true);
    write_file(image::process_path(dir, pid), metadata_bomb(image::kProcessMagic, zombie, inflate));
  }
  image::write_message_file(image::inventory_path(dir), image::kInventoryMagic, inv);
}

void replace_with_fifo(const std::string& path) {
  if (::unlink(path.c_str()) != 0) fail_errno(path, ": cannot remove");
  if (::mkfifo(path.c_str(), 0600) != 0) fail_errno(path, ": cannot make a FIFO");
}

}  // namespace lazycr::test::hostile
