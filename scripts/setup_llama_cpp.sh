#!/usr/bin/env bash
# Install llama-cpp-python at the pinned version, built from source with the RPC backend
# (LAN sharding needs libggml-rpc). The source distribution stays unpacked in .cache/: its
# vendored llama.cpp holds the tokenizer test vocabularies the tests use and the reference
# tools (llama-bench, llama-quantize, convert_hf_to_gguf.py) the benchmarks compare against.
# Skips the ~3-minute build when the right build is present.
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
CACHE="$ROOT/.cache"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_python-$VERSION"

if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  mkdir -p "$CACHE"
  if [ ! -f "$SDIST" ]; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$CACHE" "llama-cpp-python==$VERSION"
  fi
  tar -xzf "$SDIST" -C "$CACHE"
fi

have_rpc_build() {
  "$PY" - "$VERSION" <<'PY' 2>/dev/null
import importlib.metadata as md, pathlib, sys
assert md.version("llama-cpp-python") == sys.argv[1]
import llama_cpp
lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
assert any(lib.glob("libggml-rpc.so*")), "no libggml-rpc"
PY
}

if have_rpc_build; then
  exit 0
fi
echo "building llama-cpp-python $VERSION from source with GGML_RPC=ON (about 3 minutes on 2 cores)..."
export CMAKE_ARGS="-DGGML_RPC=ON ${CMAKE_ARGS:-}"
"$PY" -m pip install -q --disable-pip-version-check "$SDIST"
if ! have_rpc_build; then
  # a wheel cached from a build without RPC: build again, bypassing the cache
  "$PY" -m pip install -q --disable-pip-version-check --no-cache-dir --force-reinstall --no-deps "$SDIST"
fi
have_rpc_build || { echo "llama-cpp-python was built without libggml-rpc" >&2; exit 1; }
