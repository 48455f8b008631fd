"""The scheduler half of the vLLM connector, free of vLLM imports (duck-typed requests).

It answers "how many more prompt tokens can lmcache-core supply?" from a
lookup in the tiers the workers write to, turns vLLM's block allocations into
load specs, follows each request's prefill to store every chunk once it is
computed, and decides which finished requests keep their blocks until their
stores are done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ._vllm_common import ConnectorOptions, LoadSpec, SaveSpec, StepPlan

if TYPE_CHECKING:
    from ..engine import CacheEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Hit:
    """A lookup answered by ``get_num_new_matched_tokens`` (kept until the allocation)."""

    local: int
    hit: int
    by_tier: dict[str, int]
    is_async: bool


@dataclass
class _Tracker:
    """What the scheduler half knows of a running request: its prompt, blocks, stored prefix."""

    req_id: str
    prompt: list[int]
    block_ids: list[int]
    saved: int = 0
    hit_tokens: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)


class VLLMScheduler:
    def __init__(self, engine: "CacheEngine", block_size: int, options: ConnectorOptions, *,
                 can_load: bool = True, can_save: bool = True) -> None:
        self.engine = engine
        self.block_size = block_size
        self.chunk_size = engine.config.chunk_size
        self.save_partial = engine.config.save_partial
        self.options = options
        self.can_load = can_load
        self.can_save = can_save
        fast = engine.tiers.tiers[0]
        self._fast_tier = fast.name if fast.fast else None
        self._hits: dict[str, _Hit] = {}
        self._loads: dict[str, LoadSpec] = {}
        self._sources: dict[str, dict[str, int]] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._save_issued: set[str] = set()
        self.stats = {"lookup_requests": 0, "lookup_tokens": 0, "hit_tokens": 0}

    # -- lookups -----------------------------------------------------------------------------
    def _is_async(self, by_tier: dict[str, int]) -> bool:
        mode = self.options.async_load
        if mode != "auto":
            return mode == "true"
        return any(tier != self._fast_tier for tier in by_tier)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """External tokens beyond ``num_computed_tokens`` and whether they load asynchronously.

        Looks up the prompt only (generated tokens are not stored); keeps at
        least one token for vLLM to compute. Repeatable: it changes nothing but
        the remembered answer.
        """
        prompt = request.prompt_token_ids
        if not self.can_load or not prompt:
            return 0, False
        lookup = self.engine.lookup(prompt)
        hit = min(lookup.hit_tokens, int(request.num_tokens) - 1)
        ext = hit - num_computed_tokens
        if ext <= 0:
            self._hits.pop(request.request_id, None)
            return 0, False
        by_tier = lookup.by_tier
        is_async = self._is_async(by_tier)
        self._hits[request.request_id] = _Hit(num_computed_tokens, hit, by_tier, is_async)
        return ext, is_async

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Blocks exist now: plan the load of ``[local, local + num_external_tokens)``."""
        hit = self._hits.pop(request.request_id, None)
        if num_external_tokens <= 0:
            return
        if hit is None:
            logger.warning("lmcache-core: %d external tokens allocated for request %s without a lookup; "
                           "not loading", num_external_tokens, request.request_id)
            return
        end = hit.local + num_external_tokens
        self._loads[request.request_id] = LoadSpec(
            request.request_id, tuple(request.prompt_token_ids), tuple(block_ids), hit.local, end,
            hit.is_async)
        self._sources[request.request_id] = hit.by_tier
        self.stats["lookup_requests"] += 1
        self.stats["lookup_tokens"] += len(request.prompt_token_ids)
        self.stats["hit_tokens"] += num_external_tokens
        logger.info("lmcache-core: request %s: %d of %d prompt tokens from the cache (%s, %s load)",
                    request.request_id, num_external_tokens, len(request.prompt_token_ids), hit.by_tier,
                    "async" if hit.is_async else "sync")

    def hit_sources(self, request_id: str) -> dict[str, int]:
        """Tokens of the last planned load by tier name (what vLLM's hit-source metric splits)."""
        return self._sources.pop(request_id, {})

    # -- the step plan ----------------------------------------------------------------------------
    def _maybe_save(self, tr: _Tracker, computed_end: int, out: list[SaveSpec]) -> None:
        """Store the prompt's chunks that are computed by the end of this step."""
        if not self.can_save:
            return
        n = len(tr.prompt)
        if tr.saved >= n:
            return
        end = min(computed_end, n)
        if end < n or not self.save_partial:
            end = end // self.chunk_size * self.chunk_size
        if end <= tr.saved or end <= 0:
            return
        if len(tr.block_ids) * self.block_size < end:
            logger.warning("lmcache-core: request %s has %d blocks for %d tokens; not storing",
                           tr.req_id, len(tr.block_ids), end)
            return
        out.append(SaveSpec(tr.req_id, tuple(tr.prompt[:end]), tuple(tr.block_ids)))
        tr.saved = end
        self._save_issued.add(tr.req_id)

    def build_plan(self, scheduler_output: Any, null_block: int = 0) -> StepPlan:
        """This step's loads and stores (never modifies ``scheduler_output``)."""
        saves: list[SaveSpec] = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            tr = _Tracker(new.req_id, prompt, list(new.block_ids[0]) if new.block_ids else [])
            self._trackers[new.req_id] = tr
            self._maybe_save(tr, new.num_computed_tokens + scheduled.get(new.req_id, 0), saves)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, req_id in enumerate(cached.req_ids):
            tr = self._trackers.get(req_id)
            if tr is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                tr.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tr.block_ids.extend(new_ids[0])
            self._maybe_save(tr, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), saves)
        loads = tuple(self._loads.values())
        self._loads.clear()
        preempted = tuple(getattr(scheduler_output, "preempted_req_ids", None) or ())
        return StepPlan(loads, tuple(saves), preempted, null_block)

    def request_finished(self, request_id: str) -> bool:
        """Forget the request; True when a store was issued (vLLM then keeps its blocks until
        the worker reports the request in ``get_finished``)."""
        self._trackers.pop(request_id, None)
        self._hits.pop(request_id, None)
        self._sources.pop(request_id, None)
        if request_id in self._save_issued:
            self._save_issued.discard(request_id)
            return True
        return False

    def take_stats(self) -> dict[str, int]:
        out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def pending(self) -> Iterable[str]:
        return list(self._trackers)
