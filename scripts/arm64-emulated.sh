#!/usr/bin/env bash
# The cpu and arm device conformance and a subset of the core tests on aarch64: emulated with
# qemu-user on any other host, native on an arm64 one. Not part of `make test` or CI (an emulated
# run takes about half an hour). `make arm64-emulated` runs it.
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
# Knobs: ARM64_CACHE, ARM64_QEMU_CPU (default neoverse-v1: Graviton3 class, SVE 256 bit, BF16),
# QEMU (a qemu-aarch64 binary), ARM64_TORCH_SPEC (default torch==2.8.0, the newest aarch64
# torch on PyPI that is a CPU build; from 2.9 the aarch64 wheels on PyPI are CUDA builds that
# pull about 3 GB of nvidia-* wheels), ARM64_CORE_TESTS (the core test files, below),
# ARM64_DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
REPORT=${1:-docs/conformance/arm64-emulated.json}
CACHE=${ARM64_CACHE:-/tmp/lmcache-arm64}
QEMU_CPU_MODEL=${ARM64_QEMU_CPU:-neoverse-v1}
TORCH_SPEC=${ARM64_TORCH_SPEC:-torch==2.8.0}
MIRROR=${ARM64_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Core tests that need no servers and finish in about 30 minutes under emulation. Left out:
# test_disk_shared (several processes hammering one folder: minutes natively), test_demo and
# test_transformers (a model), test_tier_urls and test_config_coercion (URL parsing, no
# architecture in them), test_config (the documentation of keys), test_plugins and
# test_plugin_failures (plugin discovery, many subprocesses), tests/integrations (vLLM, SGLang).
CORE_TESTS=${ARM64_CORE_TESTS:-tests/test_keys.py tests/test_chunk_layout.py tests/test_chunk_integrity.py
    tests/test_identity.py tests/test_engine.py tests/test_engine_bounds.py tests/test_pool_reserve.py
    tests/test_tiers.py tests/test_tier_faults.py tests/test_builtin_stores.py tests/test_chunk_fuzz.py
    devices/arm/tests}
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
            log "$q ($("$q" --version | head -1)) fails the probe: the guest sees the host's /proc/cpuinfo"
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
log "pip download $TORCH_SPEC (aarch64, cp$PYVER; a no-op once it is in $CACHE/wheels)"
python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    --abi "cp$PYVER" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    -d "$CACHE/wheels" "$TORCH_SPEC"
COMMIT=$(git rev-parse HEAD)
SRC=$CACHE/src-$COMMIT
if [ ! -d "$SRC" ]; then
    mkdir -p "$SRC" && git archive HEAD | tar -x -C "$SRC"
fi
rm -f "$CACHE"/dist/*.whl
log "building our wheels from $COMMIT"
python3 -m pip wheel -q --no-deps -w "$CACHE/dist" "$SRC" "$SRC/kernels" "$SRC/devices/arm" "$SRC/conformance"
whl() { ls "$CACHE"/dist/"$1"-*.whl; }
log "pip install into $VENV (emulated: minutes)"
PIP_CACHE_DIR=$CACHE/pip-cache "$PY" -m pip install -q --disable-pip-version-check \
    --find-links "$CACHE/wheels" "$TORCH_SPEC" \
    "$(whl lmcache_core)[test]" "$(whl lmcache_kernels)" "$(whl lmcache_device_arm)" "$(whl lmcache_conformance)"

# ---------------------------------------------------------------- runs
LM=$VENV/bin/lmcache
{ "$LM" plugins; "$LM" devices; } > "$OUT/plugins.txt" 2>&1 || true
log "lmcache conformance --device cpu --device arm"
set +e
( cd "$CACHE/tmp" && time "$LM" conformance --device cpu --device arm --report "$OUT/conformance.json" ) \
    > "$OUT/conformance.log" 2>&1
CONF_RC=$?
log "conformance exit $CONF_RC; core tests: $(echo $CORE_TESTS | wc -w) files"
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
"""The conformance report, plus how it ran (emulation) and the core tests' results."""
import json, platform, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, report, mode, qemu, commit, conf_rc, core_rc, torch_spec, *core_files = sys.argv[1:]
out = Path(out)
data = json.loads((out / "conformance.json").read_text())
host = platform.uname()
data["emulation"] = {
    "mode": mode, "qemu": qemu, "host": f"{host.system} {host.release} {host.machine}",
    "host_cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
    "guest": "Debian bookworm arm64 root, python from its python3 package" if mode == "emulated" else "native",
    "torch_spec": torch_spec, "commit": commit, "script": "scripts/arm64-emulated.sh",
    "conformance_exit_status": int(conf_rc),
    "not_shown": ["timing: every figure and duration here is the emulator's, not an Arm core's",
                  "NUMA: the guest sees the host's /sys node topology, so buffer placement is not exercised",
                  "SVE/NEON speed: instructions are emulated; only their results are checked"],
}
m = re.search(r"real\s+(\S+)", (out / "conformance.log").read_text())
data["emulation"]["conformance_wall"] = m.group(1) if m else None
tree = ET.parse(out / "core.xml").getroot()
suite = tree if tree.tag == "testsuite" else tree.find("testsuite")
results = []
for case in suite.iter("testcase"):
    outcome, reason = "passed", ""
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            outcome = {"failure": "failed"}.get(tag, tag)
            reason = (el.get("message") or "")[:300]
    results.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "reason": reason, "duration_s": round(float(case.get("time") or 0), 3)})
summary = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
summary["total"] = len(results)
m = re.search(r"real\s+(\S+)", (out / "core.log").read_text())
data["core_tests"] = {"command": ["python", "-m", "pytest", *core_files], "files": core_files,
                      "exit_status": int(core_rc), "wall": m.group(1) if m else None,
                      "summary": summary, "results": results}
Path(report).write_text(json.dumps(data, indent=1) + "\n")
print(f"{report}: conformance {data['summary']} (exit {conf_rc}); core tests {summary} (exit {core_rc})")
EOF
tail -n 12 "$OUT/conformance.log" | grep -v '^$' >&2 || true
tail -n 3 "$OUT/core.log" >&2 || true
[ "$CONF_RC" = 0 ] && [ "$CORE_RC" = 0 ]
