#!/usr/bin/env bash
# The demo: what this kernel offers lazycr, then a checkpoint of a running sample process
# (dump with --leave-running, `show` of the image, and the process going on unharmed).
# Grows into "dump, lazy restore, stats" as those land.
set -euo pipefail
build=${1:-$(cd "$(dirname "$0")/.." && pwd)/build}
lazycr="$build/tools/lazycr"
work=$(mktemp -d /tmp/lazycr-demo-XXXXXX)
target_pid=
cleanup() {
  [ -n "$target_pid" ] && kill -9 "$target_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== lazycr check"
"$lazycr" check

echo
echo "== a sample process: 64 MiB of patterned memory, 3 threads, files, signal handlers"
# The sample holds no descriptor it did not open itself (a stray inherited pipe would be
# refused by the dump, as it cannot be restored).
start_sample() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
  done
  exec "$build/tests/targets/state_target" --mib 64 --workdir "$work" --verify-file "$work/verify"
}
exec 3< <(start_sample 2>&1)
read -r ready <&3
echo "$ready"
target_pid=$(sed -n 's/^ready pid=\([0-9]*\).*/\1/p' <<<"$ready")

echo
echo "== lazycr dump --leave-running -t $target_pid -D $work/image"
"$lazycr" dump --leave-running -t "$target_pid" -D "$work/image"

echo
echo "== lazycr show $work/image (first lines)"
"$lazycr" show "$work/image" | head -n 25

echo
echo "== the process goes on: it checks its own memory, threads, files and signals"
touch "$work/verify"
read -r verdict <&3
echo "$verdict"
[ "$verdict" = "verified ok" ]
