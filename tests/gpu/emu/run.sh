#!/usr/bin/env bash
# Runs the CUDA kernels that have CPU-emulation tests (emu.h) on this machine,
# no GPU needed: each test compiles kernels/*.cu with g++ as ordinary C++,
# runs every CUDA thread as an OS thread, and compares with a reference
# computed in the test. About half a minute on 2 cores.
#   tests/gpu/emu/run.sh            all tests
#   tests/gpu/emu/run.sh attention  the ones whose name contains "attention"
set -euo pipefail
cd "$(dirname "$0")"
CXX=${CXX:-g++}
OUT=${TMPDIR:-/tmp}/lift-emu
mkdir -p "$OUT"
fail=0
for src in test_*.cpp; do
    [ -n "${1:-}" ] && [[ "$src" != *"$1"* ]] && continue
    bin=$OUT/${src%.cpp}
    $CXX -std=c++20 -O1 -fno-strict-aliasing -pthread -w "$src" -o "$bin"
    echo "== $src"
    timeout 900 "$bin" || fail=1
done
exit $fail
