#include "tools/commands.h"
namespace lazycr::cli {
int run_check(const CheckOptions&) { return 0; }
}  // namespace lazycr::cli
