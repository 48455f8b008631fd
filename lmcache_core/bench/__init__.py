"""``lmcache bench``: synthetic workloads (chat, RAG, long-document QA, a low-reuse control) driven
against real engines (an OpenAI-compatible server, ``vllm serve``, ``CachedModel``) and their
baselines in one run; a table, JSON and optional plots. See docs/bench.md."""

from .report import Summary, summarize
from .runner import Arrival, Result, run
from .targets import CachedModelTarget, OpenAITarget, Outcome
from .workloads import WORKLOADS, Request, Shape, Workload, make

__all__ = ["WORKLOADS", "Arrival", "CachedModelTarget", "OpenAITarget", "Outcome", "Request", "Result",
           "Shape", "Summary", "Workload", "make", "run", "summarize"]
