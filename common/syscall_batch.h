#pragma once
// Many system calls in one ptrace round trip (x86-64): a small loop placed in the target's
// memory runs a table of calls and stops at an int3. The restore's trampoline and the dump's
// batch area both carry it.

#include <sys/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/ptrace.h"

namespace lazycr {

struct BatchCall {
  long nr = 0;
  std::array<uint64_t, 6> a{};
};

constexpr size_t kBatchEntrySize = 64;  // nr, six arguments, result

// The loop's machine code. Entered at its first byte like an injected `syscall; int3`
// (InjectMode::kTrapAfter: its int3 is at +2), with rdi = table and rsi = count; returns how
// many calls succeeded (it stops at the first that fails).
std::span<const unsigned char> batch_code();

// Runs `calls` in order in the stopped thread `t` of `pid`, with the loop at `code` and room
// for `capacity` table entries at `table` (both in the target), as many per round trip as fit.
// Stops at the first failed call: returns the result of each call run, the failed one last.
// `round_trips` (if given) is increased by the round trips taken.
std::vector<long> run_batch(TracedThread& t, pid_t pid, uint64_t code, uint64_t table,
                            size_t capacity, std::span<const BatchCall> calls,
                            uint64_t* round_trips = nullptr);

}  // namespace lazycr
