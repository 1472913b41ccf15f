"""Classical Hopfield network (Hopfield 1982).

    W = Σ_μ ξ_μ ξ_μᵀ with zero diagonal,   E(v) = −½ vᵀ W v,   v ∈ {−1, +1}^D

Asynchronous dynamics: units are visited in order 0..D−1 and set to the sign of their local
field h_i = (W v)_i, keeping the current sign when h_i = 0. With a zero diagonal a flip
changes the energy by −2|h_i| < 0, so the energy strictly decreases until a fixed point.
Capacity is about 0.14·D random patterns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.errors import InvalidArgument

from .base import BinaryMemory, reject_unknown

# W is D×D float32: 16384² entries are 1 GiB.
MAX_CLASSICAL_DIM = 16_384


def classical_energy(states: Tensor, weights: Tensor) -> Tensor:
    """E = −½ vᵀ W v for each row of `states`."""
    return -0.5 * ((states @ weights) * states).sum(dim=-1)


class ClassicalMemory(BinaryMemory):
    kind = "classical"

    def __init__(self, dim: int, params: dict, device: str | torch.device = "cpu"):
        super().__init__(dim, params, device)
        # Entries are integer sums of ±1 products: exact in float32 up to 2^24 patterns.
        self.weights = torch.zeros(dim, dim, device=self.device)

    @classmethod
    def normalize_params(cls, dim: int, params: dict) -> dict:
        reject_unknown(cls.kind, params, ())
        if dim > MAX_CLASSICAL_DIM:
            raise InvalidArgument(
                f"kind 'classical' holds a D×D matrix: dim must be <= {MAX_CLASSICAL_DIM}", field="dim"
            )
        return {}

    def _state_tensors(self) -> list[Tensor]:
        return super()._state_tensors() + [self.weights]

    def _stored(self, patterns: Tensor) -> None:
        self.weights += patterns.T @ patterns
        self.weights.fill_diagonal_(0.0)

    def _forgotten(self, pattern: Tensor) -> None:
        self.weights -= torch.outer(pattern, pattern)
        self.weights.fill_diagonal_(0.0)

    def _energy(self, states: Tensor) -> Tensor:
        return classical_energy(states, self.weights)

    # The cache is the local fields h = v W (B×D), updated by a rank-one term per flip.
    def _prepare(self, states: Tensor) -> Tensor:
        return states @ self.weights

    def _energy_from(self, states: Tensor, fields: Tensor) -> Tensor:
        return -0.5 * (fields * states).sum(dim=-1)

    def _sweep(self, states: Tensor, fields: Tensor, free: Tensor) -> Tensor:
        flipped = torch.zeros(states.shape[0], dtype=torch.bool, device=self.device)
        for unit in range(self.dim):
            value = states[:, unit]
            flip = free[:, unit] & (fields[:, unit] * value < 0)
            change = torch.where(flip, -2.0 * value, 0.0)
            states[:, unit] = value + change
            fields.addr_(change, self.weights[unit])
            flipped |= flip
        return flipped

    def _stable(self, states: Tensor, fields: Tensor, free: Tensor) -> Tensor:
        return ~(free & (fields * states < 0)).any(dim=-1)
