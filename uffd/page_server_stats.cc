// The page server's counters as numbers for people and for JSON (uffd/page_server.h).
#include <algorithm>
#include <vector>

#include "uffd/page_server.h"

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

}  // namespace lazycr::uffd
