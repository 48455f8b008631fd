"""Fixtures of the engine integration tests: the vLLM interpreter, the tiny model, the harness."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_lmcache_it_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vh() -> ModuleType:
    """The vLLM test harness module (driver runner, prompts)."""
    return _load("vllm_harness")


@pytest.fixture(scope="session")
def vllm_python(vh: ModuleType) -> str:
    python, why = vh.vllm_python()
    if python is None:
        pytest.skip(why)
    return python


@pytest.fixture(scope="session")
def tiny_model(vh: ModuleType, vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("tiny-llama")
    vh.make_model(vllm_python, path)
    yield path
