#include "tools/commands.h"
namespace lazycr::cli {
int run_show(const ShowOptions&) { return 0; }
}  // namespace lazycr::cli
