#!/usr/bin/env bash
# One GPU-machine session: install this checkout, run the CUDA/kernel tests on the real GPU,
# the vLLM connector's worker half (benchmarks/connector_gpu.py), the conformance suite for
# device cuda (when installed), then benchmarks/gpu_transfer.py. Everything lands in $OUT
# (default ./out): setup.log, pytest-gpu.log, connector.log, connector_gpu.json,
# conformance.log, cuda-gpu.json, bench.log, gpu_transfer.json.
# Usage: OUT=/tmp/o STEPS=tests,connector,conformance,transfer benchmarks/gpu_run.sh [--quick]
# (STEPS=codecs: benchmarks/codecs.py --sections gpu -> codecs.log, codecs-gpu.json)
# (STEPS=daemon: connector_gpu.py --daemon -> connector_gpu-daemon.json; daemon.py --gpu -> daemon-gpu.json)
# (STEPS=p2p: nixl conformance -> nixl-gpu.json; nixl_vram.py -> nixl-vram.json; p2p.py --device cuda -> p2p-gpu.json)
# (STEPS=dma: conformance and connector_gpu.py with LMCACHE_KV_LOAD_MODE=dma -> cuda-gpu-dma.json, dma/)
# (STEPS=staged: conformance and connector_gpu.py (and with daemon its --daemon run) with staged transfers -> staged/)
# (STEPS=conformance_ringdma: the conformance suite with LMCACHE_KV_RING_COPY=dma -> cuda-gpu-ringdma.json)
# (STEPS=start_profile: benchmarks/start_profile.py and the pipelining contract alone -> start-profile.json)
# (STEPS=upload: benchmarks/upload_cost.py, the host cost of each call of a table upload -> upload-cost.json)
# (STEPS=start_layerwise: start_profile.py at the layer-wise shape, START_TOKENS=4096,32768 -> start-profile-layerwise-T.json)
# (STEPS=ce: benchmarks/ce_copies.py, per-copy cost of cuMemcpyBatchAsync by direction and size -> ce-copies.json)
# (STEPS=lookup: benchmarks/lookup.py, key hashing + memory-tier lookup on this host's CPU -> lookup.log, lookup-gpu.json)
# (STEPS picks what runs; one device call is at most 10 minutes, so split the steps over two;
#  CONNECTOR_ARGS / DAEMON_ARGS add connector_gpu.py options, e.g. "--layouts vllm032_flash --tokens 4096";
#  TESTS_TIMEOUT, CONNECTOR_TIMEOUT, CODECS_TIMEOUT, TRANSFER_TIMEOUT bound those steps in seconds;
#  TIMELINE=N adds N per-layer timeline runs per layerwise variant: host issue and GPU ready/done times;
#  PROFILE=1 with it cProfiles one extra timeline run of each variant).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
QUICK=${1:-}
STEPS=${STEPS:-tests,connector,conformance,transfer}
START_TOKENS=${START_TOKENS:-4096,32768}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

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
if want tests; then
    timeout ${TESTS_TIMEOUT:-300} $PY -m pytest -q -ra -n 8 -p no:cacheprovider devices/cuda kernels >"$OUT/pytest-gpu.log" 2>&1
    echo "pytest rc=$? :: $(tail -n 1 "$OUT/pytest-gpu.log")"
    grep -E "FAILED|ERROR" "$OUT/pytest-gpu.log" | head -n 20
fi

if want connector; then
    timeout ${CONNECTOR_TIMEOUT:-240} $PY benchmarks/connector_gpu.py --out "$OUT" ${CONNECTOR_ARGS:-} >"$OUT/connector.log" 2>&1
    echo "connector rc=$?"; tail -n 8 "$OUT/connector.log"
fi

# Daemon mode (issue 11): the connector's worker half through `lmcache serve`, and the engine's
# store/load through the shared arena vs embedded, plus the control plane's round trips.
# (STEPS=connector_daemon: only the connector's worker half through the daemon.)
if want daemon || want connector_daemon; then
    timeout ${CONNECTOR_TIMEOUT:-240} $PY benchmarks/connector_gpu.py --out "$OUT" --daemon ${DAEMON_ARGS:-} \
        >"$OUT/connector-daemon.log" 2>&1
    echo "connector (daemon) rc=$?"; tail -n 6 "$OUT/connector-daemon.log"
