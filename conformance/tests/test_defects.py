"""A suite that cannot fail proves nothing: each contract catches its deliberate defect.

The dummy device and dummy storage distributions (conformance/testing_plugins/) are
installed like any vendor plugin and found through their entry points; an
environment variable switches one defect on. Each case runs ``lmcache
conformance`` in a subprocess over the contract the defect breaks and asserts
that exactly the expected test fails, for the expected reason; the clean runs
assert the same selection passes, so a failure is the defect's doing.
"""

from __future__ import annotations

from typing import Any

import pytest

DEVICE_CASES = [
    # defect, CLI selection, the test that must fail, a phrase its message must hold
    ("gather-shift", ["--contract", "chunk", "-k", "test_gather and vllm_flash and float16"],
     "test_gather[", "differs from the ground truth"),
    ("scatter-spill", ["--contract", "chunk", "-k", "test_scatter and flashinfer and bfloat16"],
     "test_scatter[", "outside the request changed"),
    ("gather-shift", ["--contract", "chunk", "-k", "test_coded and vllm_flash and float16"],
     "test_coded_gather_and_scatter[", "differ from the host codec's encoding"),
    ("scatter-spill", ["--contract", "chunk", "-k", "test_coded and flashinfer and bfloat16"],
     "test_coded_gather_and_scatter[", "wrote outside its tokens' slots"),
    ("early-release", ["--contract", "pipelining", "-k", "before_release"],
     "test_layers_in_order_and_complete_before_release", "released to compute before its load completed"),
    ("reorder", ["--contract", "pipelining", "-k", "complete_in_layer_order"],
     "test_loads_complete_in_layer_order", "completed before layer"),
    ("no-overlap", ["--contract", "pipelining", "-k", "test_overlap"],
     "test_overlap", "declares async_copy but hid"),
]

STORAGE_CASES = [
    ("keep-view", ["--contract", "zero-copy"], "test_fanout", "kept a view"),
    ("mutate", ["--contract", "zero-copy"], "test_fanout", "changed the image"),
    ("leak", ["--contract", "zero-copy"], "test_fanout", "still live"),
    ("pool-copy", ["--contract", "zero-copy"], "test_fanout", "expected one per chunk"),
    ("no-verify", ["--contract", "chunk", "-k", "corrupted"], "test_corrupted_payload_is_miss", "past a corrupt chunk"),
    ("lose-writes", ["--contract", "storage", "-k", "test_batches"], "test_batches", "missing"),
]


def _reason(run: Any, test_part: str) -> str:
    return " | ".join(r["reason"] for r in run.report["results"]
                      if test_part in r["id"] and r["outcome"] in ("failed", "error"))


@pytest.mark.parametrize("defect,selection,test_part,phrase", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_device_contract_catches_defect(conformance_cli: Any, defect: str, selection: list[str], test_part: str,
                                        phrase: str) -> None:
    run = conformance_cli(["--device", "dummy", *selection], env={"LMCACHE_DUMMY_DEVICE_DEFECT": defect})
    assert run.returncode == 1, f"a {defect} device passed: {run.stdout[-3000:]}{run.stderr[-2000:]}"
    failed = run.failed(plugin="dummy")
    assert any(test_part in f for f in failed), f"{test_part} did not fail; failed: {failed}"
    assert phrase in _reason(run, test_part), _reason(run, test_part)


def test_clean_dummy_device_passes_what_the_defects_fail(conformance_cli: Any) -> None:
    """The union of the defect selections passes on the clean device: the failures above are the defects'."""
    keyword = " or ".join(f"({sel[sel.index('-k') + 1]})" for _, sel, _, _ in DEVICE_CASES)
    run = conformance_cli(["--device", "dummy", "--contract", "chunk", "--contract", "pipelining", "-k", keyword])
    assert run.returncode == 0, f"the clean device fails: {run.failed()}"
    passed = {i for i, o in run.outcomes(plugin="dummy").items() if o == "passed"}
    for _, _, test_part, _ in DEVICE_CASES:
        assert any(test_part in i for i in passed), f"{test_part} did not pass on the clean device"


@pytest.mark.parametrize("defect,selection,test_part,phrase", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_storage_contract_catches_defect(conformance_cli: Any, defect: str, selection: list[str], test_part: str,
                                         phrase: str) -> None:
    run = conformance_cli(["--storage", "dummy://conformance", *selection],
                          env={"LMCACHE_DUMMY_STORAGE_DEFECT": defect})
    assert run.returncode == 1, f"a {defect} store passed: {run.stdout[-3000:]}{run.stderr[-2000:]}"
    failed = run.failed(plugin="dummy")
    assert any(test_part in f for f in failed), f"{test_part} did not fail; failed: {failed}"
    assert phrase in _reason(run, test_part), _reason(run, test_part)


def test_clean_dummy_storage_passes_every_contract(conformance_cli: Any) -> None:
    run = conformance_cli(["--storage", "dummy://conformance"])
    assert run.returncode == 0, run.stdout[-3000:]
    outcomes = run.outcomes(plugin="dummy")
    assert {"storage", "chunk", "zero-copy"} <= {r["contract"] for r in run.report["results"]}
    assert sum(o == "passed" for o in outcomes.values()) >= 25
    # What the dummy store cannot offer is a skip with a reason, never a pass.
    for r in run.report["results"]:
        if r["outcome"] == "skipped":
            assert r["reason"], r["id"]


def test_a_legitimate_private_copy_in_the_device_is_not_flagged(conformance_cli: Any) -> None:
    """``gather-copy`` gathers through a temporary tensor: allowed, so the suite must pass it."""
    run = conformance_cli(["--device", "dummy", "--contract", "zero-copy", "--contract", "chunk", "-k",
                           "fanout or (test_gather and mla)"], env={"LMCACHE_DUMMY_DEVICE_DEFECT": "gather-copy"})
    assert run.returncode == 0, run.failed()
    assert sum(o == "passed" for o in run.outcomes(plugin="dummy").values()) >= 5
