#!/usr/bin/env bash
# NVIDIA's runtime compiler without a CUDA toolkit or a GPU: the nvidia-cuda-nvrtc-cu12 wheel from
# PyPI, unpacked once into target/nvrtc (cached), so the CUDA kernels (runtime/src/cuda/kernels)
# can be compiled to PTX on any x86-64 Linux machine. Prints the folder holding libnvrtc.so.12:
#
#   LD_LIBRARY_PATH=$(scripts/nvrtc.sh) cargo test -p nibble-runtime --features cuda --lib cuda::
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=target/nvrtc
LIB=$DIR/nvidia/cuda_nvrtc/lib
if ! ls "$LIB"/libnvrtc.so.* >/dev/null 2>&1; then
    mkdir -p "$DIR/wheel"
    python3 -m pip download --quiet --no-deps --only-binary :all: --dest "$DIR/wheel" \
        'nvidia-cuda-nvrtc-cu12>=12.4,<13' >&2
    python3 - "$DIR" <<'PY'
import glob, sys, zipfile
d = sys.argv[1]
wheel = sorted(glob.glob(f"{d}/wheel/nvidia_cuda_nvrtc_cu12-*.whl"))[-1]
zipfile.ZipFile(wheel).extractall(d)
PY
fi
# cudarc opens libnvrtc.so.12; the wheel's builtins library sits beside it.
cd "$LIB" && pwd
