"""Log-sum-exp memory with a Gaussian (RBF) kernel, the exact energy DrDAM approximates.

    E(v) = −(1/β) log Σ_μ exp(−β/2 ‖v − ξ_μ‖²)

Dynamics v ← v − α ∇E with the energy-guarded line search of GradientMemory. Since
∇E = v − Σ_μ p_μ ξ_μ with p = softmax(−β/2 ‖v − ξ_μ‖²), the gradient is the log-sum-exp
merge's mean (service/engines/memory/shards.py, so a sharded bank descends the same way), and
the default α = 1 is the concave-convex fixed-point step v ← Σ_μ p_μ ξ_μ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientMemory
from .shards import LogSumExpMemory, Merged


def rbf_energy(states: Tensor, patterns: Tensor, beta: float, pattern_sq_norms: Tensor | None = None) -> Tensor:
    """E(v) for each row of `states`; ‖v − ξ‖² is expanded so that no B×K×D tensor is formed."""
    if pattern_sq_norms is None:
        pattern_sq_norms = torch.linalg.vector_norm(patterns, dim=-1).square()
    # Rounding can leave ‖v − ξ‖² slightly negative next to a pattern; clamping it at 0 would
    # also zero that pattern's pull in the gradient, so it is left as is (exp stays ≈ 1).
    sq_distances = states.square().sum(dim=-1, keepdim=True) - 2 * states @ patterns.T + pattern_sq_norms
    return -torch.logsumexp(-0.5 * beta * sq_distances, dim=-1) / beta


class RbfMemory(LogSumExpMemory, GradientMemory):
    kind = "rbf"
    dtype = torch.float64  # see shards.py: its line search decides on energy differences

    def _logits(self, states: Tensor, overlaps: Tensor) -> Tensor:
        # z = −β/2 ‖v − ξ‖², expanded as in rbf_energy. Its −β/2 ‖v‖² is the same for every pattern
        # (the merge would be as exact without it), but in z the energy needs no cancellation of
        # ½‖v‖² against lse/β, which would cost float32 its last digits near a pattern.
        sq_distances = states.square().sum(dim=-1, keepdim=True) - 2 * overlaps + self.pattern_norms.square()
        return (-0.5 * self.beta) * sq_distances

    def _energy_from(self, states: Tensor, merged: Merged) -> Tensor:
        return -merged.lse / self.beta
