// Identity of a [vdso]: the dump records it and a restore refuses an image whose vdso differs
// from the running kernel's (the restored process keeps calling into its old vdso text).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace lazycr {

struct VdsoFingerprint {
  std::string build_id;  // GNU build-id note, empty if the vdso has none
  uint64_t hash = 0;     // FNV-1a 64 of the whole [vdso] text
  uint64_t size = 0;     // bytes in [vdso]; 0: no vdso
};

// Fingerprint of the bytes of a [vdso] mapping. Every offset of the ELF walk is
// bounds-checked: the bytes may come from a hostile process.
VdsoFingerprint fingerprint_vdso(const std::string& bytes);

// Fingerprint of the [vdso] of `pid` (read with process_vm_readv), or of our own when
// pid == 0. size 0 if the process has no vdso.
VdsoFingerprint fingerprint_vdso_of(pid_t pid);

}  // namespace lazycr
