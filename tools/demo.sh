#!/usr/bin/env bash
# The demo: what this kernel offers lazycr. Grows into dump + lazy restore + stats as those land.
set -euo pipefail
build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
"$build/tools/lazycr" check
