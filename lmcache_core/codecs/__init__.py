"""KV codecs: fewer bytes on every link, and encryption at rest.

A codec is named per tier (``disk:///var/cache/lmcache?codec=lossless``, ``s3://b/p?codec=cachegen``,
``redis://h?codec=lossless+aesgcm``): the memory tier keeps exact chunks, the tier stack encodes
on its writer threads and every read decodes and verifies. See ``docs/codecs.md``.
"""

from __future__ import annotations

import warnings

from .base import DEVICE, HOST, Codec, CodecContext
from .registry import BUILTIN, NATIVE, REGISTRY, Chain, CodecRegistry, CodecSpec, resolve

# torch.frombuffer over read-only bytes (a decoded stage): we never write through such a view
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def lossy_namespace(namespace: bytes, chain: Chain) -> bytes:
    """The namespace id under which a lossy chain's chunks live (16 bytes): the exact namespace
    and the wire id of the chain's lossy codec, so a lossy chunk is never found under an exact
    key, and the lossless stages around it (``cachegen+aesgcm``) do not move it: what a chunk
    decodes to, not how it is wrapped, names it (``kv_codec: fp8`` and ``codec=fp8+aesgcm`` meet)."""
    from ..keys import lossy_namespace_id

    if chain.lossless:
        return namespace
    lossy = next(c for c in chain.codecs if not c.lossless)
    return lossy_namespace_id(namespace, lossy.wire_id)


__all__ = ["BUILTIN", "Chain", "Codec", "CodecContext", "CodecRegistry", "CodecSpec", "DEVICE", "HOST", "NATIVE",
           "REGISTRY", "lossy_namespace", "resolve"]
