#!/usr/bin/env bash
# Build llama.cpp's reference tools from the sources vendored in the pinned llama-cpp-python sdist
# (unpacked by setup_llama_cpp.sh) into .cache/llama.cpp-build/bin. Benchmark tooling only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
SRC="$ROOT/.cache/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$ROOT/.cache/llama.cpp-build"
TOOLS=${*:-llama-bench llama-quantize llama-perplexity llama-imatrix llama-tokenize llama-server}
[ -d "$SRC" ] || { echo "no llama.cpp sources at $SRC: run make setup first" >&2; exit 1; }
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target $TOOLS
