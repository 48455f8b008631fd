#!/usr/bin/env bash
# The cpu and arm device conformance and a subset of the core tests on aarch64: emulated with
# qemu-user on any other host, native on an arm64 one. Not part of `make test` or CI (an emulated
# run took 21 minutes on a busy 2-core host, downloads cached). `make arm64-emulated` runs it.
#
#   scripts/arm64-emulated.sh [REPORT]      REPORT defaults to docs/conformance/arm64-emulated.json
#
# Emulated, it builds under ARM64_CACHE (default /tmp/lmcache-arm64; kept between runs):
#   rootfs/   a Debian bookworm arm64 root: debootstrap --foreign (first stage only; the
#             second stage would exec arm64 binaries, which needs binfmt_misc), then every
#             downloaded .deb (python3, python3-venv, libstdc++6 and their dependencies)
#             unpacked with dpkg-deb. Needs root (debootstrap) and a Debian mirror.
#   qemu/     qemu-user from Debian trixie (10.x), unpacked with dpkg-deb, unless QEMU names a
#             qemu-aarch64 that passes the probe below. bookworm's qemu-user-static 7.2 does not:
#             it shows the guest the host's /proc/cpuinfo (no "CPU implementer"), so the arm
#             device reports itself unavailable.
#   rootfs/opt/lmcache-venv/   the venv the tests run in. It is always named by its host path,
#             which qemu's -L prefix falls back to, so the guest and the host see one path, and
#             bin/python is a host shell script that execs qemu: a guest process that starts
#             sys.executable (the suite's cross-process key test, ensurepip, console scripts)
#             works without binfmt_misc. Other arm64 programs the guest execs (/bin/sh) need it.
#   wheels/   the aarch64 torch wheel (pip download --platform, --no-deps: pip evaluates
#             dependency markers for the host, not the target), our distributions as wheels
#             built from `git archive HEAD`, pip's cache.
#
# Knobs: ARM64_CACHE; ARM64_QEMU_CPU (default neoverse-v1: Graviton3 class, SVE 256 bit, BF16;
# torch dispatches its SVE256 kernels there); ARM64_EXTRA_CPUS (default neoverse-n1: Graviton2 /
# Altra class, no SVE, torch's NEON kernels; the arm device's suite runs again under each);
# QEMU (a qemu-aarch64 binary); ARM64_TORCH_SPEC (default torch==2.8.0, the newest aarch64 torch
# on PyPI that is a CPU build: from 2.9 the aarch64 wheels on PyPI are CUDA builds that pull
# about 3 GB of nvidia-* wheels); ARM64_CORE_TESTS (test paths, default below);
# ARM64_DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-docs/conformance/arm64-emulated.json}
CACHE=${ARM64_CACHE:-/tmp/lmcache-arm64}
QEMU_CPU_MODEL=${ARM64_QEMU_CPU:-neoverse-v1}
TORCH_SPEC=${ARM64_TORCH_SPEC:-torch==2.8.0}
MIRROR=${ARM64_DEBIAN_MIRROR:-http://deb.debian.org/debian}
EXTRA_CPUS=${ARM64_EXTRA_CPUS-neoverse-n1}
OUT=$CACHE/out
mkdir -p "$CACHE/wheels" "$CACHE/dist" "$CACHE/debs" "$CACHE/tmp" "$OUT"
log() { printf '[arm64 %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
HOST_ARCH=$(uname -m)

# ---------------------------------------------------------------- the arm64 python
if [ "$HOST_ARCH" = aarch64 ] || [ "$HOST_ARCH" = arm64 ]; then
    MODE=native
    VENV=$CACHE/venv
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    QEMU_DESC=none
else
    MODE=emulated
    ROOT=$CACHE/rootfs
    VENV=$ROOT/opt/lmcache-venv

    if [ ! -x "$ROOT/usr/bin/python3" ]; then
        [ "$(id -u)" = 0 ] || { echo "building the arm64 root needs root (debootstrap); run as root or" \
            "put a Debian arm64 root with python3 at $ROOT" >&2; exit 2; }
        DEBOOTSTRAP=$(command -v debootstrap || true)
        if [ -z "$DEBOOTSTRAP" ]; then
            log "debootstrap not installed: unpacking the Debian package into $CACHE/debootstrap"
            (cd "$CACHE/debs" && apt-get download debootstrap >/dev/null)
            dpkg-deb -x "$(ls "$CACHE"/debs/debootstrap_*.deb | tail -1)" "$CACHE/debootstrap"
            export DEBOOTSTRAP_DIR=$CACHE/debootstrap/usr/share/debootstrap
            DEBOOTSTRAP=$CACHE/debootstrap/usr/sbin/debootstrap
        fi
        log "debootstrap --foreign --arch arm64 bookworm -> $ROOT"
        rm -rf "$ROOT"
        "$DEBOOTSTRAP" --foreign --arch arm64 --variant=minbase --include=python3,python3-venv,libstdc++6 \
            bookworm "$ROOT" "$MIRROR" > "$CACHE/debootstrap.log"
        # The first stage unpacked the required packages; the included ones are only downloaded.
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
            dpkg-deb --fsys-tarfile "$deb" | tar --keep-directory-symlink -xf - -C "$ROOT"
        done
        # /tmp is the host's: pytest's folders and the caches live there, not in the root.
        rmdir "$ROOT/tmp" 2>/dev/null || true
    fi
    GUEST_PY=$(cd "$ROOT/usr/bin" && ls python3.[0-9]* | grep -E '^python3\.[0-9]+$' | sort -V | tail -1)

    # qemu-aarch64 that shows the guest an aarch64 /proc/cpuinfo (QEMU >= 8.2 emulates it).
    probe() {
        QEMU_CPU=$QEMU_CPU_MODEL "$1" -L "$ROOT" "$ROOT/usr/bin/$GUEST_PY" -c \
            "import sys; sys.exit(0 if 'CPU implementer' in open('/proc/cpuinfo').read() else 1)" 2>/dev/null
    }
    QEMU_BIN=""
    for q in ${QEMU:-} "$(command -v qemu-aarch64-static || true)" "$(command -v qemu-aarch64 || true)" \
             "$CACHE/qemu/usr/bin/qemu-aarch64"; do
        if [ -n "$q" ] && [ -x "$q" ]; then
            if probe "$q"; then QEMU_BIN=$q; break; fi
            log "$q ($("$q" --version | head -1)) fails the probe: no aarch64 /proc/cpuinfo under -cpu $QEMU_CPU_MODEL (7.2 shows the host's)"
        fi
    done
    if [ -z "$QEMU_BIN" ]; then
        log "fetching qemu-user from Debian trixie into $CACHE/qemu"
        A=$CACHE/apt-trixie
        mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/etc/sources.list.d" "$A/etc/preferences.d"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" \
            > "$A/etc/sources.list"
        APT=(-o "Dir::Etc=$A/etc" -o "Dir::Etc::SourceList=$A/etc/sources.list"
             -o "Dir::Etc::SourceParts=$A/etc/sources.list.d" -o "Dir::Etc::PreferencesParts=$A/etc/preferences.d"
             -o "Dir::State::Lists=$A/lists" -o "Dir::Cache=$A/cache" -o Debug::NoLocking=1
             -o APT::Sandbox::User="$(id -un)")
        apt-get "${APT[@]}" update >/dev/null
        (cd "$CACHE/debs" && apt-get "${APT[@]}" download qemu-user >/dev/null)
        dpkg-deb -x "$(ls "$CACHE"/debs/qemu-user_*.deb | tail -1)" "$CACHE/qemu"
        QEMU_BIN=$CACHE/qemu/usr/bin/qemu-aarch64
        probe "$QEMU_BIN" || { echo "$QEMU_BIN fails the /proc/cpuinfo probe" >&2; exit 1; }
    fi
    QEMU_DESC="$("$QEMU_BIN" --version | head -1) -cpu $QEMU_CPU_MODEL"
    log "qemu: $QEMU_DESC ($QEMU_BIN)"

    if [ ! -f "$VENV/pyvenv.cfg" ]; then
        mkdir -p "$VENV/bin" "$VENV/lib/$GUEST_PY/site-packages"
        printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\n' \
            "$(QEMU_CPU=$QEMU_CPU_MODEL "$QEMU_BIN" -L "$ROOT" "$ROOT/usr/bin/$GUEST_PY" -c \
               'import platform; print(platform.python_version())')" > "$VENV/pyvenv.cfg"
    fi
    cat > "$VENV/bin/python" <<EOF
#!/bin/sh
# aarch64 $GUEST_PY under qemu-user. A host script, so that a guest process can exec it without binfmt_misc.
TMPDIR=\${TMPDIR:-$CACHE/tmp} QEMU_CPU=\${QEMU_CPU:-$QEMU_CPU_MODEL} exec "$QEMU_BIN" -L "$ROOT" -0 "\$0" "$ROOT/usr/bin/$GUEST_PY" "\$@"
EOF
    chmod +x "$VENV/bin/python"
    ln -sf python "$VENV/bin/python3"
    ln -sf python "$VENV/bin/$GUEST_PY"
    [ -x "$VENV/bin/pip" ] || "$VENV/bin/python" -m ensurepip --default-pip >/dev/null
fi
PY=$VENV/bin/python
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
log "mode $MODE, python $("$PY" -c 'import platform; print(platform.python_version(), platform.machine())')"

# ---------------------------------------------------------------- wheels and install
# This machine's pip config names local wheel folders that may be absent: drop that noise.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
log "pip download $TORCH_SPEC (aarch64, cp$PYVER; a no-op once it is in $CACHE/wheels)"
pip_quiet python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYVER" --abi "cp$PYVER" --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 -d "$CACHE/wheels" "$TORCH_SPEC"
COMMIT=$(git rev-parse HEAD)
SRC=$CACHE/src-$COMMIT
[ -d "$SRC" ] || { mkdir -p "$SRC.part" && git archive HEAD | tar -x -C "$SRC.part" && mv "$SRC.part" "$SRC"; }
rm -f "$CACHE"/dist/*.whl
log "building our wheels from $COMMIT (git archive HEAD: uncommitted changes are not in the run)"
pip_quiet python3 -m pip wheel -q --no-deps -w "$CACHE/dist" "$SRC" "$SRC/kernels" "$SRC/devices/arm" \
    "$SRC/conformance"
whl() { ls "$CACHE"/dist/"$1"-*.whl; }
log "pip install into $VENV (emulated: a few minutes the first time)"
# Ours are always 0.1.0: uninstall them so that a new commit's wheels replace them.
pip_quiet "$PY" -m pip uninstall -q -y lmcache-core lmcache-kernels lmcache-device-arm lmcache-conformance \
    2>/dev/null || true
# The test tools by name, not lmcache-core[test]: that extra pulls lmcache-core[codecs], whose
# constriction (cachegen's entropy coder) has no linux-aarch64 wheel and no sdist on PyPI, so
# the extra cannot install on aarch64; zstandard and cryptography (the other codecs) do.
PIP_CACHE_DIR=$CACHE/pip-cache pip_quiet "$PY" -m pip install -q --disable-pip-version-check \
    --find-links "$CACHE/wheels" "$TORCH_SPEC" pytest pytest-timeout hypothesis zstandard cryptography \
    "$(whl lmcache_core)" "$(whl lmcache_kernels)" "$(whl lmcache_device_arm)" "$(whl lmcache_conformance)"

# The core tests of the data path and its edges, which need no server, model or package
# index, the arm device's own tests, and the kernels' tests (the torch reference; the Triton
# ones skip: no triton here). Their tests that need redis, valkey or S3 servers skip (no server
# binaries for aarch64 here). Left out: test_demo, test_transformers, test_blend (a model),
# test_install (builds and installs a wheelhouse), test_daemon*, test_bench* (servers,
# minutes natively), tests/integrations (vLLM, SGLang). About 9 minutes emulated on 2 busy x86 cores.
CORE_DEFAULT="tests/test_keys.py tests/test_chunk_layout.py tests/test_chunk_integrity.py tests/test_chunk_fuzz.py
    tests/test_identity.py tests/test_engine.py tests/test_engine_bounds.py tests/test_pool_reserve.py
    tests/test_tiers.py tests/test_tier_faults.py tests/test_builtin_stores.py tests/test_disk_shared.py
    tests/test_codecs.py tests/test_codecs_conformance.py tests/test_policy.py tests/test_config.py
    tests/test_config_coercion.py tests/test_tier_urls.py tests/test_plugins.py tests/test_plugin_failures.py
    tests/test_hookspecs_documented.py devices/arm/tests kernels/tests"
CORE_TESTS=""
for t in ${ARM64_CORE_TESTS:-$CORE_DEFAULT}; do
    if [ -e "$SRC/$t" ]; then CORE_TESTS+="$t "; else log "core test $t is not in $COMMIT: left out"; fi
done

# ---------------------------------------------------------------- runs
LM=$VENV/bin/lmcache
{ "$LM" plugins; "$LM" devices; } > "$OUT/plugins.txt" 2>&1 || true
"$PY" - > "$OUT/guest.json" <<'EOF'
import ctypes.util, json, platform, resource
import torch
from lmcache_device_arm.device import detect_arm
from lmcache_device_arm import numa
info = open("/proc/cpuinfo").read()
det = detect_arm()
print(json.dumps({
    "machine": platform.machine(), "python": platform.python_version(), "libc": "-".join(platform.libc_ver()),
    "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "page_size": resource.getpagesize(), "cpuinfo_implementer": "CPU implementer" in info,
    "arm_detect": {"available": det.available, "reason": det.reason},
    "numa_nodes": len(numa.nodes()), "find_library_numa": ctypes.util.find_library("numa"),
}))
EOF
log "guest: $(cat "$OUT/guest.json")"
set +e
log "lmcache conformance --device cpu --device arm"
( cd "$CACHE/tmp" && time "$LM" conformance --device cpu --device arm --report "$OUT/conformance.json" ) \
    > "$OUT/conformance.log" 2>&1
CONF_RC=$?
log "conformance exit $CONF_RC"
EXTRA_RC=0
rm -f "$OUT"/conformance-cpu-*.json
if [ "$MODE" = emulated ]; then
    for cpu in $EXTRA_CPUS; do
        log "lmcache conformance --device arm under -cpu $cpu"
        ( cd "$CACHE/tmp" && QEMU_CPU=$cpu "$LM" conformance --device arm \
            --report "$OUT/conformance-cpu-$cpu.json" ) > "$OUT/conformance-cpu-$cpu.log" 2>&1 || EXTRA_RC=1
        QEMU_CPU=$cpu "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' \
            > "$OUT/capability-$cpu.txt"
    done
fi
log "core tests: $(echo $CORE_TESTS | wc -w) paths"
# The test files come from the archived checkout, the code they import from the installed
# wheels (the pytest script, unlike `python -m pytest`, does not put the checkout on sys.path).
( cd "$SRC" && time "$VENV/bin/pytest" -q -ra -p no:cacheprovider --junitxml="$OUT/core.xml" $CORE_TESTS ) \
    > "$OUT/core.log" 2>&1
CORE_RC=$?
set -e
log "core tests exit $CORE_RC"

# ---------------------------------------------------------------- the report
mkdir -p "$(dirname "$REPORT")"
python3 - "$OUT" "$REPORT" "$MODE" "$QEMU_DESC" "$COMMIT" "$CONF_RC" "$CORE_RC" "$TORCH_SPEC" $CORE_TESTS <<'EOF'
"""The conformance report as written, plus how it ran ("emulation") and the core tests ("core_tests")."""
import json, platform, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, report, mode, qemu, commit, conf_rc, core_rc, torch_spec, *core_paths = sys.argv[1:]
out = Path(out)


def wall(log: Path) -> str | None:
    m = re.search(r"^real\s+(\S+)", log.read_text(), re.M) if log.exists() else None
    return m.group(1) if m else None


data = json.loads((out / "conformance.json").read_text())
host = platform.uname()
host_cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
others = []
for f in sorted(out.glob("conformance-cpu-*.json")):
    r = json.loads(f.read_text())
    cpu = f.stem.removeprefix("conformance-cpu-")
    cap = out / f"capability-{cpu}.txt"
    others.append({"qemu_cpu": cpu, "torch_cpu_capability": cap.read_text().strip() if cap.exists() else None,
                   "detection": next((p.get("details", {}).get("detection", {}).get("reason")
                                      for p in r["plugins"] if p["name"] == "arm"), None),
                   "command": r["command"], "summary": r["summary"], "exit_status": r["exit_status"],
                   "not_passed": [x for x in r["results"] if x["outcome"] not in ("passed", "skipped")]})
data["emulation"] = {
    "mode": mode, "qemu": qemu, "host": f"{host.system} {host.release} {host.machine}", "host_cpu": host_cpu,
    "guest_root": "Debian bookworm arm64 (debootstrap --foreign + dpkg-deb)" if mode == "emulated" else "native",
    "guest": json.loads((out / "guest.json").read_text()),
    "torch_spec": torch_spec, "commit": commit, "script": "scripts/arm64-emulated.sh",
    "conformance_wall": wall(out / "conformance.log"),
    "other_cpu_models": others,
    "not_shown": ["speed: every duration and figure is the emulator's, not an Arm core's",
                  "NUMA placement: the guest sees the host's /sys (one node here)",
                  "Arm's weaker memory ordering: the x86 host orders memory more strongly",
                  "64 KiB pages: the guest has the host's page size"] if mode == "emulated" else [],
}
root = ET.parse(out / "core.xml").getroot()
results = []
for case in root.iter("testcase"):
    outcome, reason = "passed", ""
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            outcome, reason = {"failure": "failed"}.get(tag, tag), (el.get("message") or "")[:400]
    results.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "reason": reason, "duration_s": round(float(case.get("time") or 0), 3)})
summary = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
summary["total"] = len(results)
data["core_tests"] = {"command": ["pytest", "-q", *core_paths], "exit_status": int(core_rc),
                      "wall": wall(out / "core.log"), "summary": summary, "results": results}
Path(report).write_text(json.dumps(data, indent=1) + "\n")
print(f"{report}: conformance {data['summary']} (exit {conf_rc}); "
      + "".join(f"-cpu {o['qemu_cpu']}: {o['summary']} (exit {o['exit_status']}); " for o in others)
      + f"core tests {summary} (exit {core_rc})")
EOF
grep -E '^(│|[0-9]+ passed|FAILED)' "$OUT/conformance.log" >&2 || true
grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/core.log" | tail -n 12 >&2 || true
[ "$CONF_RC" = 0 ] && [ "$EXTRA_RC" = 0 ] && [ "$CORE_RC" = 0 ]
