"""The scheduler half of the vLLM connector, free of vLLM imports (duck-typed requests).

It answers "how many more prompt tokens can lmcache-core supply?" from a
lookup in the tiers the workers write to, turns vLLM's block allocations into
load specs, follows each request's prefill to store every chunk once it is
computed, and decides which finished requests keep their blocks until their
stores are done.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ...keys import KeyExtras, MMItem
from .common import LOCAL_SCHEMES, ConnectorOptions, LoadSpec, PresenceMirror, SaveSpec, StepPlan

if TYPE_CHECKING:
    from ...engine import CacheEngine

logger = logging.getLogger(__name__)


def request_extras(request: Any, chunk_size: int) -> KeyExtras | None:
    """What besides the token ids vLLM mixes into a request's block hashes, as :class:`KeyExtras`:
    LoRA adapter (name and path), ``cache_salt``, multimodal items (hash and placeholder range)
    and prompt embeddings (a digest per chunk, with the token/embedding mask of mixed prompts)."""
    lora = getattr(request, "lora_request", None)
    adapter: tuple[str, ...] = ()
    if lora is not None:
        adapter = (str(getattr(lora, "lora_name", "")), str(getattr(lora, "lora_path", "") or ""),
                   str(getattr(lora, "lora_int_id", "")))
    salt = getattr(request, "cache_salt", None) or ""
    items = []
    for feat in getattr(request, "mm_features", None) or ():
        ident = getattr(feat, "identifier", None)
        pos = getattr(feat, "mm_position", None)
        if ident is None or pos is None:
            raise ValueError(f"request {getattr(request, 'request_id', '?')}: a multimodal input without a "
                             "hash or placeholder range cannot be keyed")
        items.append(MMItem(str(ident), int(pos.offset), int(pos.length)))
    embeds = getattr(request, "prompt_embeds", None)
    digests: tuple[bytes, ...] = ()
    n = 0
    if embeds is not None:
        mask = getattr(request, "prompt_is_token_ids", None)
        digests = KeyExtras.embed_digests(embeds, chunk_size)
        if mask is not None:  # mixed prompts: which positions are tokens is part of the input
            mixed = KeyExtras.embed_digests(mask.reshape(-1, 1).to(dtype=embeds.dtype) if hasattr(mask, "to")
                                            else mask, chunk_size)
            digests = tuple(a + b for a, b in zip(digests, mixed))
        n = int(embeds.shape[0])
    extras = KeyExtras(adapter=adapter, cache_salt=str(salt), mm=tuple(items), embeds=digests,
                       embeds_chunk=chunk_size if digests else 0, embeds_tokens=n)
    return extras or None


def prompt_tokens(request: Any) -> list[int]:
    """The prompt's token ids; a prompt given as embeddings only has zeros there (its
    embeddings are keyed through :func:`request_extras`)."""
    ids = getattr(request, "prompt_token_ids", None)
    if ids is not None:
        return list(ids)
    embeds = getattr(request, "prompt_embeds", None)
    return [0] * int(embeds.shape[0]) if embeds is not None else []


_UNKEYABLE: Any = object()  # marks a request whose inputs cannot be keyed (never cached)

# Disaggregated prefill (vLLM's convention, as its P/D proxies use it): the proxy sends the
# prefill instance ``kv_transfer_params = {"do_remote_decode": true}``; that instance answers
# with the params below, which the proxy hands the decode instance with the same prompt.
# Our part says how many prompt tokens the producer stored; the consumer looks them up
# (through its daemon's peers) and waits a bounded time for them to appear.
TRANSFER_KEY = "lmcache"
TRANSFER_VERSION = 1
REMOTE_RETRY_S = 0.02  # between two lookups of a consumer waiting for a producer's chunks


def remote_prefill_tokens(request: Any) -> int | None:
    """Prompt tokens a prefill instance says it stored for this request (its
    ``kv_transfer_params``), or None when the request is not a remote prefill of ours."""
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return None
    ours = params.get(TRANSFER_KEY)
    if not isinstance(ours, dict) or ours.get("v") != TRANSFER_VERSION:
        return None
    tokens = ours.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        return None
    return tokens


@dataclass
class _RemoteWait:
    """A consumer request waiting for a producer's chunks: give up at ``deadline``."""

    deadline: float
    retry: float
    started: float = 0.0
    lookups: int = 1


