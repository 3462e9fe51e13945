// `lazycr show` of what objects/timers, objects/sched and objects/pdeathsig record.
#pragma once

#include <ostream>

#include "common/json.h"
#include "image-format/process.pb.h"

namespace lazycr::cli {

// "  Timers (N): ..." lines and one "  Scheduling (thread T): ..." line per thread.
void print_timers_text(std::ostream& o, const image::Process& p);
// Fields "posix_timers" and "itimers" of the process object.
void timers_json(JsonWriter& j, const image::Process& p);
// Fields "sched" and "pdeathsig" of a thread object.
void thread_sched_json(JsonWriter& j, const image::Thread& t);

}  // namespace lazycr::cli
