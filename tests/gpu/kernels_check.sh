#!/usr/bin/env bash
# make kernels-check: compile every kernel in kernels/ with NVRTC for sm_80 and
# sm_90 through the binary's own runtime path (`lift kernels-check`), then
# assemble the PTX with ptxas -v and print each kernel's registers and spills;
# then run the CPU-emulation tests of tests/gpu/emu (kernels as C++ on the CPU).
# No GPU is needed: NVRTC and ptxas come from NVIDIA's CUDA 13.0 wheels on
# PyPI, installed once into .cuda-wheels/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=.cuda-wheels
LIB=$WHEELS/nvidia/cu13/lib
PTXAS=$WHEELS/nvidia/cu13/bin/ptxas
if [ ! -e "$LIB/libnvrtc.so.13" ] || [ ! -x "$PTXAS" ]; then
    echo "installing NVRTC and ptxas (CUDA 13.0 wheels) into $WHEELS"
    $PYTHON -m pip install --quiet --no-deps --target "$WHEELS" \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvcc==13.0.88
fi
BIN=${LIFT:-./lift}
OUTDIR=target/ptx
rm -rf "$OUTDIR"
LD_LIBRARY_PATH="$PWD/$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$BIN" kernels-check --arch compute_80,compute_90 --ptx-dir "$OUTDIR"
echo
printf '%-6s %-28s %5s %8s %8s %8s\n' arch kernel regs smem spill_st spill_ld
fail=0
for f in "$OUTDIR"/*.ptx; do
    arch=${f##*.compute_}; arch=${arch%.ptx}
    if ! log=$("$PTXAS" -arch=sm_$arch -v "$f" -o /dev/null 2>&1); then
        echo "FAIL ptxas sm_$arch $f"; echo "$log"; fail=1; continue
    fi
    echo "$log" | awk -v arch="sm_$arch" '
        /Compiling entry function/ { match($0, /'"'"'[a-zA-Z_0-9]+'"'"'/); name = substr($0, RSTART+1, RLENGTH-2); regs = smem = st = ld = 0 }
        /spill stores/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "stores,") st = $i; if ($(i+1) == "bytes" && $(i+2) == "spill" && $(i+3) == "loads") ld = $i } }
        /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) { if ($i == "Used") regs = $(i+1); if ($(i+1) == "bytes" && $(i+2) == "smem,") smem = $i; if ($(i+1) == "bytes" && $(i+2) == "smem") smem = $i }
                                  printf "%-6s %-28s %5s %8s %8s %8s\n", arch, name, regs, smem, st, ld }'
done
[ $fail -eq 0 ] && echo "kernels-check: every kernel compiled for sm_80 and sm_90"
# The kernels with CPU-emulation tests (tests/gpu/emu): run them too, when a
# C++20 compiler is here (about 30 s; EMU=0 skips).
if [ "${EMU:-1}" != 0 ] && command -v "${CXX:-g++}" >/dev/null; then
    echo
    tests/gpu/emu/run.sh || fail=1
fi
exit $fail
