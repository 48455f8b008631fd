"""The SGLang HiCache backend against the real sglang 0.5.23 classes (CPU host pools).

The driver runs in an interpreter that has sglang (installed ``--no-deps`` by
scripts/vllm-env.sh, since sglang's full dependency set needs CUDA): SGLang's
own StorageBackendFactory loads the backend the ``dynamic`` way, SGLang's
MHA and MLA host pools hold the KV in each layout, page keys come from
SGLang's hash chain. What is not run here: a full ``sglang.launch_server``
(its kernels need a GPU).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(vh: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python, why = vh.sglang_python()
    if python is None:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("sglang")
    out = work / "out.json"
    proc = subprocess.run([python, str(HERE / "sglang_driver.py"), str(out), str(work)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_real_sglang_version(results: dict[str, Any]) -> None:
    assert results["sglang"] == "0.5.23"
    assert not results["errors"], results["errors"]


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
def test_zero_copy_round_trip_between_two_backends(results: dict[str, Any], layout: str, mla: bool) -> None:
    found = [s for s in results["scenarios"] if s["layout"] == layout and s["mla"] == mla]
    assert found, f"scenario {layout}/{'mla' if mla else 'mha'} did not run: {results['errors']}"
    s = found[0]
    assert s["backend_class"] == "LMCacheCoreHiCacheStorage"  # loaded by SGLang's dynamic factory
    assert s["set"] == [True] * s["pages"] and s["set_again"] == [True] * s["pages"]
    assert s["exists"] == s["pages"] and s["exists_other"] == 0
    assert s["get"] == [True] * s["pages"]
    assert s["bit_exact"], "pages read back differ from the pages written"
    assert s["others_untouched"], "batch_get_v1 wrote outside the given host indices"


def test_corrupt_page_is_a_miss_and_is_deleted(results: dict[str, Any]) -> None:
    for s in results["scenarios"]:
        assert s["corrupt_file_found"]
        assert s["get_after_corruption"] == [True, True, False, True, True]
        assert s["exists_after_corruption"] == 2
