#!/usr/bin/env bash
# One GPU-machine session: install this checkout, run the CUDA/kernel tests on the real GPU,
# the conformance suite for device cuda (when installed), then benchmarks/gpu_transfer.py.
# Everything lands in $OUT (default ./out): setup.log, pytest-gpu.log, conformance.log,
# cuda-h100.json, bench.log, gpu_transfer.json. Usage: OUT=/tmp/o benchmarks/gpu_run.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
QUICK=${1:-}

{
    date -u; nvidia-smi; uname -a
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    pkgs=(-e . -e kernels -e devices/cuda -e devices/rocm -e devices/ascend -e devices/arm)
    [ -f conformance/pyproject.toml ] && pkgs+=(-e conformance)
    $PY -m pip install -q --no-deps --no-build-isolation --no-cache-dir "${pkgs[@]}"
    $PY -m pip list 2>/dev/null | grep -i -E "lmcache|torch|triton|cuda-bindings|nvidia-ml|transformers|xdist"
} >"$OUT/setup.log" 2>&1
echo "setup rc=$? ($(tail -n 3 "$OUT/setup.log" | tr '\n' ' '))"

# GPU tests: the same files CI runs on CPU, now with the compiled kernels on the device.
timeout 300 $PY -m pytest -q -ra -n 8 -p no:cacheprovider devices/cuda kernels >"$OUT/pytest-gpu.log" 2>&1
echo "pytest rc=$? :: $(tail -n 1 "$OUT/pytest-gpu.log")"

if [ -z "$QUICK" ] && $PY -c "import lmcache_conformance" 2>/dev/null; then
    timeout 240 $PY -m lmcache_core.cli conformance --device cuda --report "$OUT/cuda-h100.json" \
        >"$OUT/conformance.log" 2>&1
    echo "conformance rc=$? :: $(grep -E 'passed|failed|skipped' "$OUT/conformance.log" | tail -n 1)"
else
    echo "conformance not run (lmcache_conformance not importable or --quick)"
fi

SECTIONS=ceilings,store_load,tune,overlap,ttft
[ -n "$QUICK" ] && SECTIONS=ceilings,store_load
timeout 420 $PY benchmarks/gpu_transfer.py --out "$OUT" --sections "$SECTIONS" 2>&1 | tee "$OUT/bench.log" | tail -n 40