fi
if want daemon; then
    # the TTFT part runs on this host's (quiet, 16-core) CPU with a random Llama: no model wheel here
    timeout 300 $PY benchmarks/daemon.py --sections control,gpu,ttft --random-model --reps 7 \
        --json "$OUT/daemon-gpu.json" >"$OUT/daemon.log" 2>&1
    echo "daemon bench rc=$?"; tail -n 8 "$OUT/daemon.log"
fi

if want conformance; then
    if [ -z "$QUICK" ] && $PY -c "import lmcache_conformance" 2>/dev/null; then
        timeout 240 $PY -m lmcache_core.cli conformance --device cuda --report "$OUT/cuda-gpu.json" \
            >"$OUT/conformance.log" 2>&1
        echo "conformance rc=$? :: $(grep -E 'passed|failed|skipped' "$OUT/conformance.log" | tail -n 1)"
        grep -i -E "overlap|FAIL" "$OUT/conformance.log" | head -n 10
    else
        echo "conformance not run (lmcache_conformance not importable or --quick)"
    fi
fi

# The same suite with the staged path's ring <-> cache half on the copy engines (ring_copy dma):
# the pipelining contract's load then needs no SM beside its GEMMs.
if want conformance_ringdma; then
    LMCACHE_KV_RING_COPY=dma timeout 240 $PY -m lmcache_core.cli conformance --device cuda \
        --report "$OUT/cuda-gpu-ringdma.json" >"$OUT/conformance-ringdma.log" 2>&1
    echo "conformance (ring_copy dma) rc=$? :: $(grep -E 'passed|failed|skipped' "$OUT/conformance-ringdma.log" | tail -n 1)"
    grep -i -E "overlap|FAIL" "$OUT/conformance-ringdma.log" | head -n 10
fi

# What one small table upload's torch calls cost the host, call by call.
if want upload; then
    timeout 120 $PY benchmarks/upload_cost.py --device cuda --json "$OUT/upload-cost.json" >"$OUT/upload-cost.log" 2>&1
    echo "upload cost rc=$?"; cat "$OUT/upload-cost.log"
fi

