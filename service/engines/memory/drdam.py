"""DrDAM: the RBF log-sum-exp memory through random features (Hoover et al. 2024).

    T = Σ_μ φ(ξ_μ)                  (fixed size, whatever the number of patterns)
    Ẽ(v) = −(1/β) log ⟨φ(v), T⟩  ≈  −(1/β) log Σ_μ exp(−β/2 ‖v − ξ_μ‖²)   (`rbf`)

The approximation error of ⟨φ(v), T⟩ shrinks like 1/√Y with Y random features. For the
trigonometric maps the estimate can be ≤ 0: it is clipped at the smallest positive float,
where the energy is flat and the state stays put. Storing adds φ(ξ) to T and removing
subtracts it, so serving needs only T and the basis (√β S, b), which is regenerated from
`seed`. With keep_patterns the raw patterns are also kept, to report the nearest memory.

Dynamics v ← v − α ∇Ẽ by autograd with per-query backtracking. The default α = 1 is the
fixed-point step of the exact energy Ẽ approximates; backtracking absorbs the difference.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidArgument

from .base import (
    Evaluation,
    GradientMemory,
    energy_and_gradient,
    read_bool,
    read_choice,
    read_int,
    read_positive_float,
    reject_unknown,
)
from .rbf import RbfMemory, rbf_energy
from .features import FEATURE_MAPS, chunk_rows, feature_size, feature_sum, random_basis, random_features

MAX_FEATURES = 1_000_000
# The projection is features×dim float32: cap it at 1 GiB.
MAX_PROJECTION_ELEMENTS = 1 << 28
MAX_SEED = 2**63 - 1


def drdam_energy(
    states: Tensor, memory: Tensor, projection: Tensor, offset: Tensor, beta: float, feature_map: str
) -> Tensor:
    """Ẽ(v) = −(1/β) log ⟨φ(v), T⟩ for each row of `states`, with T = `memory`."""
    similarity = random_features(states, projection, offset, beta, feature_map) @ memory
    return -torch.log(similarity.clamp_min(torch.finfo(similarity.dtype).tiny)) / beta


@dataclass
class Agreement:
    """DrDAM's energy and gradient against the exact rbf energy's at a set of states."""

    mean_abs_energy_error: float
    max_abs_energy_error: float
    mean_gradient_cosine: float
    min_gradient_cosine: float


class DrdamMemory(GradientMemory):
    kind = "drdam"

    def __init__(self, dim: int, params: dict, device: str | torch.device = "cpu"):
        super().__init__(dim, params, device)
        self.beta: float = params["beta"]
        self.feature_map: str = params["feature_map"]
        self.keeps_patterns = params["keep_patterns"]
        self.projection, self.offset = random_basis(params["features"], dim, self.beta, params["seed"], self.device)
        self.memory = torch.zeros(feature_size(self.feature_map, params["features"]), device=self.device)
        self._chunk = chunk_rows(self.feature_map, params["features"])

    @classmethod
    def normalize_params(cls, dim: int, params: dict) -> dict:
        reject_unknown(cls.kind, params, ("beta", "features", "feature_map", "seed", "keep_patterns"))
        features = read_int(params, "features", 4096, 1, MAX_FEATURES)
        if features * dim > MAX_PROJECTION_ELEMENTS:
            raise InvalidArgument(
                f"features × dim must be <= {MAX_PROJECTION_ELEMENTS} (the random projection is features×dim)",
                field="params.features",
            )
        seed = params["seed"] if "seed" in params else secrets.randbelow(MAX_SEED + 1)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}", field="params.seed")
        return {
            "beta": read_positive_float(params, "beta", 1.0),
            "features": features,
            "feature_map": read_choice(params, "feature_map", "sincos", FEATURE_MAPS),
            "seed": seed,
            "keep_patterns": read_bool(params, "keep_patterns", True),
        }

    def _state_tensors(self) -> list[Tensor]:
        return super()._state_tensors() + [self.memory, self.projection, self.offset]

    def summed_features(self, x: Tensor) -> Tensor:
        """Σ_rows φ(x): what storing the rows of x adds to T."""
        return feature_sum(x, self.projection, self.offset, self.beta, self.feature_map)

    def _stored(self, patterns: Tensor) -> None:
        self.memory += self.summed_features(patterns)

    def _forgotten(self, pattern: Tensor) -> None:
        self.memory -= self.summed_features(pattern[None])

    def _energy_of_chunk(self, states: Tensor) -> Tensor:
        return drdam_energy(states, self.memory, self.projection, self.offset, self.beta, self.feature_map)

    # Queries are processed in row chunks so that φ(v) for a large Y stays bounded.
    def _energy(self, states: Tensor) -> Tensor:
        return torch.cat([self._energy_of_chunk(chunk) for chunk in states.split(self._chunk)])

    def memory_weights(self, states: Tensor) -> Tensor | None:
        """φ(ξ_μ)·φ(v) / ⟨φ(v), T⟩: pattern μ's share of the similarity the energy is the log of."""
        if not self.keeps_patterns:
            return None
        stored = torch.cat([self._features(chunk) for chunk in self.patterns.split(self._chunk)])  # K×F
        # Σ_μ φ(v)·φ(ξ_μ) = ⟨φ(v), T⟩: each row's shares sum to 1.
        kernels = torch.cat([self._features(chunk) @ stored.T for chunk in states.split(self._chunk)])
        return kernels / kernels.sum(dim=-1, keepdim=True)

    def _features(self, x: Tensor) -> Tensor:
        return random_features(x, self.projection, self.offset, self.beta, self.feature_map)

    def agreement(self, states: Tensor) -> Agreement:
        """|Ẽ − E| and cos(∇Ẽ, ∇E) at B states, E the exact rbf energy of the kept patterns (float64)."""
        approximate = self._evaluate(states)
        patterns = self.patterns.double()
        exact_energy, exact_gradient = energy_and_gradient(lambda v: rbf_energy(v, patterns, self.beta),
                                                           states.double())
        error = (approximate.energy.double() - exact_energy).abs()
        cosine = torch.nn.functional.cosine_similarity(approximate.gradient.double(), exact_gradient, dim=-1)
        return Agreement(error.mean().item(), error.max().item(), cosine.mean().item(), cosine.min().item())

    def same_retrieval(self, queries: Tensor) -> Tensor:
        """Per query, whether DrDAM's dynamics and exact rbf's end nearest the same stored pattern."""
        exact = RbfMemory(self.dim, {"beta": self.beta}, self.device)
        exact.add(self.patterns)
        return self.run(queries).nearest == exact.run(queries).nearest

    def _evaluate(self, states: Tensor) -> Evaluation:
        parts = [energy_and_gradient(self._energy_of_chunk, chunk) for chunk in states.split(self._chunk)]
        return Evaluation(torch.cat([energy for energy, _ in parts]), torch.cat([gradient for _, gradient in parts]))
