#include "common/syscall_batch.h"

#include <algorithm>

#include "common/error.h"

namespace lazycr {
namespace {

// The loop (x86-64):
//   jmp start; int3;
//   start: rbx = rdi (table), r12 = rsi (count), r13 = 0
//   loop:  while r13 < r12: load rax, rdi, rsi, rdx, r10, r8, r9 from [rbx]; syscall;
//          [rbx+56] = rax; stop if rax >= -4095; rbx += 64; r13++
//   rax = r13 (entries done); jmp to the int3
// rbx, r12 and r13 are the thread's own again once the injection puts its registers back.
constexpr unsigned char kBatchCode[] = {
    0xeb, 0x01, 0xcc, 0x48, 0x89, 0xfb, 0x49, 0x89, 0xf4, 0x4d, 0x31, 0xed, 0x4d, 0x39, 0xe5,
    0x73, 0x32, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b,
    0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30, 0x0f,
    0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x09, 0x48, 0x83,
    0xc3, 0x40, 0x49, 0xff, 0xc5, 0xeb, 0xc9, 0x4c, 0x89, 0xe8, 0xeb, 0xba};

}  // namespace

std::span<const unsigned char> batch_code() {
  return kBatchCode;
}

std::vector<long> run_batch(TracedThread& t, pid_t pid, uint64_t code, uint64_t table,
                            size_t capacity, std::span<const BatchCall> calls,
                            uint64_t* round_trips) {
  if (capacity == 0) fail("no room for a batch of system calls");
  std::vector<long> results;
  results.reserve(calls.size());
  std::vector<uint64_t> words;
  for (size_t i = 0; i < calls.size();) {
    const size_t n = std::min(capacity, calls.size() - i);
    words.assign(n * 8, 0);
    for (size_t k = 0; k < n; k++) {
      words[k * 8] = static_cast<uint64_t>(calls[i + k].nr);
      std::copy(calls[i + k].a.begin(), calls[i + k].a.end(), words.begin() + k * 8 + 1);
    }
    remote_write(pid, table, words.data(), words.size() * 8);
    const long done = t.syscall(code, InjectMode::kTrapAfter, 0, table, n);
    if (round_trips != nullptr) ++*round_trips;
    if (done < 0 || static_cast<size_t>(done) > n)
      fail("the batch of system calls returned ", done, " for ", n, " calls");
    remote_read(pid, table, words.data(), words.size() * 8);
    const size_t ran = std::min(static_cast<size_t>(done) + 1, n);
    for (size_t k = 0; k < ran; k++) results.push_back(static_cast<long>(words[k * 8 + 7]));
    if (static_cast<size_t>(done) < n) break;
    i += n;
  }
  return results;
}

}  // namespace lazycr