# The same profile at gpu_transfer.py's layer-wise shape (Llama-3-8B's KV, chunks of 256), per size.
if want start_layerwise; then
    for t in ${START_TOKENS//,/ }; do
        timeout 150 $PY benchmarks/start_profile.py --device cuda --shape layerwise --tokens "$t" \
            --json "$OUT/start-profile-layerwise-$t.json" >"$OUT/start-profile-layerwise-$t.log" 2>&1
        echo "start profile layerwise $t rc=$?"; grep -E "^(start_retrieve|first waits)" "$OUT/start-profile-layerwise-$t.log"
    done
fi

# Where a layer-by-layer load's start goes on the host (the conformance pipelining shape), then
# that contract alone.
if want start_profile; then
    timeout 120 $PY benchmarks/start_profile.py --device cuda --json "$OUT/start-profile.json" \
        >"$OUT/start-profile.log" 2>&1
    echo "start profile rc=$?"; head -n 45 "$OUT/start-profile.log"
    timeout 150 $PY -m lmcache_core.cli conformance --device cuda --contract pipelining \
        --report "$OUT/cuda-gpu-pipelining.json" >"$OUT/conformance-pipelining.log" 2>&1
    echo "pipelining rc=$? :: $(grep -E 'passed|failed' "$OUT/conformance-pipelining.log" | tail -n 1)"
    grep -i -E "overlap" "$OUT/conformance-pipelining.log" | head -n 3
fi

# What a copy-engine batch costs per copy, device to device and host to device, by copy size.
if want ce; then
    timeout 120 $PY benchmarks/ce_copies.py --json "$OUT/ce-copies.json" >"$OUT/ce-copies.log" 2>&1
    echo "ce copies rc=$?"; cat "$OUT/ce-copies.log"
fi

# Copy-engine batches (mode dma, cuMemcpyBatchAsync through ctypes): probed in a child process
# first, so a driver that refuses the call costs that process, not the benchmark.
dma_probe() {
    $PY - <<'PY'
import torch
from lmcache_kernels.testing import bits, chunk_like, make_kv, random_slots
from lmcache_kernels.transfer import KVTransfer, TransferOptions
dev = torch.device("cuda")
kv, _ = make_kv("vllm_flash", device=dev, num_blocks=16, generator=torch.Generator().manual_seed(1))
slots = random_slots(8, kv, torch.Generator().manual_seed(2))
x = KVTransfer(dev, TransferOptions(store_mode="dma", load_mode="dma"), torch.cuda)
got = chunk_like(kv, 8, "cpu", pin=True)
x.gather(kv, [(slots, got)])
want = chunk_like(kv, 8)
KVTransfer(dev, TransferOptions(store_mode="torch"), torch.cuda).gather(kv, [(slots, want)])
torch.cuda.synchronize()
assert x.stats.dma == 1 and torch.equal(bits(got), bits(want.cpu())), (x.stats, x._copier_why)
print("dma probe ok:", x._copier_why)
PY
}
if want transfer || want dma; then
    if ! dma_probe >"$OUT/dma-probe.log" 2>&1; then
        export LMCACHE_BENCH_NO_DMA="the copy-engine probe failed: $(tail -n 1 "$OUT/dma-probe.log")"
    fi
    echo "dma probe: $(tail -n 1 "$OUT/dma-probe.log")"
fi

# The conformance suite and the connector's worker half with copy-engine loads and stores.
if want dma && [ -z "${LMCACHE_BENCH_NO_DMA:-}" ]; then
    LMCACHE_KV_LOAD_MODE=dma LMCACHE_KV_STORE_MODE=dma timeout 240 $PY -m lmcache_core.cli conformance \
        --device cuda --report "$OUT/cuda-gpu-dma.json" >"$OUT/conformance-dma.log" 2>&1
    echo "conformance (dma) rc=$? :: $(grep -E 'passed|failed|skipped' "$OUT/conformance-dma.log" | tail -n 1)"
    grep -i -E "overlap" "$OUT/conformance-dma.log" | head -n 3
    mkdir -p "$OUT/dma"
    LMCACHE_KV_LOAD_MODE=dma LMCACHE_KV_STORE_MODE=dma timeout 240 $PY benchmarks/connector_gpu.py \
        --out "$OUT/dma" >"$OUT/connector-dma.log" 2>&1
    echo "connector (dma) rc=$?"; tail -n 5 "$OUT/connector-dma.log"
fi

# The same with staged per-layer transfers (copy engines into a device ring, one batch call per
# ring group, then a kernel scatters from device memory): conformance, connector, daemon connector.
if want staged; then
    mkdir -p "$OUT/staged"
    export_staged() { LMCACHE_KV_LOAD_MODE=staged LMCACHE_KV_STORE_MODE=staged LMCACHE_KV_STAGING_SLOTS=8 "$@"; }
    export_staged timeout 240 $PY -m lmcache_core.cli conformance \
        --device cuda --report "$OUT/cuda-gpu-staged.json" >"$OUT/conformance-staged.log" 2>&1
    echo "conformance (staged) rc=$? :: $(grep -E 'passed|failed|skipped' "$OUT/conformance-staged.log" | tail -n 1)"
    grep -i -E "overlap" "$OUT/conformance-staged.log" | head -n 3
    export_staged timeout 240 $PY benchmarks/connector_gpu.py --out "$OUT/staged" >"$OUT/connector-staged.log" 2>&1
    echo "connector (staged) rc=$?"; tail -n 10 "$OUT/connector-staged.log"
    if want daemon; then
        export_staged timeout ${CONNECTOR_TIMEOUT:-240} $PY benchmarks/connector_gpu.py --out "$OUT/staged" --daemon \
            --layouts vllm032_flash,vllm_flash_old >"$OUT/connector-daemon-staged.log" 2>&1
        echo "connector (daemon, staged) rc=$?"; tail -n 7 "$OUT/connector-daemon-staged.log"
    fi
fi

if want transfer; then
    SECTIONS=${SECTIONS:-ceilings,store_load,tune,overlap,concurrent,layerwise,ttft}
    [ -n "$QUICK" ] && SECTIONS=ceilings,store_load
    timeout ${TRANSFER_TIMEOUT:-420} $PY benchmarks/gpu_transfer.py --out "$OUT" --sections "$SECTIONS" ${VARIANTS:+--variants "$VARIANTS"} ${BLOCKS:+--blocks "$BLOCKS"} ${TIMELINE:+--timeline "$TIMELINE"} ${PROFILE:+--profile} 2>&1 | tee "$OUT/bench.log" | tail -n 40
fi

# KV codecs (issue 14): fp8 fused into the scatter/gather vs the pinned copy ceiling of the bf16
# bytes, nvCOMP lossless (wheels carried under .cache/codec-wheels, installed offline when present:
# both nvidia-nvcomp-cu13 and its library nvidia-libnvcomp-cu13, e.g. `pip download --no-deps
# --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 -d .cache/codec-wheels
# nvidia-nvcomp-cu13 nvidia-libnvcomp-cu13`, about 34 MB together).
if want codecs; then
    if ls .cache/codec-wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps .cache/codec-wheels/*.whl >"$OUT/codecs-setup.log" 2>&1
        echo "nvcomp wheels rc=$?"
    fi
    timeout ${CODECS_TIMEOUT:-420} $PY benchmarks/codecs.py --sections gpu --out "$OUT" >"$OUT/codecs.log" 2>&1
    echo "codecs rc=$?"; tail -n 8 "$OUT/codecs.log"
fi

# NIXL transport and P2P (issue 13): the transport contract on the GPU host, VRAM/DRAM one-sided
# reads between two processes vs torch copies, and P2P fetches. The nixl wheels (nixl, nixl-cu12)
# are carried under build/nixl-wheels and installed offline when present: nixl 1.5.1 and
# nixl-cu13 1.5.1 (cp312, 58.8 MB: with the 7 MB tree it fits the 64 MiB carry; nixl-cu12 does not).
if want p2p; then
    if ls build/nixl-wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps build/nixl-wheels/*.whl >"$OUT/nixl-setup.log" 2>&1
        echo "nixl wheels rc=$?"
    fi
    $PY -m pip install -q --no-deps --no-build-isolation -e backends/nixl >>"$OUT/nixl-setup.log" 2>&1
    if $PY -c "import nixl._api" 2>>"$OUT/nixl-setup.log"; then
        timeout 180 $PY -m lmcache_core.cli conformance --transport nixl --report "$OUT/nixl-gpu.json" \
            >"$OUT/nixl-conformance.log" 2>&1
        echo "nixl conformance rc=$? :: $(grep -E 'passed|failed' "$OUT/nixl-conformance.log" | tail -n 1)"
        timeout 180 $PY benchmarks/nixl_vram.py --json "$OUT/nixl-vram.json" >"$OUT/nixl-vram.log" 2>&1
        echo "nixl vram rc=$?"; grep -v "NIXL INFO" "$OUT/nixl-vram.log" | tail -n 6
    else
        echo "nixl not importable (see nixl-setup.log); p2p over tcp only"
    fi
    timeout 240 $PY benchmarks/p2p.py --device cuda --machine h200 --json "$OUT/p2p-gpu.json" \
        >"$OUT/p2p.log" 2>&1
    echo "p2p rc=$?"; grep -v "NIXL INFO" "$OUT/p2p.log" | tail -n 5
fi

# Key hashing plus lookup (issue 12: under 1 ms for 128K tokens), on this host's CPU cores.
if want lookup; then
    timeout 300 $PY benchmarks/lookup.py --machine h200 --profile --json "$OUT/lookup-gpu.json" >"$OUT/lookup.log" 2>&1
    echo "lookup rc=$?"; head -n 17 "$OUT/lookup.log"
fi
