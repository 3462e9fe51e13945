#include "common/vdso.h"

#include <elf.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"
#include "common/proc.h"
#include "common/ptrace.h"

namespace lazycr {

VdsoFingerprint fingerprint_vdso(const std::string& bytes) {
  VdsoFingerprint fp;
  fp.size = bytes.size();
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  fp.hash = h;
  // GNU build-id note through the program headers.
  if (bytes.size() < sizeof(Elf64_Ehdr)) return fp;
  Elf64_Ehdr eh;
  std::memcpy(&eh, bytes.data(), sizeof eh);
  if (std::memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0) return fp;
  for (unsigned i = 0; i < eh.e_phnum; i++) {
    uint64_t off = eh.e_phoff + uint64_t{i} * sizeof(Elf64_Phdr);
    if (off + sizeof(Elf64_Phdr) > bytes.size()) break;
    Elf64_Phdr ph;
    std::memcpy(&ph, bytes.data() + off, sizeof ph);
    if (ph.p_type != PT_NOTE || ph.p_offset > bytes.size() ||
        ph.p_filesz > bytes.size() - ph.p_offset)
      continue;
    uint64_t p = ph.p_offset, end = ph.p_offset + ph.p_filesz;
    while (p + sizeof(Elf64_Nhdr) <= end) {
      Elf64_Nhdr nh;
      std::memcpy(&nh, bytes.data() + p, sizeof nh);
      uint64_t name = p + sizeof nh;
      uint64_t desc = name + ((uint64_t{nh.n_namesz} + 3) & ~3ull);
      uint64_t next = desc + ((uint64_t{nh.n_descsz} + 3) & ~3ull);
      if (next > end) break;
      if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 &&
          std::memcmp(bytes.data() + name, "GNU", 4) == 0) {
        fp.build_id.assign(bytes.data() + desc, nh.n_descsz);
        return fp;
      }
      p = next;
    }
  }
  return fp;
}

VdsoFingerprint fingerprint_vdso_of(pid_t pid) {
  std::string maps_path = pid == 0 ? std::string("/proc/self/maps") : cat("/proc/", pid, "/maps");
  for (const auto& m : proc::parse_maps(proc::read_file(maps_path))) {
    if (m.path != "[vdso]") continue;
    uint64_t len = m.end - m.start;
    if (len == 0 || len > (1u << 20)) fail(maps_path, ": [vdso] of implausible size ", len);
    std::string bytes(len, '\0');
    if (pid == 0)
      std::memcpy(bytes.data(), reinterpret_cast<const void*>(m.start), len);
    else
      remote_read(pid, m.start, bytes.data(), len);
    return fingerprint_vdso(bytes);
  }
  return {};
}

}  // namespace lazycr
