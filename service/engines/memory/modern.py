"""Modern Hopfield network (Ramsauer et al. 2020, "Hopfield Networks is All You Need").

    E(v) = −lse(β, Ξv) + ½ vᵀv + β⁻¹ log K + ½ M²,   lse(β, z) = β⁻¹ log Σ_μ exp(β z_μ)

with Ξ the K×D stored patterns and M the largest pattern norm (the constants make E ≥ 0).
Its gradient is ∇E = v − Ξᵀ softmax(β Ξ v), so the update

    v ← v − α ∇E,   α = 1:  v ← Ξᵀ softmax(β Ξ v)

is the concave-convex fixed-point iteration; it retrieves a well separated pattern in one
step. E is ½‖v‖² minus a convex function, hence E(v − α∇E) ≤ E(v) − α(1 − α/2)‖∇E‖²: the
energy never increases for 0 < α < 2.

A step is two GEMMs (scores Ξv, then Ξᵀ·weights), evaluated as the log-sum-exp partials of
service/engines/memory/shards.py (one per shard of the bank); the scores of the final states also
give the energy and the nearest pattern, so nothing K×D is allocated per call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from service.errors import InvalidArgument

from .base import Descent, settled_by
from .shards import LogSumExpMemory, Merged


def modern_energy_from_lse(states: Tensor, lse: Tensor, beta: float, count: int, max_norm: float) -> Tensor:
    """E given lse(β, Ξv) (B) for `count` patterns of largest norm `max_norm`."""
    return -lse + 0.5 * states.square().sum(dim=-1) + math.log(count) / beta + 0.5 * max_norm**2


def modern_energy(states: Tensor, patterns: Tensor, beta: float) -> Tensor:
    """E(v) for each row of `states` against K×D `patterns`."""
    lse = torch.logsumexp(beta * (states @ patterns.T), dim=-1) / beta
    max_norm = torch.linalg.vector_norm(patterns, dim=-1).max().item()
    return modern_energy_from_lse(states, lse, beta, patterns.shape[0], max_norm)


class ModernMemory(LogSumExpMemory):
    kind = "modern"
    default_steps = 20

    def _checked_step_size(self, step_size: float | None) -> float:
        step_size = super()._checked_step_size(step_size)
        if step_size >= 2:
            raise InvalidArgument("step_size must be below 2: larger steps can raise the energy", field="step_size")
        return step_size

    def _logits(self, states: Tensor, overlaps: Tensor) -> Tensor:
        return self.beta * overlaps

    def _energy_from(self, states: Tensor, merged: Merged) -> Tensor:
        return modern_energy_from_lse(states.double(), merged.lse / self.beta, self.beta, merged.count,
                                      merged.max_norm)

    def _descend(self, states: Tensor, free: Tensor, steps: int, step_size: float, tolerance: float,
                 path: list[Tensor] | None) -> Descent:
        now = self._evaluate(states)
        gradient = now.gradient * free
        trace = [now.energy]
        if path is not None:
            path.append(states)
        active, converged, taken = self._bookkeeping(states.shape[0])
        for _ in range(steps):
            done = active & settled_by(gradient, step_size, tolerance)
            converged |= done
            active &= ~done
            if not active.any():
                break
            states = states - (step_size * active)[:, None] * gradient
            now = self._evaluate(states)
            gradient = now.gradient * free
            taken += active
            trace.append(now.energy)
            if path is not None:
                path.append(states)
        converged |= active & settled_by(gradient, step_size, tolerance)
        return Descent(states, now.energy, taken, converged, trace, path, nearest=now.nearest)
