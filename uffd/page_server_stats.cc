// The page server's counters as numbers for people and for JSON (uffd/page_server.h).
#include "uffd/page_server_stats.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

#include "common/error.h"

namespace lazycr::uffd {

uint64_t PageServerStats::latency_ns(double q) const {
  if (fault_latency_ns.empty()) return 0;
  std::vector<uint32_t> v = fault_latency_ns;
  q = std::clamp(q, 0.0, 1.0);
  size_t k = static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
  return v[k];
}

void write_stats_fields(JsonWriter& w, const PageServerStats& s) {
  w.field("processes", s.processes);
  w.field("faults", s.faults);
  w.key("pages");
  w.begin_object();
  w.field("by_fault", s.fault_pages);
  w.field("by_prefetch", s.prefetch_pages);
  w.field("zero", s.zero_pages);
  w.field("dropped", s.dropped_pages);
  w.end_object();
  w.field("faults_not_owed", s.not_owed_faults);
  w.field("faults_answered_by_prefetch", s.prefetch_waits);
  w.key("working_set");
  w.begin_object();
  w.field("pages_prefetched", s.working_set_pages);
  w.field("pages_from_record_pages", s.working_set_record_pages);
  w.field("faults", s.working_set_faults);
  w.field("done_ns", s.working_set_done_ns);  // from the start of the server's run
  w.end_object();
  w.key("fault_latency_ns");
  w.begin_object();
  w.field("p50", s.latency_ns(0.5));
  w.field("p90", s.latency_ns(0.9));
  w.field("p99", s.latency_ns(0.99));
  w.field("max", s.latency_ns(1.0));
  w.end_object();
  w.field("bytes_decompressed", s.bytes_decompressed);
  w.field("fill_ioctls", s.copy_ioctls);
  w.key("fill_answers");
  w.begin_object();
  w.field("eexist", s.eexist);
  w.field("eagain", s.eagain);
  w.field("enoent", s.enoent);
  w.end_object();
  w.key("events");
  w.begin_object();
  w.field("fork", s.events_fork);
  w.field("remap", s.events_remap);
  w.field("remove", s.events_remove);
  w.field("unmap", s.events_unmap);
  w.field("exit", s.exits);
  w.end_object();
  w.field("children_found", s.children_found);
  w.field("killed", s.killed);
  w.key("parked_descriptors");
  w.begin_object();
  w.field("closed", s.parked_closed);
  w.field("left", s.parked_left);
  w.end_object();
  w.key("errors");
  w.begin_array();
  for (const std::string& e : s.errors) w.value(e);
  w.end_array();
}

std::string stats_summary(const PageServerStats& s) {
  auto ms = [](int64_t ns) { return ns < 0 ? std::string("never") : cat(ns / 1'000'000.0, " ms"); };
  std::ostringstream out;
  out.precision(3);
  out << "page server: " << s.processes << " process" << (s.processes == 1 ? "" : "es") << ", "
      << s.faults << " faults (service p50 " << s.latency_ns(0.5) / 1000.0 << " us, p99 "
      << s.latency_ns(0.99) / 1000.0 << " us, max " << s.latency_ns(1.0) / 1000.0 << " us); "
      << s.fault_pages << " pages copied on faults, " << s.prefetch_pages << " by prefetch, "
      << s.zero_pages << " zero-filled (" << s.not_owed_faults << " faults on pages not owed); "
      << s.prefetch_waits << " faults answered by prefetch; "
      << "first fault after " << ms(s.first_fault_ns) << ", nothing owed after "
      << ms(s.all_served_ns) << "; " << s.bytes_decompressed / (1024.0 * 1024.0)
      << " MiB decompressed; events: fork " << s.events_fork << ", remap " << s.events_remap
      << ", remove " << s.events_remove << ", unmap " << s.events_unmap << ", exits " << s.exits;
  if (s.parked_left > 0)
    out << "; " << s.parked_left << " keeper descriptor" << (s.parked_left == 1 ? "" : "s")
        << " left in place";
  if (s.killed > 0) out << "; KILLED " << s.killed << ": " << s.errors.front();
  out << ".";
  return out.str();
}

void write_stats_file(const PageServerStats& s, const std::string& path) {
  std::ofstream f(path, std::ios::trunc);
  if (!f) fail_errno("page server: cannot write stats to ", path);
  JsonWriter w(f);
  w.begin_object();
  w.field("time_to_first_fault_ns", s.first_fault_ns);
  w.field("time_until_nothing_owed_ns", s.all_served_ns);
  w.field("run_ns", s.run_ns);
  write_stats_fields(w, s);
  w.end_object();
  f << "\n";
  f.flush();
  if (!f) fail_errno("page server: cannot write stats to ", path);
}

}  // namespace lazycr::uffd
