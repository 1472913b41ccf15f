"""Dense Associative Memory (Krotov & Hopfield 2016; Demircigil et al. 2017).

    E(v) = −Σ_μ F(ξ_μ · v),   v ∈ {−1, +1}^D

- energy "poly": F(x) = xⁿ/n for x ≥ 0, else 0 (capacity grows like D^(n−1));
- energy "exp":  F(x) = exp(βx) (exponential capacity). The reported energy is
  −(1/β)·log Σ_μ exp(β ξ_μ·v), a monotone transform of −Σ_μ exp(β ξ_μ·v) computed stably
  with log-sum-exp; it ranks states, and so decides flips, exactly like the true energy.

Asynchronous dynamics: visit units in order and flip bit i iff that lowers E. The overlaps
m = Ξv (B×K) are kept up to date (flipping bit i adds −2 v_i Ξ[:, i]), so a sweep costs
O(B·K·D). Overlaps of ±1 vectors are integers; they and the energies are held in float64 so
that comparing the energies of neighbouring states is exact for realistic sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BinaryMemory, read_choice, read_int, read_positive_float, reject_unknown

ENERGIES = ("poly", "exp")


def dense_energy_from_overlaps(overlaps: Tensor, energy: str, n: int, beta: float) -> Tensor:
    """E from m = Ξv (…×K): −Σ relu(m)ⁿ/n, or −(1/β) lse(β m) for "exp"."""
    if energy == "poly":
        return -(overlaps.clamp_min(0) ** n).sum(dim=-1) / n
    return -torch.logsumexp(beta * overlaps, dim=-1) / beta


class DenseMemory(BinaryMemory):
    kind = "dense"

    def __init__(self, dim: int, params: dict, device: str | torch.device = "cpu"):
        super().__init__(dim, params, device)
        self.energy_kind: str = params["energy"]
        self.n: int = params.get("n", 3)
        self.beta: float = params.get("beta", 1.0)

    @classmethod
    def normalize_params(cls, dim: int, params: dict) -> dict:
        energy = read_choice(params, "energy", "poly", ENERGIES)
        if energy == "poly":
            reject_unknown(cls.kind, params, ("energy", "n"))
            return {"energy": energy, "n": read_int(params, "n", 3, 2, 30)}
        reject_unknown(cls.kind, params, ("energy", "beta"))
        return {"energy": energy, "beta": read_positive_float(params, "beta", 1.0)}

    def _energy_of(self, overlaps: Tensor) -> Tensor:
        return dense_energy_from_overlaps(overlaps, self.energy_kind, self.n, self.beta)

    def _energy(self, states: Tensor) -> Tensor:
        return self._energy_of(self._prepare(states))

    # The cache is the overlaps m = Ξv (B×K, float64). A float32 product of ±1 vectors is an
    # exact integer below 2^24, so the GEMM runs in float32.
    def _prepare(self, states: Tensor) -> Tensor:
        return (states @ self.patterns.T).double()

    def _energy_from(self, states: Tensor, overlaps: Tensor) -> Tensor:
        return self._energy_of(overlaps)

    def _overlaps_from(self, states: Tensor, overlaps: Tensor) -> Tensor:
        return overlaps

    def _flip_candidates(self, states: Tensor, overlaps: Tensor, unit: int) -> Tensor:
        """Overlaps after flipping bit `unit` of every query."""
        column = self.patterns[:, unit].double()
        return overlaps - 2.0 * states[:, unit, None].double() * column

    def _sweep(self, states: Tensor, overlaps: Tensor, free: Tensor) -> Tensor:
        flipped = torch.zeros(states.shape[0], dtype=torch.bool, device=self.device)
        energy = self._energy_of(overlaps)
        for unit in range(self.dim):
            candidate = self._flip_candidates(states, overlaps, unit)
            candidate_energy = self._energy_of(candidate)
            flip = free[:, unit] & (candidate_energy < energy)
            states[:, unit] = torch.where(flip, -states[:, unit], states[:, unit])
            overlaps.copy_(torch.where(flip[:, None], candidate, overlaps))
            energy = torch.where(flip, candidate_energy, energy)
            flipped |= flip
        return flipped

    def _stable(self, states: Tensor, overlaps: Tensor, free: Tensor) -> Tensor:
        energy = self._energy_of(overlaps)
        improvable = torch.zeros(states.shape[0], dtype=torch.bool, device=self.device)
        for unit in range(self.dim):
            lower = self._energy_of(self._flip_candidates(states, overlaps, unit)) < energy
            improvable |= free[:, unit] & lower
        return ~improvable
