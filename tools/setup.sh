#!/usr/bin/env bash
# Installs what lazycr needs (Debian 12, as root), builds it, and runs the demo or the tests.
#   tools/setup.sh demo   install, build, run the demo (tools/demo.sh)
#   tools/setup.sh test   install, build, run every test (normal, ASan/UBSan, fuzz) via ctest
#   tools/setup.sh build  install and build only
# Idempotent: installs only missing packages, reuses existing build directories.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-build}
jobs=$(nproc)

packages=(build-essential cmake pkg-config git python3 clang libclang-rt-14-dev clang-format
  libzstd-dev liblz4-dev libipsec-mb-dev libprotobuf-dev protobuf-compiler libboost-filesystem-dev
  libgtest-dev libgmock-dev libcli11-dev libbenchmark-dev libssl-dev sqlite3 nodejs redis-server
  memcached nginx-light tmux libnftables-dev nftables)

install_missing() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
      echo "setup: missing packages and not root; run as root or install: ${missing[*]}" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

build() { # build DIR [cmake args...] [-- targets...]
  local dir=$1 args=() targets=()
  shift
  while (($#)) && [ "$1" != "--" ]; do args+=("$1"); shift; done
  if (($#)); then shift; targets=(--target "$@"); fi
  cmake -S "$here" -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "${args[@]}" >/dev/null
  cmake --build "$dir" -j "$jobs" "${targets[@]}"
}

install_missing
case "$mode" in
  build)
    build "$here/build"
    ;;
  demo)
    build "$here/build"
    exec "$here/tools/demo.sh" "$here/build"
    ;;
  test)
    build "$here/build"
    # Normal build: unit and end-to-end tests against the real kernel.
    (cd "$here/build" && ctest --output-on-failure -j "$jobs" -L unit)
    (cd "$here/build" && ctest --output-on-failure -L e2e)
    # Unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer.
    build "$here/build-asan" -DLAZYCR_SANITIZE=ON -DLAZYCR_BENCH=OFF
    (cd "$here/build-asan" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --output-on-failure -j "$jobs" -L unit)
    # libFuzzer targets (clang), a short run each from a seed corpus the tests generate.
    CC=clang CXX=clang++ build "$here/build-fuzz" -DLAZYCR_FUZZ=ON -DLAZYCR_BENCH=OFF \
      -- page_store_fuzz image_dir_fuzz make_seed_corpus
    (cd "$here/build-fuzz" && ctest --output-on-failure -L fuzz)
    echo "setup: all tests passed"
    ;;
  *)
    echo "usage: tools/setup.sh [build|demo|test]" >&2
    exit 2
    ;;
esac
