"""What the client answers: plain dataclasses, vectors and images as numpy arrays."""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shard:
    shard: int
    count: int  # patterns in the shard
    replicas: list[str]  # who serves it, first choice first


@dataclass(frozen=True)
class Bank:
    name: str
    kind: str
    dim: int
    params: dict[str, Any]
    count: int
    bytes: int  # serving memory held by the bank's engine
    version: int = 0  # committed writes applied by the answering replica
    checksum: str = ""  # of the patterns at that version; equal on every replica at the same version
    shards: list[Shard] = dataclasses.field(default_factory=list)  # one for an unsharded bank

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Bank:
        """From the service's bank info; fields this client does not know yet are left out."""
        known = {f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields}
        known["shards"] = [Shard(**shard) for shard in known.get("shards", [])]
        return cls(**known)


@dataclass(frozen=True)
class Stored:
    ids: list[str]
    count: int
    version: int  # the bank's version after this write: pass it as min_version to read it back


@dataclass(frozen=True)
class Nearest:
    id: str
    similarity: float


@dataclass(frozen=True)
class TopMemory:
    id: str
    weight: float  # softmax weight (modern, rbf), feature-space share (drdam), overlap ξ·v/D (classical, dense)


@dataclass(frozen=True, eq=False)
class ExplainedStep:
    state: np.ndarray  # float32, the bank's dim
    energy: float  # the trace's entry
    top_memories: list[TopMemory]  # strongest first; empty where the bank keeps no patterns


@dataclass(frozen=True, eq=False)
class MemoryResult:
    state: np.ndarray  # float32, the bank's dim
    energy: float
    steps: int
    converged: bool
    nearest: Nearest | None  # None for the kinds that keep no patterns
    trace: np.ndarray | None  # energies at the start and after every step, when asked for (or explained)
    explanation: list[ExplainedStep] | None = None  # with explain: every step, the start included


@dataclass(frozen=True, eq=False)
class ImageFrame:
    image: np.ndarray  # H×W float32
    energy: float  # attention_energy + hopfield_energy
    attention_energy: float
    hopfield_energy: float


@dataclass(frozen=True, eq=False)
class ImageCompletion:
    model: str
    image: np.ndarray  # H×W float32 in [0, 1]
    energy_trace: np.ndarray
    frames: list[ImageFrame] | None = None  # with explain: one per step, the start included; the last is `image`


@dataclass(frozen=True)
class PromptToken:
    text: str  # the token decoded alone
    id: int


@dataclass(frozen=True)
class NextTokenCandidate:
    token: str
    token_id: int
    logit: float
    probability: float  # softmax(logits / temperature); temperature 0 counts as 1
    kept_by_top_k: bool
    kept_by_top_p: bool


@dataclass(frozen=True, eq=False)
class TextExplanation:
    """The text model's own forward pass over a prompt (explain_text)."""

    model: str
    tokens: list[PromptToken]
    layers: list[int]  # the layers `attention` holds, in its order
    heads: list[int]  # the heads `attention` holds, in its order
    attention: np.ndarray  # float32 [layer][head][query][key] causal softmax weights
    candidates: list[NextTokenCandidate]  # the top_n most likely next tokens, most likely first
    distribution: np.ndarray  # per candidate, what the sampler draws from (top-k and top-p applied, renormalised)


@dataclass(frozen=True)
class Agreement:
    mean_abs_energy_error: float
    max_abs_energy_error: float
    mean_gradient_cosine: float
    min_gradient_cosine: float


@dataclass(frozen=True)
class Fidelity:
    """How well a drdam bank's random features approximate the exact rbf energy of its own patterns now."""

    version: int  # the bank's version the report was computed at
    sample_size: int  # stored patterns sampled; as many noisy copies too
    noise: float
    patterns: Agreement  # at the sampled patterns themselves
    noisy: Agreement  # at their noisy copies
    same_nearest: float  # fraction of noisy copies DrDAM and exact retrieval bring nearest the same pattern

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Fidelity:
        return cls(version=fields["version"], sample_size=fields["sample_size"], noise=fields["noise"],
                   patterns=Agreement(**fields["patterns"]), noisy=Agreement(**fields["noisy"]),
                   same_nearest=fields["same_nearest"])


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Alternative:
    token: str
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[Alternative]

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> TokenLogprob:
        return cls(token=fields["token"], token_id=fields["token_id"], logprob=fields["logprob"],
                   top=[Alternative(**alt) for alt in fields["top"]])


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed generation: a token, or (the last one) the finish with its usage."""

    text: str
    token_id: int | None = None
    logprobs: TokenLogprob | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_chunks(cls, chunks: list[Chunk]) -> Generation:
        tokens = [c for c in chunks if c.token_id is not None]
        finish = chunks[-1]
        logprobs = [c.logprobs for c in tokens if c.logprobs is not None]
        return cls(text="".join(c.text for c in chunks), tokens=[c.token_id for c in tokens],
                   finish_reason=finish.finish_reason, usage=finish.usage, logprobs=logprobs or None)


@dataclass(frozen=True)
class Model:
    id: str
    task: str
    ready: bool
    details: dict[str, Any]


def matrix(values: Any, dtype: type = np.float32) -> np.ndarray:
    """Rows as one 2-D array; a single vector is one row."""
    array = np.asarray(values, dtype=dtype)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise ValueError(f"expected a vector or a matrix of vectors, got an array of shape {array.shape}")
    return array


def to_base64(row: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4")).decode("ascii")


def vector(value: str | list[float]) -> np.ndarray:
    """A state as the service sent it, base64 of little-endian float32 or numbers, as float32."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)
