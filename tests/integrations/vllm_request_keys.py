"""Run in the vLLM interpreter: vLLM's own Request objects (multimodal features, prompt
embeddings, LoRA, cache salt) through the connector's scheduler half; prints JSON facts.

    python vllm_request_keys.py
"""

from __future__ import annotations

import json

import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.request import Request

from lmcache_core import CacheEngine, ChunkGeometry, Config
from lmcache_core.integrations.vllm.common import ConnectorOptions
from lmcache_core.integrations.vllm.scheduler import VLLMScheduler, prompt_tokens, request_extras

CHUNK = 32


def request(rid: str, tokens: list[int] | None, **kw: object) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), None, **kw)  # type: ignore[arg-type]


def image(ident: str, offset: int, length: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def digests(engine: CacheEngine, req: Request) -> list[str]:
    return [k.digest.hex() for k in engine.keys(prompt_tokens(req), request_extras(req, CHUNK))]


def main() -> None:
    engine = CacheEngine(ChunkGeometry(2, 2, 8, "float16"),
                         Config.from_dict({"tiers": ["memory://"], "device": "cpu", "chunk_size": CHUNK}),
                         model="vllm-request-keys")
    tokens = [7] * 100  # placeholder tokens: only the images tell the requests apart
    out: dict[str, object] = {}
    plain = digests(engine, request("p", tokens))
    img_a = digests(engine, request("a", tokens, mm_features=[image("hash-a", 40, 20)]))
    img_b = digests(engine, request("b", tokens, mm_features=[image("hash-b", 40, 20)]))
    moved = digests(engine, request("m", tokens, mm_features=[image("hash-a", 44, 20)]))
    out["mm_chunk0_untouched"] = img_a[0] == plain[0]  # [0, 32) does not reach the image at 40
    out["mm_differs"] = img_a[1] != img_b[1] and img_a[1] != plain[1] and img_a[1] != moved[1]
    out["mm_chain"] = img_a[3] != img_b[3]
    emb = torch.randn(100, 16)
    emb2 = emb.clone()
    emb2[90] += 1.0
    e1 = digests(engine, request("e1", None, prompt_embeds=emb))
    e2 = digests(engine, request("e2", None, prompt_embeds=emb2))
    out["embeds_tokens"] = len(prompt_tokens(request("e", None, prompt_embeds=emb)))
    out["embeds_prefix_shared"] = e1[:2] == e2[:2]
    out["embeds_last_differs"] = e1[3] != e2[3]
    out["embeds_vs_zeros"] = e1[0] != digests(engine, request("z", [0] * 100))[0]
    la = digests(engine, request("la", tokens, lora_request=LoRARequest("a", 1, "/adapters/a")))
    lb = digests(engine, request("lb", tokens, lora_request=LoRARequest("b", 2, "/adapters/b")))
    s1 = digests(engine, request("s1", tokens, cache_salt="one"))
    out["lora_and_salt_differ"] = len({la[0], lb[0], s1[0], plain[0]}) == 4
    # Through the scheduler half: a stored image request is found again, another image is not.
    sched = VLLMScheduler(engine, 16, ConnectorOptions())
    stored = request("st", tokens, mm_features=[image("hash-a", 40, 20)])
    from lmcache_core.layout import PagedKV

    kv = PagedKV.from_vllm_flash([torch.randn(2, 8, 16, 2, 8).half() for _ in range(2)])
    engine.store(prompt_tokens(stored), kv, list(range(7)), extras=request_extras(stored, CHUNK), wait=True)
    same = request("q1", tokens, mm_features=[image("hash-a", 40, 20)])
    other = request("q2", tokens, mm_features=[image("hash-b", 40, 20)])
    out["hit_same_image"] = sched.get_num_new_matched_tokens(same, 0)[0]
    out["hit_other_image"] = sched.get_num_new_matched_tokens(other, 0)[0]
    engine.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
