#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU: every kernel against its CPU counterpart
# (runtime/src/cuda/tests.rs, the tests CI cannot run), then the packed GEMV's bandwidth.
#
#   scripts/test-cuda.sh                 build here with --features cuda, then run
#   scripts/test-cuda.sh TEST_BINARY     run a test binary built elsewhere (for a GPU machine
#                                        without network: build it with
#                                        `cargo test -p nibble-runtime --features cuda --lib --no-run`
#                                        and carry it with target/nvrtc)
#
# NVRTC: the CUDA toolkit's if LD_LIBRARY_PATH finds one, else scripts/nvrtc.sh's (target/nvrtc).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "test-cuda.sh: no NVIDIA GPU here (nvidia-smi failed)" >&2
    exit 1
}
if [ -d target/nvrtc/nvidia/cuda_nvrtc/lib ]; then
    NVRTC=$(cd target/nvrtc/nvidia/cuda_nvrtc/lib && pwd)
else
    NVRTC=$(scripts/nvrtc.sh)
fi
export LD_LIBRARY_PATH=$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ $# -ge 1 ]; then
    "$1" cuda:: --include-ignored --test-threads 1
else
    cargo test --release -p nibble-runtime --features cuda --lib cuda:: -- --include-ignored \
        --test-threads 1
    cargo run --release -p nibble-runtime --features cuda --example cuda_gemv_bench
fi
