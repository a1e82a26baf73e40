#!/usr/bin/env bash
# Build llama.cpp's benchmark tools (llama-bench, llama-perplexity,
# llama-quantize, llama-tokenize, llama-imatrix, llama-completion) from the
# llama-cpp-python source package,
# for side-by-side measurements. Nothing of it is committed.
#
#   scripts/build-llama-cpp.sh [DIR]     (default DIR: ../llama; prints the bin folder)
set -euo pipefail
DIR=${1:-$(cd "$(dirname "$0")/../.." && pwd)/llama}
mkdir -p "$DIR"
cd "$DIR"
[ -x venv/bin/pip ] || python3 -m venv venv
venv/bin/pip install -q scikit-build-core cmake ninja
ls llama_cpp_python-*.tar.gz >/dev/null 2>&1 ||
    venv/bin/pip download -q --no-deps --no-binary :all: --no-build-isolation llama-cpp-python
SRC=$(ls -d llama_cpp_python-*/ 2>/dev/null | head -1 || true)
[ -n "$SRC" ] || { tar xzf llama_cpp_python-*.tar.gz; SRC=$(ls -d llama_cpp_python-*/ | head -1); }
cd "$SRC/vendor/llama.cpp"
PATH="$DIR/venv/bin:$PATH" cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF >/dev/null
PATH="$DIR/venv/bin:$PATH" cmake --build build -j "$(nproc)" \
    --target llama-bench llama-perplexity llama-quantize llama-tokenize llama-imatrix llama-completion >/dev/null
echo "$PWD/build/bin"