@dataclass(frozen=True)
class _Hit:
    """A lookup answered by ``get_num_new_matched_tokens`` (kept until the allocation)."""

    local: int
    hit: int
    by_tier: dict[str, int]
    is_async: bool
    extras: KeyExtras | None = None


@dataclass
class _Tracker:
    """What the scheduler half knows of a running request: its prompt, blocks, stored prefix."""

    req_id: str
    prompt: list[int]
    block_ids: list[int]
    extras: KeyExtras | None = None
    saved: int = 0  # where the next store starts (the prompt's length once nothing more will be)
    issued: int = 0  # the prompt tokens whose stores were handed to the workers
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
        daemon = engine.daemon is not None  # the daemon's index is every process's: no mirror, no remote
        if daemon:
            self._fast_tier = "memory"  # a hit in the daemon's memory is a copy out of the shared arena
        self._hits: dict[str, _Hit] = {}
        self._loads: dict[str, LoadSpec] = {}
        self._sources: dict[str, dict[str, int]] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._save_issued: set[str] = set()
        # Per request: its key extras and the lookup's answer (hit tokens, by tier), computed
        # once; remote lookups run here, off the scheduler's step.
        self._extras: dict[str, KeyExtras | None] = {}
        self._lookups: dict[str, "Future[tuple[int, dict[str, int]]] | tuple[int, dict[str, int]]"] = {}
        self._lookup_lock = threading.Lock()
        self._remote_waits: dict[str, _RemoteWait] = {}
        mode = options.async_lookup
        remote = [] if daemon else [t.name for t in engine.tiers.tiers
                                    if not t.fast and not (set(getattr(type(t.store), "schemes", ())) & LOCAL_SCHEMES)]
        self.async_lookup = mode == "true" or (mode == "auto" and bool(remote))
        self._lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="lmcache-vllm-lookup") \
            if self.async_lookup else None
        self.stats = {"lookup_requests": 0, "lookup_tokens": 0, "hit_tokens": 0, "lookup_errors": 0,
                      "remote_prefill_requests": 0, "remote_prefill_short": 0}
        # The workers' memory tiers (other processes under TP/PP or the mp executor).
        self.mirror = PresenceMirror()
        if engine.presence_hint is None and not daemon:
            engine.presence_hint = self.mirror.contains
            if self._fast_tier:
                engine.hint_tier = self._fast_tier

    # -- lookups -----------------------------------------------------------------------------
    def _is_async(self, by_tier: dict[str, int]) -> bool:
        mode = self.options.async_load
        if mode != "auto":
            return mode == "true"
        return any(tier != self._fast_tier for tier in by_tier)

    def extras(self, request: Any) -> KeyExtras | None:
        """The request's key extras, computed once (prompt embeddings are hashed here only).
        Raises ValueError for inputs that cannot be keyed (that request is never cached)."""
        rid = request.request_id
        if rid not in self._extras:
            try:
                self._extras[rid] = request_extras(request, self.chunk_size)
            except Exception:
                logger.exception("lmcache-core: request %s cannot be keyed; not using the cache", rid)
                self._extras[rid] = _UNKEYABLE
        got = self._extras[rid]
        if got is _UNKEYABLE:
            raise ValueError(f"request {rid} cannot be keyed")
        return got  # type: ignore[return-value]

    def _lookup(self, prompt: list[int], extras: KeyExtras | None) -> tuple[int, dict[str, int]]:
        try:
            result = self.engine.lookup(prompt, extras=extras)
        except Exception:  # noqa: BLE001 - a failed lookup is a miss
            logger.exception("lmcache-core: lookup failed; treating it as a miss")
            self.stats["lookup_errors"] += 1
            return 0, {}
        return result.hit_tokens, result.by_tier

    def _answer(self, request: Any, prompt: list[int], extras: KeyExtras | None) -> tuple[int, dict[str, int]] | None:
        """The remembered lookup of this request; None while a remote lookup is under way."""
        rid = request.request_id
        with self._lookup_lock:
            got = self._lookups.get(rid)
            if got is None:
                if self._lookup_pool is None:
                    got = self._lookups[rid] = self._lookup(prompt, extras)
                else:
                    got = self._lookups[rid] = self._lookup_pool.submit(self._lookup, prompt, extras)
            if isinstance(got, Future):
                if not got.done():
                    return None
                got = self._lookups[rid] = got.result()
        return got

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """External tokens beyond ``num_computed_tokens`` and whether they load asynchronously.

        Looks up the prompt only (generated tokens are not stored); keeps at
        least one token for vLLM to compute. The lookup runs once per request
        (remembered until it finishes); with a remote tier it runs off the step
        and the answer is ``None`` (vLLM asks again next step) until it is known.
        Repeatable: it changes nothing but the remembered answer.
        """
        if not self.can_load:
            return 0, False
        prompt = prompt_tokens(request)
        if not prompt:
            return 0, False
        try:
            extras = self.extras(request)
        except Exception:  # noqa: BLE001 - an input we cannot key is never cached
            return 0, False
        answer = self._answer(request, prompt, extras)
        if answer is None:
            return None, False
        expected = remote_prefill_tokens(request)
        if expected is not None:
            answer = self._await_remote(request, prompt, extras, answer, min(expected, len(prompt)))
            if answer is None:
                return None, False
        hit_tokens, by_tier = answer
        hit = min(hit_tokens, int(request.num_tokens) - 1)
        ext = hit - num_computed_tokens
        if ext <= 0:
            self._hits.pop(request.request_id, None)
            return 0, False
        is_async = self._is_async(by_tier)
        self._hits[request.request_id] = _Hit(num_computed_tokens, hit, by_tier, is_async, extras)
        return ext, is_async

    def _await_remote(self, request: Any, prompt: list[int], extras: KeyExtras | None,
                      answer: tuple[int, dict[str, int]], expected: int) -> tuple[int, dict[str, int]] | None:
        """A remote prefill's answer once its ``expected`` tokens are found, or what is found when
        the wait (``remote_prefill_wait_ms``) runs out; None while waiting (vLLM asks again next
        step; the lookup is repeated every ``REMOTE_RETRY_S``). Never blocks the step."""
        rid = request.request_id
        now = time.monotonic()
        wait = self._remote_waits.get(rid)
        if wait is None:
            wait = self._remote_waits[rid] = _RemoteWait(now + self.options.remote_prefill_wait_ms / 1000,
                                                         now + REMOTE_RETRY_S, now)
            self.stats["remote_prefill_requests"] += 1
        if wait.deadline <= 0:
            return answer
        if answer[0] >= expected:
            wait.deadline = 0.0
            logger.info("lmcache-core: request %s: the prefill instance's %d prompt tokens found after %.1f ms "
                        "(%d lookups)", rid, expected, (now - wait.started) * 1000, wait.lookups)
            return answer
        if now >= wait.deadline:
            wait.deadline = 0.0  # settled: this answer stands
            self.stats["remote_prefill_short"] += 1
            logger.warning("lmcache-core: request %s: the prefill instance stored %d prompt tokens, %d found after "
                           "%d ms; computing the rest (raise remote_prefill_wait_ms if its stores are slower)",
                           rid, expected, answer[0], self.options.remote_prefill_wait_ms)
            return answer
        if now < wait.retry:
            return None
        wait.retry = now + REMOTE_RETRY_S
        wait.lookups += 1
        with self._lookup_lock:
            self._lookups.pop(rid, None)  # look again
        again = self._answer(request, prompt, extras)
        if again is None or again[0] < expected:
            return None  # the next call settles it (found, or the deadline)
        return self._await_remote(request, prompt, extras, again, expected)

    def transfer_params(self, request: Any) -> dict[str, Any] | None:
        """What a finished request hands its decode instance (``kv_transfer_params``): when the
        proxy asked (``do_remote_decode``) and this instance stores, the prompt tokens it stored."""
        params = getattr(request, "kv_transfer_params", None)
        if not self.can_save or not isinstance(params, dict) or not params.get("do_remote_decode"):
            return None
        tr = self._trackers.get(request.request_id)
        stored = tr.issued if tr is not None else 0
        if stored <= 0:
            return None  # nothing stored (unkeyable input, or a prompt shorter than a chunk): decode computes
        return {"do_remote_prefill": True, "do_remote_decode": False,
                TRANSFER_KEY: {"v": TRANSFER_VERSION, "tokens": stored}}

    def update_state_after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """Blocks exist now: plan the load of ``[local, local + num_external_tokens)``. Also where a
        request first seen here (a store-only role) gets its key extras."""
        try:
            self.extras(request)
        except ValueError:
            pass
        hit = self._hits.pop(request.request_id, None)
        if num_external_tokens <= 0:
            return
        if hit is None:
            logger.warning("lmcache-core: %d external tokens allocated for request %s without a lookup; "
                           "not loading", num_external_tokens, request.request_id)
            return
        end = hit.local + num_external_tokens
        prompt = prompt_tokens(request)
        self._loads[request.request_id] = LoadSpec(
            request.request_id, tuple(prompt), tuple(block_ids), hit.local, end, hit.is_async, hit.extras)
        self._sources[request.request_id] = hit.by_tier
        self.stats["lookup_requests"] += 1
        self.stats["lookup_tokens"] += len(prompt)
        self.stats["hit_tokens"] += num_external_tokens
        logger.info("lmcache-core: request %s: %d of %d prompt tokens from the cache (%s, %s load)",
                    request.request_id, num_external_tokens, len(prompt), hit.by_tier,
                    "async" if hit.is_async else "sync")

    def hit_sources(self, request_id: str) -> dict[str, int]:
        """Tokens of the last planned load by tier name (what vLLM's hit-source metric splits)."""
        return self._sources.pop(request_id, {})

    # -- the step plan ----------------------------------------------------------------------------
    def _maybe_save(self, tr: _Tracker, computed_end: int, out: list[SaveSpec], null_block: int = 0) -> None:
        """Store the prompt's chunks that are computed by the end of this step.

        A block table entry that is vLLM's null block (a sliding-window layer's block freed
        outside the window) holds no KV of this request: those chunks are never stored."""
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
        first = tr.saved // self.block_size
        last = (end - 1) // self.block_size
        if null_block in tr.block_ids[first : last + 1]:
            logger.info("lmcache-core: request %s: tokens [%d, %d) lie in freed (null) blocks; not storing them",
                        tr.req_id, tr.saved, end)
            tr.saved = n  # the chain of later chunks depends on these: the rest is not stored either
            return
        out.append(SaveSpec(tr.req_id, tuple(tr.prompt[:end]), tuple(tr.block_ids), tr.extras, tr.saved))
        tr.saved = tr.issued = end
        self._save_issued.add(tr.req_id)

    def build_plan(self, scheduler_output: Any, null_block: int = 0) -> StepPlan:
        """This step's loads and stores (never modifies ``scheduler_output``)."""
        saves: list[SaveSpec] = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            if not prompt and getattr(new, "prompt_embeds", None) is not None:
                prompt = [0] * int(new.prompt_embeds.shape[0])
            if new.req_id not in self._extras or self._extras[new.req_id] is _UNKEYABLE:
                continue  # never seen by update_state_after_alloc, or inputs we cannot key
            extras = self._extras[new.req_id]
            tr = _Tracker(new.req_id, prompt, list(new.block_ids[0]) if new.block_ids else [], extras)
            self._trackers[new.req_id] = tr
            self._maybe_save(tr, new.num_computed_tokens + scheduled.get(new.req_id, 0), saves, null_block)
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
            self._maybe_save(tr, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), saves, null_block)
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
        self._extras.pop(request_id, None)
        self._remote_waits.pop(request_id, None)
        with self._lookup_lock:
            self._lookups.pop(request_id, None)
        if request_id in self._save_issued:
            self._save_issued.discard(request_id)
            return True
        return False

    def take_stats(self) -> dict[str, int]:
        out, self.stats = self.stats, dict.fromkeys(self.stats, 0)
        return out

    def pending(self) -> Iterable[str]:
        return list(self._trackers)

    def close(self) -> None:
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
