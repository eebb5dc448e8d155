#!/usr/bin/env bash
# Install llama-cpp-python at the pinned version, built from source with the RPC backend
# (LAN sharding needs libggml-rpc). Skips the ~3-minute build when the right build is present.
set -euo pipefail
PY=${1:-python3}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")

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
"$PY" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
if ! have_rpc_build; then
  # a wheel cached from a build without RPC: build again, bypassing the cache
  "$PY" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python --no-cache-dir \
    --force-reinstall --no-deps "llama-cpp-python==$VERSION"
fi
have_rpc_build || { echo "llama-cpp-python was built without libggml-rpc" >&2; exit 1; }
