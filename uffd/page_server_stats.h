// Internal to uffd/: the page server's stats for people and as a JSON file
// (PageServer::summary() and write_stats_json(), uffd/page_server.h).
#pragma once

#include <string>

#include "uffd/page_server.h"

namespace lazycr::uffd {

// One paragraph: what was served, how fast, what went wrong.
std::string stats_summary(const PageServerStats& s);
// The stats as one JSON object in `path`; throws Error naming the path on failure.
void write_stats_file(const PageServerStats& s, const std::string& path);

}  // namespace lazycr::uffd
