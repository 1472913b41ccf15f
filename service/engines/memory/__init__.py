"""Associative memory kinds: energies, dynamics and their stored state.

    engine = make_engine(kind, dim, normalize_params(kind, dim, params), device)
    engine.add(patterns)                       # K×D float32
    result = engine.run(queries, clamp=mask)   # -> Retrieval
"""

from __future__ import annotations

import torch

from service.errors import InvalidArgument

from .base import MAX_DIM, MemoryEngine, Retrieval
from .classical import ClassicalMemory
from .dense import DenseMemory
from .drdam import DrdamMemory
from .modern import ModernMemory
from .rbf import RbfMemory

KINDS: dict[str, type[MemoryEngine]] = {
    engine.kind: engine for engine in (ClassicalMemory, DenseMemory, ModernMemory, RbfMemory, DrdamMemory)
}


def normalize_params(kind: str, dim: int, params: dict) -> dict:
    """Fill defaults and validate; raises InvalidArgument naming `kind`, `dim` or `params.<name>`."""
    if kind not in KINDS:
        raise InvalidArgument(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}", field="kind")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
        raise InvalidArgument(f"dim must be an integer in [1, {MAX_DIM}], got {dim!r}", field="dim")
    if not isinstance(params, dict):
        raise InvalidArgument("params must be an object", field="params")
    return KINDS[kind].normalize_params(dim, params)


def make_engine(kind: str, dim: int, params: dict, device: str | torch.device = "cpu") -> MemoryEngine:
    """An empty engine; `params` must come from normalize_params.

    Built outside inference mode even when called inside it: the gradient kinds differentiate
    through the tensors an engine holds, and autograd refuses inference tensors.
    """
    with torch.inference_mode(False):
        return KINDS[kind](dim, params, device)


__all__ = ["KINDS", "MemoryEngine", "Retrieval", "make_engine", "normalize_params"]
