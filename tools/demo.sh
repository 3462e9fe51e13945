#!/usr/bin/env bash
# The demo: what this kernel offers lazycr, then a checkpoint of a running sample process and
# its lazy restore: the process runs again at once while the page server feeds its memory;
# it checks every byte of it, and the page server's stats are shown.
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
echo "== lazycr dump -t $target_pid -D $work/image (the process is killed)"
"$lazycr" dump -t "$target_pid" -D "$work/image"
exec 3<&-

echo
echo "== lazycr -v restore --lazy -D $work/image --shell-job --stats $work/stats.json"
# The sample checks all its memory, threads, files and signals as soon as it runs again (its
# verify file exists): every page it reads is served on first touch or was prefetched.
touch "$work/verify"
verdict=$("$lazycr" -v restore --lazy -D "$work/image" --shell-job --stats "$work/stats.json")
echo "the restored sample says: $verdict"
[ "$verdict" = "verified ok" ]

echo
echo "== the page server's stats ($work/stats.json)"
cat "$work/stats.json"
