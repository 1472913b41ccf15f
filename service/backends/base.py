"""The one interface the API layer calls. REST and gRPC both go through it, one call per operation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from service.banks.registry import BankInfo, DynamicsOptions, Fidelity, MemoryResults
from service.engines.lm.explain import TextExplanation
from service.engines.lm.sampling import SamplingParams
from service.engines.memory import KINDS
from service.serving.scheduler import Prompt

MEMORY_MODEL = "associative-memory"
IMAGE_MODEL = "energy-transformer"


def memory_card(ready: bool) -> dict:
    return {"id": MEMORY_MODEL, "task": "retrieve", "ready": ready, "details": {"kinds": sorted(KINDS)}}


def image_card(ready: bool, image_size: int | None) -> dict:
    return {"id": IMAGE_MODEL, "task": "image-completion", "ready": ready,
            "details": {} if image_size is None else {"image_size": image_size}}


def text_card(name: str, context: int, running_slots: int) -> dict:
    return {"id": name, "task": "text-generation", "ready": True,
            "details": {"context": context, "running_slots": running_slots}}


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when every model this backend serves can answer now."""
        ...

    async def degraded(self) -> list[str]:
        """The parts that cannot serve now while the rest does (e.g. "store": writes refused, reads
        answered from replica memory); empty when all is well."""
        ...

    async def create_bank(self, name: str, kind: str, dim: int, params: dict) -> BankInfo: ...

    async def list_banks(self) -> list[BankInfo]: ...

    async def bank_info(self, name: str, min_version: int = 0) -> BankInfo:
        """The bank as served at `min_version` or later (Unavailable when it cannot be had in time)."""
        ...

    async def delete_bank(self, name: str) -> None: ...

    async def store(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int, int]:
        """Returns (ids in request order, bank count, bank version) once the patterns are durable."""
        ...

    async def delete_pattern(self, name: str, pattern_id: str) -> int:
        """Returns the bank's version once the deletion is durable."""
        ...

    async def models(self) -> list[dict]:
        """Served models: the cards above, {"id", "task", "ready", "details"}, text models first (OpenAI
        clients such as guidellm take the first model listed)."""
        ...

    async def complete_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                             ) -> tuple[np.ndarray, np.ndarray]:
        """Energy Transformer: one H×W image in [0,1] and its missing-pixel mask → (image, energy trace)."""
        ...

    async def bank_fidelity(self, name: str, sample_size: int, noise: float) -> Fidelity:
        """A DrDAM bank against exact rbf on a sample of its own patterns (see BankRegistry.fidelity)."""
        ...

    async def explain_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """complete_image step by step → (frames (S+1)×H×W, attention energy S+1, Hopfield energy S+1)."""
        ...

    async def explain_text(self, prompt: str, params: SamplingParams, top_n: int, layers: list[int] | None,
                           heads: list[int] | None, max_weights: int) -> tuple[str, TextExplanation]:
        """(served model name, the text model's attention over the prompt and its next-token candidates);
        TooLarge naming the prompt past `max_weights` attention weights."""
        ...

    async def generate(self, prompt: Prompt, params: SamplingParams, deadline: float | None) -> AsyncIterator[dict]:
        """Submit a generation (errors such as a full queue or a too-long prompt are raised here, before
        any token) and return its event stream: with params.echo first {"type": "prompt", "token_ids", "tokens",
        "text", "logprobs"}, then {"type": "token", "token_id", "text", "logprobs"} per token, then one
        {"type": "finish", "finish_reason", "text", "usage", "error"}. Closing the stream early cancels
        the sequence."""
        ...

    async def run_memory(self, name: str, queries: np.ndarray, clamp: np.ndarray | None,
                         options: DynamicsOptions, min_version: int = 0) -> MemoryResults:
        """Retrieve (clamp None) or complete (clamp N×D bool, True = known) on one bank: one row per
        query, from bank state at `min_version` or later (Unavailable when it cannot be had in time)."""
        ...
