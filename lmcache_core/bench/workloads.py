"""Synthetic workloads made on the spot from a seed: token ids, no downloads.

A workload is a list of sessions; a session's requests run in order (a chat turn
waits for the one before it), sessions run side by side. Every prompt is token
ids in ``[FIRST_TOKEN, vocab)`` so a model's special tokens never appear.

- ``chat``: users whose history grows turn by turn (system prompt, then per turn
  a user message and the previous answer), the classic prefix-reuse case.
- ``rag``: a pool of documents with Zipf popularity; each query puts ``k`` of them
  (most popular first, the order a deployment fixes so that prefixes repeat)
  after the system prompt, then a question.
- ``qa``: long documents, many questions each, asked round-robin over documents.
- ``control``: unique prompts behind a short shared system prompt, the low-reuse
  API stream where a cache can only cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIRST_TOKEN = 16
WORKLOADS = ("chat", "rag", "qa", "control")


@dataclass(frozen=True)
class Request:
    id: str
    session: str
    tokens: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: tuple[tuple[Request, ...], ...]
    params: dict[str, object] = field(default_factory=dict)

    @property
    def requests(self) -> list[Request]:
        return [r for s in self.sessions for r in s]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)


@dataclass(frozen=True)
class Shape:
    """Sizes of a workload, in tokens; ``scale`` multiplies every length (``--quick`` halves)."""

    vocab: int = 512
    max_tokens: int = 8
    system: int = 128
    # chat
    users: int = 4
    rounds: int = 4
    user_turn: int = 64
    answer: int = 64
    # rag
    docs: int = 16
    doc_len: int = 256
    k: int = 2
    queries: int = 24
    zipf: float = 1.1
    question: int = 32
    # qa
    qa_docs: int = 3
    qa_doc_len: int = 1024
    questions: int = 4
    # control
    control_requests: int = 16
    control_len: int = 384

    def scaled(self, scale: float) -> "Shape":
        if scale == 1.0:
            return self
        lengths = ("system", "user_turn", "answer", "doc_len", "question", "qa_doc_len", "control_len")
        return Shape(**{**self.__dict__, **{k: max(1, int(getattr(self, k) * scale)) for k in lengths}})


def _tokens(rng: np.random.Generator, n: int, vocab: int) -> tuple[int, ...]:
    if vocab <= FIRST_TOKEN:
        raise ValueError(f"vocab must be larger than {FIRST_TOKEN}, got {vocab}")
    return tuple(int(t) for t in rng.integers(FIRST_TOKEN, vocab, size=n))


def chat(shape: Shape, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 1])
    system = _tokens(rng, shape.system, shape.vocab)
    sessions = []
    for u in range(shape.users):
        history: tuple[int, ...] = system
        reqs = []
        for r in range(shape.rounds):
            if r:
                history += _tokens(rng, shape.answer, shape.vocab)  # the previous answer
            history += _tokens(rng, shape.user_turn, shape.vocab)
            reqs.append(Request(f"chat-u{u}-r{r}", f"u{u}", history, shape.max_tokens))
        sessions.append(tuple(reqs))
    return Workload("chat", tuple(sessions), {"users": shape.users, "rounds": shape.rounds})


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def rag(shape: Shape, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 2])
    system = _tokens(rng, shape.system, shape.vocab)
    docs = [_tokens(rng, shape.doc_len, shape.vocab) for _ in range(shape.docs)]
    weights = zipf_weights(shape.docs, shape.zipf)
    k = min(shape.k, shape.docs)
    sessions = []
    for q in range(shape.queries):
        picked = sorted(rng.choice(shape.docs, size=k, replace=False, p=weights))  # most popular first
        tokens = system + sum((docs[i] for i in picked), ()) + _tokens(rng, shape.question, shape.vocab)
        sessions.append((Request(f"rag-q{q}", f"q{q}", tokens, shape.max_tokens),))
    return Workload("rag", tuple(sessions), {"docs": shape.docs, "k": k, "zipf": shape.zipf})


def qa(shape: Shape, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 3])
    docs = [_tokens(rng, shape.qa_doc_len, shape.vocab) for _ in range(shape.qa_docs)]
    sessions = []
    for j in range(shape.questions):  # round-robin: every document's first question, then the second
        for d, doc in enumerate(docs):
            tokens = doc + _tokens(rng, shape.question, shape.vocab)
            sessions.append((Request(f"qa-d{d}-q{j}", f"d{d}q{j}", tokens, shape.max_tokens),))
    return Workload("qa", tuple(sessions), {"docs": shape.qa_docs, "questions": shape.questions})


def control(shape: Shape, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 4])
    system = _tokens(rng, min(shape.system, 32), shape.vocab)
    sessions = tuple((Request(f"ctl-{i}", f"c{i}", system + _tokens(rng, shape.control_len, shape.vocab),
                              shape.max_tokens),) for i in range(shape.control_requests))
    return Workload("control", sessions, {"requests": shape.control_requests})


def make(name: str, shape: Shape, seed: int = 0) -> Workload:
    makers = {"chat": chat, "rag": rag, "qa": qa, "control": control}
    if name not in makers:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return makers[name](shape, seed)
