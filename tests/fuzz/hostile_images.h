// Hostile image fixtures (DESIGN.md section 9, Firecracker's malicious uffd handler): damaged
// and hostile metadata files and image directories, made from honest ones. The e2e tests
// check that show and restore refuse each with one line; make_seed_corpus puts the file-level
// ones beside the honest fuzz seeds, where the fuzzers run them under a memory limit.
#pragma once

#include <cstdint>
#include <string>

#include <google/protobuf/message.h>

namespace lazycr::test::hostile {

// A metadata file (header and one checksummed zstd frame, FORMAT.md) holding `raw` as is.
std::string metadata_file(const char magic[8], const std::string& raw);

// `msg` followed by an unknown bytes field (number 1000) of `inflate` zero bytes: a valid
// message whose file is a few KiB and decodes to `inflate` bytes and more. The parse would
// keep the field as an unknown field.
std::string metadata_bomb(const char magic[8], const google::protobuf::Message& msg,
                          uint64_t inflate);

// `count` empty records of the repeated message field `field_number` of `msg`, after `msg`:
// 2 bytes each decoded, a heap object each once parsed.
std::string empty_records(const char magic[8], const google::protobuf::Message& msg,
                          int field_number, uint64_t count);

// Adds `count` zombie processes (pids first_pid, first_pid + 1, ...) to the image in `dir`,
// listed in its inventory, each process file a metadata_bomb of `inflate` bytes.
void add_bomb_processes(const std::string& dir, int first_pid, int count, uint64_t inflate);

// Replaces the file at `path` with a FIFO that nobody writes.
void replace_with_fifo(const std::string& path);

}  // namespace lazycr::test::hostile
